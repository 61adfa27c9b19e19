"""A data contract over a source's chunk outputs (`tasks.prep_chunks`), validating only the rows
not validated before.

`accepted_rows` lists, per chunk in source order, its key, the rows of it that prep accepted and
its output. Rows are validated in groups, and each group's summary is kept under
`<state_dir>/prep-chunks/contracts/` with the chunks (and accepted rows) it covers: a later prep
reuses every group whose chunks are all unchanged. A source's last chunk is a group of its own,
since appended rows change it. Row-level expectations combine exactly over groups
(`tasks.contracts.merge_summaries`); a contract with an expectation on a column as a whole
(uniqueness, mean, distinct values, ...) is validated in one pass over every row instead, and
the summary says so (`full_pass`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks import atomic
from tasks.config import RunConfig
from tasks.contracts import Contract, merge_summaries, needs_whole_column, validate_frame_groups, validate_frames
from tasks.fingerprint import hash_json
from tasks.prep_chunks import ChunkOutput, chunks_root

CONTRACT_FRAME_ROWS = 50_000


def validate_chunks(cfg: RunConfig, contract: Contract, accepted_rows: list[tuple[str, list[int], ChunkOutput]],
                    last_chunk_ends_source: bool, docs_dir: Path) -> dict[str, Any]:
    """The contract's summary over a source's accepted rows (see the module docstring)."""
    whole_column = [item.type for item in contract.expectations if needs_whole_column(item.type)]
    needed = _columns_named(contract)
    if whole_column:
        summary = validate_frames(contract, [_frame([(output, rows) for _, rows, output in accepted_rows], needed)], docs_dir)
        return {**summary, "full_pass": f"needs every row at once: {', '.join(sorted(set(whole_column)))}"}

    results_dir = chunks_root(cfg) / "contracts"
    contract_key = hash_json(contract.model_dump(mode="json"))[:32]
    identities = [hash_json([key, rows]) for key, rows, _ in accepted_rows]
    remaining = dict(zip(identities, accepted_rows))
    summaries = []
    for record_path in sorted(results_dir.glob(f"{contract_key}-*.json")):
        record = json.loads(record_path.read_text())
        if all(identity in remaining for identity in record["chunks"]):
            summaries.append(record["summary"])
            for identity in record["chunks"]:
                del remaining[identity]
    tail = identities[-1] if last_chunk_ends_source else None
    groups = [[identity for identity in remaining if identity != tail], [tail] if tail in remaining else []]
    groups = [group for group in groups if group]
    if groups:
        frame_groups = [_chunk_frames([(remaining[identity][2], remaining[identity][1]) for identity in group], needed) for group in groups]
        for group, summary in zip(groups, validate_frame_groups(contract, frame_groups, docs_dir)):
            summaries.append(summary)
            results_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_json(results_dir / f"{contract_key}-{hash_json(group)[:32]}.json", {"chunks": group, "summary": summary})
    merged = merge_summaries(contract, summaries)
    return {**merged, "rows_validated_now": sum(len(remaining[identity][1]) for group in groups for identity in group)}


def _columns_named(contract: Contract) -> set[str]:
    names: set[str] = set()
    for item in contract.expectations:
        for name in ("column", "column_A", "column_B"):
            if isinstance(item.kwargs.get(name), str):
                names.add(item.kwargs[name])
        names.update(item.kwargs.get("column_list") or [])
    return names


def _chunk_frames(parts: list[tuple[ChunkOutput, list[int]]], needed: set[str]) -> Iterator[Any]:
    """DataFrames of at most CONTRACT_FRAME_ROWS accepted rows, with the columns the contract names."""
    batch: list[tuple[ChunkOutput, list[int]]] = []
    size = 0
    for output, rows in parts:
        batch.append((output, rows))
        size += len(rows)
        if size >= CONTRACT_FRAME_ROWS:
            yield _frame(batch, needed)
            batch, size = [], 0
    if size:
        yield _frame(batch, needed)


def _frame(parts: list[tuple[ChunkOutput, list[int]]], needed: set[str]) -> Any:
    import pandas as pd

    columns = [{name: value for name, value in json.loads(text).items() if name in needed}
               for output, rows in parts for text in output.rows.column("columns").take(pa.array(rows, type=pa.int64())).to_pylist()]
    return pd.DataFrame(columns)
