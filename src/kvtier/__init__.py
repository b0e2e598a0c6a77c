"""kvtier: tiered KV-cache persistence for LLM inference on Kubernetes."""

from importlib.metadata import PackageNotFoundError, version

try:
    # the one place the version is read: the installed distribution's metadata (pyproject.toml)
    __version__ = version("kvtier")
except PackageNotFoundError:  # a staged copy in an engine image, where kvtier is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
