"""Arrow shards of tokenized rows, in the IPC stream format that `datasets.Dataset.from_file` reads.

Shards are written row group by row group with a fixed schema, so the same rows always give the
same bytes, and each shard appears under its final name only when complete.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tasks import atomic
from tasks.chat_tokens import IGNORE_INDEX
from tasks.fingerprint import FileHasher

SHARD_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
])
BATCH_ROWS = 1000


def write_shards(batches: Iterable[pa.RecordBatch], out_dir: Path, split: str, rows_per_shard: int) -> list[dict[str, Any]]:
    """Writes record batches of packed rows into `<split>-NNNNN.arrow` files of `rows_per_shard`
    rows (a multiple of the batch size), each under a temporary name until complete; returns one
    {file, rows} record per shard (one empty shard when there are no rows)."""
    shards: list[dict[str, Any]] = []
    writer: _ShardWriter | None = None
    for batch in batches:
        if writer is None:
            writer = _ShardWriter(out_dir / f"{split}-{len(shards):05d}.arrow")
        writer.add(batch)
        if writer.rows >= rows_per_shard:
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
        self.rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def finish(self) -> dict[str, Any]:
        self._writer.close()
        self._sink.close()
        atomic.commit(self.temporary, self.path)
        return {"file": self.path.name, "rows": self.rows}


class PackedSamples:
    """The accepted samples of a prep, where they lie in the memory-mapped chunk outputs
    (`tasks.prep_chunks`), assembled into packed rows with numpy: a slice per sample, no Python
    loop per token, and no copy of a chunk output beyond the samples a batch takes from it.

    A packed row concatenates its samples' `input_ids` and `labels` and restarts `position_ids`
    at 0 per sample; the first label of every sample is -100 (see `tasks.packing.packed_row`:
    the model shifts labels by one, so that label would be predicted from the previous sample)."""

    def __init__(self, sample_tables: list[pa.Table], chunk_of: np.ndarray, index_in_chunk: np.ndarray) -> None:
        self.input_ids = [_flat(table.column("input_ids")) for table in sample_tables]
        self.labels = [_flat(table.column("labels")) for table in sample_tables]
        self.chunk_of, self.index_in_chunk = chunk_of, index_in_chunk

    def batches(self, bins: list[list[int]], rows_per_batch: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        for start in range(0, len(bins), rows_per_batch):
            group = bins[start : start + rows_per_batch]
            order = list(itertools.chain.from_iterable(group))
            input_ids, lengths = self._gather(self.input_ids, order)
            labels, _ = self._gather(self.labels, order)
            sample_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            labels[sample_starts] = IGNORE_INDEX
            # 0, 1, 2, ... restarting at every sample start: ones, with each start stepping back to 0.
            positions = np.ones(len(input_ids), dtype=np.int32)
            positions[0] = 0
            positions[sample_starts[1:]] = 1 - lengths[:-1]
            np.cumsum(positions, out=positions)
            bin_starts = np.concatenate([[0], np.cumsum([len(bin_) for bin_ in group])[:-1]]).astype(np.int64)
            row_offsets = pa.array(np.concatenate([[0], np.cumsum(np.add.reduceat(lengths, bin_starts))]).astype(np.int32))
            yield pa.record_batch([pa.ListArray.from_arrays(row_offsets, pa.array(values)) for values in (input_ids, labels, positions)],
                                  schema=SHARD_SCHEMA)

    def _gather(self, columns: list[tuple[np.ndarray, np.ndarray]], order: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The values of the samples `order`, concatenated in that order, and each sample's length."""
        pieces = []
        for sample in order:
            values, offsets = columns[self.chunk_of[sample]]
            index = self.index_in_chunk[sample]
            pieces.append(values[offsets[index] : offsets[index + 1]])
        return np.concatenate(pieces), np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list<int32> column's values and offsets as numpy arrays (views of the memory map)."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return array.values.to_numpy(), array.offsets.to_numpy().astype(np.int64)


def add_hashes(shards: list[dict[str, Any]], out_dir: Path) -> list[dict[str, Any]]:
    hasher = FileHasher()
    return [{**shard, "sha256": hasher.file(out_dir / shard["file"])} for shard in shards]


def load_shards(prep_dir: Path, shards: list[dict[str, Any]]) -> Any:
    """The shards of one split as a `datasets.Dataset` (memory-mapped, not loaded)."""
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(str(prep_dir / shard["file"])) for shard in shards]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
