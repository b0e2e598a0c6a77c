"""Logging for every kvtier process (operator, agent, CSI plugin, sidecar): one setup, called once at
start. The level comes from `--log-level`, else `KVTIER_LOG` (the chart sets it), else INFO; every
line shows its level. `--log-format json` (or `KVTIER_LOG_FORMAT=json`) writes one JSON object a
line, for clusters whose log pipeline parses them.

kopf's per-object loggers (the `logger` its handlers receive) attach the object they concern; both
formats show it, so a line about a pool says which pool without repeating it in the message.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Mapping

LEVEL_ENV = "KVTIER_LOG"
FORMAT_ENV = "KVTIER_LOG_FORMAT"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(object_prefix)s%(message)s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--log-level` and `--log-format`, for each long-running subcommand."""
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default=None,
        help=f"default: ${LEVEL_ENV}, else INFO",
    )
    parser.add_argument(
        "--log-format", choices=FORMATS, default=None, help=f"default: ${FORMAT_ENV}, else text"
    )


def _object_of(record: logging.LogRecord) -> str | None:
    ref = getattr(record, "k8s_ref", None)  # set by kopf's per-object loggers
    if not isinstance(ref, Mapping) or not ref.get("name"):
        return None
    name = str(ref["name"])
    return f"{ref['namespace']}/{name}" if ref.get("namespace") else name


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        obj = _object_of(record)
        record.object_prefix = "" if obj is None else f"[{obj}] "
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        obj = _object_of(record)
        if obj is not None:
            out["object"] = obj
            out["kind"] = getattr(record, "k8s_ref", {}).get("kind")
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def resolve(
    level: str | None = None, fmt: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """The level and format to use: arguments first, then the environment, then INFO/text. An
    unknown value is a clear error, not a silent INFO."""
    env = os.environ if environ is None else environ
    level = (level or env.get(LEVEL_ENV) or "INFO").strip().upper()
    fmt = (fmt or env.get(FORMAT_ENV) or "text").strip().lower()
    if level not in LEVELS:
        raise SystemExit(
            f"log level {level!r} is not one of {', '.join(LEVELS)} (--log-level or ${LEVEL_ENV})"
        )
    if fmt not in FORMATS:
        raise SystemExit(
            f"log format {fmt!r} is not one of {', '.join(FORMATS)} (--log-format or ${FORMAT_ENV})"
        )
    return level, fmt


def setup(args: argparse.Namespace | None = None) -> None:
    """Configure the root logger once, at a process's start (replaces any handler set before)."""
    level, fmt = resolve(getattr(args, "log_level", None), getattr(args, "log_format", None))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
