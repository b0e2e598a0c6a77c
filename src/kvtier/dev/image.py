"""`kvtier image build`: the one kvtier image, built without Docker or a registry.

Two layers, each cached under ~/.cache/kvtier/images by a key over its inputs:
- base: a Debian rootfs from `mmdebstrap` (Python, CA certificates, nvme-cli, util-linux) with a
  passwd/group entry for the non-root user 65532 (`kvtier`), so tools that look the user up work;
- app: /opt/kvtier, a virtualenv holding the kvtier wheel (CSI stubs generated) and its
  dependencies, installed offline in a chroot from wheels the host downloaded; pip is removed after.
No compiler or package manager cache is in either layer. The result is a docker-archive tar that
`ctr images import` takes; small images (pause, registrar) are written the same way.
The Dockerfile builds the same layout for users with Docker.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kvtier.dev.tools import repo_root

SUITE = "bookworm"
# ibverbs: RDMA discovery (ibv_devinfo) and the verbs drivers the NIXL wheel's UCX loads
PACKAGES = (
    "python3",
    "python3-venv",
    "ca-certificates",
    "nvme-cli",
    "util-linux",
    "ibverbs-utils",
    "ibverbs-providers",
)
USER_ID = 65532
USER_NAME = "kvtier"
LOCAL_REPOSITORY = "kvtier.local/kvtier"
VENV = "/opt/kvtier"
EXTRAS = "gpu"
# the inputs of the app layer: the package's sources (with the generated CSI stubs)
SOURCES = ("pyproject.toml", "README.md", "src", "operator", "agent", "bench")


def cache_dir() -> Path:
    return Path(os.environ.get("KVTIER_CACHE_DIR", Path.home() / ".cache" / "kvtier")) / "images"


def say(msg: str) -> None:
    print(f"[image] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- pure functions


def digest_files(root: Path, entries: Iterable[str], salt: str = "") -> str:
    """sha256 over the relative paths and contents of the files under `entries` (no caches)."""
    h = hashlib.sha256(salt.encode())
    for entry in entries:
        top = root / entry
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(root).as_posix()
            if "__pycache__" in rel or rel.endswith(".pyc") or ".egg-info" in rel:
                continue
            h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def passwd_lines(uid: int = USER_ID, name: str = USER_NAME) -> tuple[str, str]:
    return (f"{name}:x:{uid}:{uid}:{name}:/home/{name}:/usr/sbin/nologin\n", f"{name}:x:{uid}:\n")


def image_config(diff_ids: list[str], entrypoint: list[str], *, user: str = "", env: list[str] | None = None):
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "User": user,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_docker_archive(out: Path, ref: str, layers: list[Path], config: dict) -> Path:
    """A docker-archive tar (manifest.json, config, layer tars) as `ctr images import` reads it."""
    diff_ids = [_sha256_file(layer) for layer in layers]
    config = {**config, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    names = [f"{d.split(':')[1]}/layer.tar" for d in diff_ids]
    manifest = [{"Config": config_name, "RepoTags": [ref], "Layers": names}]
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for layer, name in zip(layers, names, strict=True):
            tar.add(layer, arcname=name)
        _add_bytes(tar, config_name, config_bytes)
        _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())
    tmp.rename(out)
    return out


def single_file_layer(binary: Path, out: Path, name: str) -> Path:
    """A layer holding one static binary at /<name> (the pause and registrar images)."""
    with tarfile.open(out, "w") as tar:
        info = tar.gettarinfo(str(binary), arcname=name)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        with binary.open("rb") as f:
            tar.addfile(info, f)
    return out


@dataclass(frozen=True)
class BuiltImage:
    ref: str
    archive: Path

    @property
    def size(self) -> int:
        return self.archive.stat().st_size


def binary_image(binary: Path, ref: str) -> BuiltImage:
    """A one-layer image whose entrypoint is `binary` (cached by the binary's content)."""
    key = hashlib.sha256(binary.read_bytes() + ref.encode()).hexdigest()[:16]
    folder = cache_dir() / "binary" / key
    archive = folder / "image.tar"
    if not archive.exists():
        folder.mkdir(parents=True, exist_ok=True)
        layer = single_file_layer(binary, folder / "layer.tar", binary.name)
        write_docker_archive(archive, ref, [layer], image_config([], [f"/{binary.name}"]))
    return BuiltImage(ref, archive)


# ---------------------------------------------------------------------------- the kvtier image


def keep_newest(parent: Path, n: int = 2) -> None:
    """Drop all but the `n` most recently built entries of a cache folder (each build of changed
    sources adds one; the disk is shared)."""
    entries = sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in entries[:-n]:
        shutil.rmtree(old, ignore_errors=True)


def _run(argv: list[str], **kw) -> None:
    subprocess.run(argv, check=True, **kw)


def _apt_mirror() -> str:
    """The Debian mirror the host's apt uses (mmdebstrap fetches from it)."""
    for src in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if src.exists():
            for line in src.read_text().splitlines():
                words = line.split()
                if line.startswith("URIs:") and len(words) > 1 and "security" not in words[1]:
                    return words[1]
                if line.startswith("deb ") and len(words) > 1:
                    return words[1]
    return "http://deb.debian.org/debian"


def base_layer() -> Path:
    recipe = json.dumps([SUITE, PACKAGES, passwd_lines(), 1])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    folder = cache_dir() / "base" / key
    layer = folder / "layer.tar"
    if layer.exists():
        say(f"base layer cached ({layer.stat().st_size >> 20} MiB)")
        return layer
    if not shutil.which("mmdebstrap"):
        raise RuntimeError("mmdebstrap is missing (apt-get install mmdebstrap); it builds the base layer")
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    say(f"base layer: mmdebstrap {SUITE} minbase + {' '.join(PACKAGES)}")
    with tempfile.TemporaryDirectory(prefix="kvtier-rootfs-") as tmp:
        root = Path(tmp) / "root"
        _run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                SUITE,
                str(root),
                _apt_mirror(),
            ]
        )
        user, group = passwd_lines()
        with (root / "etc/passwd").open("a") as f:
            f.write(user)
        with (root / "etc/group").open("a") as f:
            f.write(group)
        home = root / "home" / USER_NAME
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, USER_ID, USER_ID)
        _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(layer) + ".tmp", "."])
    os.rename(str(layer) + ".tmp", layer)
    say(f"base layer built in {time.monotonic() - t0:.0f}s ({layer.stat().st_size >> 20} MiB)")
    return layer


