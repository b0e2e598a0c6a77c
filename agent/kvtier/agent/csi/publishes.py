"""The CSI plugin's own record of what it published: a JSON file in its state folder, rewritten
atomically on every change. Unpublish touches a target only when this record says the plugin
mounted it (and removes the folder only when the plugin made it), so a restart loses nothing and a
request for a path the plugin never published changes nothing."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Publish:
    volume_id: str
    pool: str
    namespace: str
    source: str  # the agent's socket folder that was bound
    source_id: tuple[int, int]  # its (st_dev, st_ino): a bind mount of it shows the same
    created_folder: bool  # the plugin made the target folder, so it removes it


class Publishes:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()  # held across a whole publish or unpublish
        self._items: dict[str, Publish] = {}
        if path.exists():
            raw = json.loads(path.read_text() or "{}")
            self._items = {
                target: Publish(**{**fields, "source_id": tuple(fields["source_id"])})
                for target, fields in raw.items()
            }

    def get(self, target: str) -> Publish | None:
        return self._items.get(target)

    def put(self, target: str, publish: Publish) -> None:
        self._items[target] = publish
        self._save()

    def drop(self, target: str) -> None:
        if self._items.pop(target, None) is not None:
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({t: asdict(p) for t, p in self._items.items()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
