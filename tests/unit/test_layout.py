"""Every package folder is installed: pyproject's explicit package list matches the tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.support import REPO

pytestmark = pytest.mark.unit


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {pkg: REPO / path for pkg, path in cfg["package-dir"].items() if pkg}
    roots["kvtier"] = REPO / cfg["package-dir"][""] / "kvtier"
    found = set()
    for pkg, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found == set(cfg["packages"])


def test_tests_take_shared_code_from_the_support_module():
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "tests").rglob("*.py")
        if path.resolve() != Path(__file__).resolve() and "tests.conftest" in path.read_text()
    ]
    assert offenders == [], "import shared code from tests.support; conftest.py holds fixtures"