def _wheels(root: Path, folder: Path) -> Path:
    """The kvtier wheel (CSI stubs generated first) and every dependency's wheel, on the host."""
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    _run([py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(root)])
    wheel = next(wheels.glob("kvtier-*.whl"))
    _run(
        [py, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(wheels), f"{wheel}[{EXTRAS}]"],
    )
    # the peer transport: its wheel declares torch, which it does not need (installed without deps)
    nixl = _extra(root, "nixl")
    _run(
        [
            py,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels / "nodeps"),
            *nixl,
        ]
    )
    return wheel


def _extra(root: Path, name: str) -> list[str]:
    """One optional extra's requirements from pyproject.toml (its versions live there only)."""
    import tomllib

    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]


def app_layer(base: Path, root: Path, key: str) -> Path:
    folder = cache_dir() / "app" / key
    layer = folder / "layer.tar"
    if layer.exists():
        say(f"app layer cached ({layer.stat().st_size >> 20} MiB)")
        return layer
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvtier-app-") as tmp:
        wheel = _wheels(root, Path(tmp))
        rootfs = Path(tmp) / "root"
        rootfs.mkdir()
        _run(["tar", "-C", str(rootfs), "--numeric-owner", "-xf", str(base)])
        shutil.copytree(Path(tmp) / "wheels", rootfs / "tmp" / "wheels")
        say("app layer: a virtualenv with the kvtier wheel, installed offline in a chroot")
        inside = (
            f"python3 -m venv {VENV} && "
            f"{VENV}/bin/python -m pip install -q --no-index --no-cache-dir --find-links /tmp/wheels "
            f"'/tmp/wheels/{wheel.name}[{EXTRAS}]' && "
            f"{VENV}/bin/python -m pip install -q --no-index --no-cache-dir --no-deps /tmp/wheels/nodeps/*.whl && "
            f"{VENV}/bin/python -m pip uninstall -q -y pip setuptools && "
            f"find {VENV} -name __pycache__ -prune -exec rm -rf {{}} +"
        )
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
        # a private mount namespace: /proc for the chroot vanishes with it
        _run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mount -t proc proc "$1/proc" && exec chroot "$1" sh -c "$2"',
                "sh",
                str(rootfs),
                inside,
            ],
            env=env,
        )
        _run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(layer) + ".tmp", VENV.lstrip("/")])
    os.rename(str(layer) + ".tmp", layer)
    say(f"app layer built in {time.monotonic() - t0:.0f}s ({layer.stat().st_size >> 20} MiB)")
    return layer


