"""The image without Docker: what `ctr images import` reads, and the Dockerfile's layout kept equal."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from kvtier.dev import image
from tests.support import REPO

pytestmark = pytest.mark.unit


def test_docker_archive_names_its_layers_by_content(tmp_path):
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF not really")
    layer = image.single_file_layer(binary, tmp_path / "layer.tar", "pause")
    out = image.write_docker_archive(
        tmp_path / "image.tar", "kvtier.local/pause:1", [layer], image.image_config([], ["/pause"])
    )
    with tarfile.open(out) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))[0]
        config = json.load(tar.extractfile(manifest["Config"]))
        inner = tar.extractfile(manifest["Layers"][0]).read()
    assert manifest["RepoTags"] == ["kvtier.local/pause:1"]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(inner).hexdigest()]
    assert config["config"]["Entrypoint"] == ["/pause"]
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        member = t.getmember("pause")
        assert (member.uid, member.mtime, member.mode & 0o111) == (0, 0, binary.stat().st_mode & 0o111)


def test_the_source_key_changes_with_the_sources_only(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    key = image.digest_files(tmp_path, ["src"])
    (tmp_path / "src" / "__pycache__").mkdir()
    (tmp_path / "src" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"cache")
    assert image.digest_files(tmp_path, ["src"]) == key
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    assert image.digest_files(tmp_path, ["src"]) != key


def test_the_dockerfile_builds_the_same_layout():
    text = (REPO / "Dockerfile").read_text()
    user, group = image.passwd_lines()
    assert user.strip() in text and group.strip() in text, "the same passwd and group entries"
    assert all(package in text for package in image.PACKAGES)
    assert f"python3 -m venv {image.VENV}" in text and f"PATH={image.VENV}/bin:" in text
    assert "pip uninstall -y pip setuptools" in text, "no installer left in the final image"
    assert f"USER {image.USER_ID}:{image.USER_ID}" in text


def test_the_cache_keeps_the_newest_builds(tmp_path):
    import os

    for i, name in enumerate(["old", "mid", "new"]):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (i, i))
    image.keep_newest(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid", "new"]
