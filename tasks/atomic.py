"""Every file and directory loraflow publishes appears at once or not at all.

One policy for every writer: write to a temporary sibling (same directory, so the rename never
crosses a filesystem), flush its bytes to disk, rename it over the destination, then flush the
directory entry. A process killed at any moment leaves the old file, or the new one, and at worst
a `.name.PID.tmp` leftover that no reader looks at. Without the flushes a power cut after the
rename could publish an empty file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def temporary_sibling(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (hidden, unique per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """A file handle whose content replaces `path` only when the block ends without an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    binary = "b" in mode
    try:
        with temporary.open(mode, encoding=None if binary else encoding) as handle:
            yield handle
        commit(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def commit(temporary: Path, path: Path) -> None:
    """Moves a fully written temporary file over `path` (for writers that stream into
    `temporary_sibling(path)` themselves, such as Arrow writers)."""
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text(path: Path, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


def write_json(path: Path, value: Any) -> None:
    """Sorted keys and a trailing newline: the same value always gives the same bytes."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, records: Iterable[Any]) -> None:
    with atomic_open(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def replace_symlink(link: Path, target: Path) -> None:
    """Points `link` at the directory `target` (relative to the link's directory, or absolute);
    readers see the old target or the new one, never no link."""
    link.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(link)
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target, target_is_directory=True)
    os.replace(temporary, link)
    fsync_dir(link.parent)


def publish_dir(work_dir: Path, final_dir: Path) -> bool:
    """Renames a fully written directory into place; False when `final_dir` already exists (a
    concurrent writer of the same content won, and `work_dir` is left to the caller)."""
    fsync_tree(work_dir)
    try:
        os.rename(work_dir, final_dir)
    except OSError:
        if final_dir.exists():
            return False
        raise
    fsync_dir(final_dir.parent)
    return True


def fsync_tree(root: Path) -> None:
    """Flushes every file under `root` (and the directories that name them) to disk."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