def build_kvtier_image(root: Path | None = None) -> BuiltImage:
    root = root or repo_root()
    subprocess.run(["bash", str(root / "hack" / "gen-csi.sh")], cwd=root, check=True)
    base = base_layer()
    recipe = Path(__file__).read_bytes().decode()
    key = digest_files(root, SOURCES, salt=base.parent.name + recipe)[:16]
    version = _app_version(root)
    ref = f"{LOCAL_REPOSITORY}:{version}-{key[:12]}"
    archive = cache_dir() / "kvtier" / key / "image.tar"
    if archive.exists():
        say(f"image cached: {ref}")
        return BuiltImage(ref, archive)
    app = app_layer(base, root, key)
    archive.parent.mkdir(parents=True, exist_ok=True)
    config = image_config(
        [],
        ["kvtier"],
        user=f"{USER_ID}:{USER_ID}",
        env=[f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
    )
    write_docker_archive(archive, ref, [base, app], config)
    keep_newest(cache_dir() / "app")
    keep_newest(cache_dir() / "kvtier")
    return BuiltImage(ref, archive)


def build_engine_image(kvtier: BuiltImage) -> BuiltImage:
    """The demo's engine image: the kvtier image plus numpy (its small CPU model), a stand-in for an
    inference server's image. numpy's wheel is unpacked into the virtualenv as a third layer."""
    import zipfile

    key = hashlib.sha256((kvtier.ref + "numpy").encode()).hexdigest()[:16]
    folder = cache_dir() / "engine" / key
    archive = folder / "image.tar"
    ref = f"{LOCAL_REPOSITORY}-demo-engine:{key[:12]}"
    if archive.exists():
        return BuiltImage(ref, archive)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvtier-engine-") as tmp:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--only-binary=:all:",
                "--no-deps",
                "-d",
                tmp,
                "numpy",
            ]
        )
        wheel = next(Path(tmp).glob("numpy-*.whl"))
        site = Path(tmp) / "root" / VENV.lstrip("/") / "lib" / "python3.11" / "site-packages"
        site.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
        for path in site.rglob("*"):
            if path.is_file() and (path.suffix == ".so" or ".so." in path.name):
                path.chmod(0o755)
        layer = folder / "layer.tar"
        _run(
            [
                "tar",
                "-C",
                str(Path(tmp) / "root"),
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "-cf",
                str(layer),
                VENV.lstrip("/"),
            ]
        )
    with tarfile.open(kvtier.archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))[0]
        config = json.load(tar.extractfile(manifest["Config"]))
        layers = []
        for name in manifest["Layers"]:
            out = folder / (name.split("/")[0] + ".tar")
            with tar.extractfile(name) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            layers.append(out)
    write_docker_archive(archive, ref, [*layers, folder / "layer.tar"], config)
    for layer in layers:
        layer.unlink()
    keep_newest(cache_dir() / "engine")
    return BuiltImage(ref, archive)


def _app_version(root: Path) -> str:
    for line in (root / "charts" / "kvtier" / "Chart.yaml").read_text().splitlines():
        if line.startswith("appVersion:"):
            return line.split(":", 1)[1].strip().strip("\"'")
    raise ValueError("Chart.yaml has no appVersion")


def main(args) -> int:
    from kvtier.dev.node import Containerd, cannot_run_containers

    t0 = time.monotonic()
    image = build_kvtier_image()
    say(f"built in {time.monotonic() - t0:.1f}s")
    reason = cannot_run_containers()
    if reason:
        print(
            f"{image.ref}  {image.size / 2**20:.0f} MiB docker-archive at {image.archive} (not imported: {reason})"
        )
        return 0
    with Containerd.ensure() as ctr:
        ctr.import_image(image)
        print(
            f"{image.ref}  {ctr.image_size(image.ref) / 2**20:.0f} MiB (imported into containerd, namespace k8s.io)"
        )
    return 0
