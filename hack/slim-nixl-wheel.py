"""Cut a NIXL wheel down to what `kvtier bench nixl-gpu` and the agent load, for machines without
network where the wheel has to be carried: the Python API, the UCX and POSIX plugins, UCX's modules
and every bundled library those load (followed through ELF NEEDED entries). Drops NIXL's
expert-parallel kernels, cloud-storage and other plugins, headers and example programs; rewrites
RECORD so that pip installs the result as usual.

Usage: python3 hack/slim-nixl-wheel.py nixl_cu13-1.5.1-cp312-cp312-manylinux_2_28_x86_64.whl OUTDIR
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

KEEP_PLUGINS = {"libplugin_UCX.so", "libplugin_POSIX.so"}


def needed(lib: Path) -> list[str]:
    dynamic = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\).*\[(.+)\]", dynamic)


def slim(wheel: Path, out_dir: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(root)
        package = next(p.name for p in root.glob("nixl_cu*") if p.is_dir() and "." not in p.name)
        for folder in [*root.glob("nixl_ep*"), *root.glob("*.data"), *root.glob("*.scripts")]:
            shutil.rmtree(folder)
        plugins = [*root.glob("*/plugins/*.so"), *root.glob(f"{package}.libs/nixl/*.so")]
        for plugin in plugins:
            if plugin.name not in KEEP_PLUGINS:
                plugin.unlink()
        for perftest in root.glob(f"{package}.libs/ucx/*perftest*"):
            perftest.unlink()
        libraries = {p.name: p for p in root.rglob("*.so*") if p.is_file()}
        roots = [
            p
            for p in libraries.values()
            if p.parent.name in ("plugins", "nixl", "ucx", package) or p.name == "libnixl.so"
        ]
        keep: set[Path] = set()
        while roots:
            lib = roots.pop()
            if lib not in keep:
                keep.add(lib)
                roots += [libraries[n] for n in needed(lib) if n in libraries]
        for lib in libraries.values():
            if lib not in keep:
                lib.unlink()
        record = next(root.glob("*.dist-info/RECORD"))
        lines = []
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p != record):
            data = path.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{path.relative_to(root)},sha256={digest},{len(data)}")
        lines.append(f"{record.relative_to(root)},,")
        record.write_text("\n".join(lines) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / wheel.name
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                z.write(path, path.relative_to(root))
    return out


if __name__ == "__main__":
    made = slim(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{made} {made.stat().st_size / 2**20:.1f} MiB")
