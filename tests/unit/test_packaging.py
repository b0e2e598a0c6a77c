"""What ships: the image's install steps match the README's, and engines import the client with the
standard library alone (a stock vLLM image has nothing else kvtier could rely on)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.unit


def test_dockerfile_installs_the_package_like_setup_and_runs_unprivileged():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms and all(":" in f.split()[1] and not f.split()[1].endswith(":latest") for f in froms), (
        "pinned bases"
    )
    assert any("pip install" in line and '".[gpu]"' in line for line in lines)
    assert "pip install" in (REPO / "hack" / "setup.sh").read_text()
    for folder in ("src", "operator", "agent", "bench"):
        assert f"COPY {folder} ./{folder}" in lines, (
            f"the image installs from {folder}/ like the checkout does"
        )
    assert "USER 65532:65532" in lines and lines[-2:] == ['ENTRYPOINT ["kvtier"]', 'CMD ["--help"]']


def test_staged_client_imports_with_the_standard_library_only(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "stage", str(tmp_path)], check=True, capture_output=True
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import kvtier.agent.client, kvtier.agent.keys, kvtier.agent.api.protocol;"
        "mods = sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'yaml', 'kubernetes', 'numpy', 'xxhash'));"
        "print(mods)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_one_version_from_the_package_metadata():
    from importlib.metadata import version

    from kvtier import __version__
    from kvtier.agent.csi.server import VERSION as csi_version
    from kvtier.agent.main import VERSION as agent_version

    assert __version__ == version("kvtier") == agent_version == csi_version
    out = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"kvtier {version('kvtier')}"


def test_the_package_declares_its_type_hints_and_where_it_lives():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert (REPO / "src" / "kvtier" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["kvtier"]
    assert "Typing :: Typed" in project["project"]["classifiers"]
    assert {"Homepage", "Source", "Documentation", "Issues"} <= set(project["project"]["urls"])
