"""The one seam between kvtier and device tools (nvme-cli, lsblk): argv in, (exit code, stdout) out.

`SubprocessRunner` runs the real commands on a node; `RecordedRunner` replays recorded output in
tests and remembers what was asked, so a test can assert which admin commands would have run.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class CommandError(Exception):
    def __init__(self, argv: list[str], code: int, output: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {code}: {output.strip()[:500]}")
        self.argv, self.code, self.output = argv, code, output


class Runner(Protocol):
    def run(self, argv: list[str]) -> tuple[int, str]: ...


def run_text(runner: Runner, argv: list[str]) -> str:
    code, out = runner.run(argv)
    if code:
        raise CommandError(argv, code, out)
    return out


def run_json(runner: Runner, argv: list[str]) -> Any:
    return json.loads(run_text(runner, argv) or "{}")


class SubprocessRunner:
    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout

    def run(self, argv: list[str]) -> tuple[int, str]:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout)
        except FileNotFoundError:
            return 127, f"{argv[0]}: not installed on this node"
        return done.returncode, done.stdout + (done.stderr if done.returncode else "")


@dataclass
class RecordedRunner:
    """Answers from a table of recorded outputs, keyed by the command line; a callable answer can
    model a device whose state changes (a namespace that exists after create-ns)."""

    answers: dict[str, tuple[int, str] | Callable[[], tuple[int, str]]]
    calls: list[str] = field(default_factory=list)

    def run(self, argv: list[str]) -> tuple[int, str]:
        line = " ".join(argv)
        self.calls.append(line)
        answer = self.answers.get(line)
        if answer is None:
            return 1, f"no recorded output for: {line}"
        return answer() if callable(answer) else answer
