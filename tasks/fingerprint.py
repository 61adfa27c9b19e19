"""Content hashes that decide whether a stage must run again.

A fingerprint covers exactly what determines a stage's output: its config section, the upstream
fingerprint, the bytes of the files it reads and the source of its code. Paths are left out on
purpose, so moving `output_dir` or the data directory does not invalidate anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
TASKS_DIR = Path(__file__).resolve().parent


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(value: Any) -> str:
    """Hash of canonical JSON, so dict order and formatting never change a fingerprint."""
    return hash_bytes(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


class FileHasher:
    """Hashes file contents, remembering results by (path, size, mtime) in a small JSON file.

    Re-hashing a multi-GB base model on every nightly run would cost minutes; a file whose size
    and modification time are unchanged is taken to have unchanged content.
    """

    def __init__(self, memo_path: Path | None = None) -> None:
        self.memo_path = memo_path
        self._memo: dict[str, str] = {}
        if memo_path is not None and memo_path.is_file():
            try:
                self._memo = json.loads(memo_path.read_text())
            except (ValueError, OSError):
                self._memo = {}  # a damaged memo only costs a re-hash
        self._dirty = False

    def file(self, path: Path) -> str:
        stat = path.stat()
        memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if memo_key not in self._memo:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
            self._memo[memo_key] = digest.hexdigest()
            self._dirty = True
        return self._memo[memo_key]

    def tree(self, root: Path) -> str:
        """Hash of every file under `root` with its relative path (hidden files excluded)."""
        entries = {
            str(path.relative_to(root)): self.file(path)
            for path in sorted(root.rglob("*"))
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
        }
        return hash_json(entries)

    def save(self) -> None:
        if self._dirty and self.memo_path is not None:
            from tasks import atomic

            atomic.write_text(self.memo_path, json.dumps(self._memo))
            self._dirty = False


def code_version(*module_names: str) -> str:
    """Hash of the source of the given `tasks` modules: editing stage code re-runs the stage."""
    return hash_json({name: hash_bytes((TASKS_DIR / f"{name}.py").read_bytes()) for name in module_names})
