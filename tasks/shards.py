"""Arrow shards of tokenized rows, in the IPC stream format that `datasets.Dataset.from_file` reads.

Shards are written row group by row group with a fixed schema, so the same rows always give the
same bytes, and each shard appears under its final name only when complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks.fingerprint import FileHasher

SHARD_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
])
_BATCH_ROWS = 1000


def write_shards(rows: Iterable[dict[str, Any]], out_dir: Path, split: str, rows_per_shard: int) -> list[dict[str, Any]]:
    """Writes rows into `<split>-NNNNN.arrow` files; returns one {file, rows} record per shard."""
    shards: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        name = f"{split}-{len(shards):05d}.arrow"
        _write_one(pending, out_dir / name)
        shards.append({"file": name, "rows": len(pending)})
        pending.clear()

    for row in rows:
        pending.append(row)
        if len(pending) == rows_per_shard:
            flush()
    if pending or not shards:
        flush()
    return shards


def _write_one(rows: list[dict[str, Any]], path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_stream(sink, SHARD_SCHEMA) as writer:
        for start in range(0, len(rows), _BATCH_ROWS):
            batch = rows[start : start + _BATCH_ROWS]
            writer.write_batch(pa.record_batch(
                [pa.array([row[name] for row in batch], type=field.type) for name, field in zip(SHARD_SCHEMA.names, SHARD_SCHEMA)],
                schema=SHARD_SCHEMA,
            ))
    os.replace(temporary, path)


def add_hashes(shards: list[dict[str, Any]], out_dir: Path) -> list[dict[str, Any]]:
    hasher = FileHasher()
    return [{**shard, "sha256": hasher.file(out_dir / shard["file"])} for shard in shards]


def load_shards(prep_dir: Path, shards: list[dict[str, Any]]) -> Any:
    """The shards of one split as a `datasets.Dataset` (memory-mapped, not loaded)."""
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(str(prep_dir / shard["file"])) for shard in shards]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
