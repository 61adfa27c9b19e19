"""Arrow shards of tokenized rows, in the IPC stream format that `datasets.Dataset.from_file` reads.

Shards are written row group by row group with a fixed schema, so the same rows always give the
same bytes, and each shard appears under its final name only when complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks import atomic
from tasks.fingerprint import FileHasher

SHARD_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
])
_BATCH_ROWS = 1000


def write_shards(rows: Iterable[dict[str, Any]], out_dir: Path, split: str, rows_per_shard: int) -> list[dict[str, Any]]:
    """Writes rows into `<split>-NNNNN.arrow` files, a record batch at a time so memory does not
    grow with the shard size; returns one {file, rows} record per shard."""
    shards: list[dict[str, Any]] = []
    writer: _ShardWriter | None = None
    for row in rows:
        if writer is None:
            writer = _ShardWriter(out_dir / f"{split}-{len(shards):05d}.arrow")
        writer.add(row)
        if writer.rows == rows_per_shard:
            shards.append(writer.finish())
            writer = None
    if writer is not None or not shards:
        shards.append((writer or _ShardWriter(out_dir / f"{split}-{len(shards):05d}.arrow")).finish())
    return shards


class _ShardWriter:
    """One shard, written under a temporary name and renamed when complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temporary = atomic.temporary_sibling(path)
        self._sink = pa.OSFile(str(self.temporary), "wb")
        self._writer = pa.ipc.new_stream(self._sink, SHARD_SCHEMA)
        self._pending: list[dict[str, Any]] = []
        self.rows = 0

    def add(self, row: dict[str, Any]) -> None:
        self._pending.append(row)
        self.rows += 1
        if len(self._pending) == _BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_batch(pa.record_batch(
                [pa.array([row[name] for row in self._pending], type=field.type) for name, field in zip(SHARD_SCHEMA.names, SHARD_SCHEMA)],
                schema=SHARD_SCHEMA,
            ))
            self._pending.clear()

    def finish(self) -> dict[str, Any]:
        self._flush()
        self._writer.close()
        self._sink.close()
        atomic.commit(self.temporary, self.path)
        return {"file": self.path.name, "rows": self.rows}


SAMPLE_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("messages", pa.string()),
])


class SampleFile:
    """Tokenized samples of pass 1 of prep, appended one by one and read back by index.

    An Arrow IPC *file* (random access), memory-mapped for reading, so that packing can visit
    samples in any order without holding them in memory; only lengths and hashes stay in RAM.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SAMPLE_SCHEMA)
        self._pending: list[tuple[list[int], list[int], str]] = []
        self.lengths: list[int] = []
        self.content_hashes: list[str] = []
        self.trained_tokens_total = 0

    def append(self, tokens: Any, messages: list[dict[str, Any]], content_hash: str) -> None:
        self._pending.append((tokens.input_ids, tokens.labels, json.dumps(messages, ensure_ascii=False)))
        self.lengths.append(len(tokens.input_ids))
        self.content_hashes.append(content_hash)
        self.trained_tokens_total += tokens.trained_tokens
        if len(self._pending) == _BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            columns = list(zip(*self._pending))
            self._writer.write_batch(pa.record_batch(
                [pa.array(column, type=field.type) for column, field in zip(columns, SAMPLE_SCHEMA)], schema=SAMPLE_SCHEMA
            ))
            self._pending.clear()

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()

    def open_reader(self) -> SampleReader:
        return SampleReader(self)


class SampleReader:
    def __init__(self, written: SampleFile) -> None:
        self._source = pa.memory_map(str(written.path))
        self._table = pa.ipc.open_file(self._source).read_all()
        self.lengths = written.lengths
        self.content_hashes = written.content_hashes
        self.trained_tokens_total = written.trained_tokens_total

    def sample(self, index: int) -> tuple[list[int], list[int]]:
        return self._table["input_ids"][index].as_py(), self._table["labels"][index].as_py()

    def messages(self, index: int) -> list[dict[str, Any]]:
        return json.loads(self._table["messages"][index].as_py())

    def close(self) -> None:
        self._table = None
        self._source.close()


def add_hashes(shards: list[dict[str, Any]], out_dir: Path) -> list[dict[str, Any]]:
    hasher = FileHasher()
    return [{**shard, "sha256": hasher.file(out_dir / shard["file"])} for shard in shards]


def load_shards(prep_dir: Path, shards: list[dict[str, Any]]) -> Any:
    """The shards of one split as a `datasets.Dataset` (memory-mapped, not loaded)."""
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(str(prep_dir / shard["file"])) for shard in shards]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
