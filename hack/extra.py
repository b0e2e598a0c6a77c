"""Print the requirements of one optional extra of pyproject.toml (one place for their versions)."""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
print(" ".join(project["optional-dependencies"][sys.argv[1]]))
