"""prep: sources -> messages -> tokens with masked labels -> contract validation -> split ->
packed Arrow shards + manifest.

Its cost grows with what changed: sources are read in content-addressed chunks whose tokenized
rows are cached (`tasks.prep_chunks`), so a nightly run on a file that grew by 1% tokenizes the new
rows only, on every core. What needs the whole dataset runs over the chunk outputs, which are
memory-mapped and never all in memory: exact deduplication and dropping test-set rows (first
occurrence wins, in source order), the contract (rows validated before are not validated again,
`validate_chunks`), the split by content hash, packing by lengths alone, and the shards.

Reads only the tokenizer of the base model, never its weights. The stage is declared in
`tasks/stages.py`: its key changes when the data, the contracts, the tokenizer, the prep settings
or this code do; train, eval and export re-run only when the shards or the items it publishes change.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from tasks import atomic
from tasks.chat_tokens import ContentError
from tasks.config import DatasetConfig, RunConfig
from tasks.contract_chunks import CONTRACT_FRAME_ROWS, validate_chunks
from tasks.contracts import ContractError, describe_failures, load_contract, validate_frames
from tasks.fingerprint import FileHasher, hash_json
from tasks.formats import DatasetError, Rejected, check_source, read_conversations
from tasks.packing import pack_lengths
from tasks.prep_chunks import (
    TOKENIZE_BATCH,
    ChunkBuilder,
    ChunkOutput,
    SourceChunk,
    chunk_key,
    contract_columns,
    encoder_for,
    is_built,
    recipe,
    source_chunks,
    tokenize_batch,
    tokenizer_key,
)
from tasks.shards import PackedSamples, add_hashes, write_shards

log = logging.getLogger("loraflow.prep")

ROWS_PER_SHARD = 50_000
VAL_ITEMS = "val_messages.jsonl"
PROBE_ITEMS = "probe_messages.jsonl"
PROBE_ROWS = 16
TEST_ITEMS = "test_messages.jsonl"
PREP_REPORT_KEYS = (
    "rows_in", "rows_accepted", "rows_quarantined", "train_samples", "val_samples", "tokens", "trained_tokens", "packing_efficiency",
)
LENGTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def build(cfg: RunConfig, work_dir: Path, upstream: dict[str, Any]) -> dict[str, Any]:
    """The prep stage (see the module docstring): its manifest fields, with every file in `work_dir`."""
    from tasks.stages import TOKENIZE_LIBRARIES, library_versions, tokenizer_identity

    tokenizer = tokenizer_key(cfg, tokenizer_identity(cfg, FileHasher()), library_versions(TOKENIZE_LIBRARIES))
    encoder = encoder_for(cfg, tokenizer)

    # The pinned test set first: its rows are held out of training.
    test_set = read_test_set(cfg, encoder, work_dir) if cfg.eval.test_set else None
    held_out = test_set.pop("hashes") if test_set else {}

    # Pass 1: every source as chunks; the ones not built before are built now, on every core.
    started = time.monotonic()
    chunked: list[list[tuple[SourceChunk, str]]] = []
    with ChunkBuilder(cfg, encoder) as builder:
        for dataset in cfg.datasets:
            check_source(dataset)
            recipe_key = recipe(cfg, dataset, tokenizer)
            chunked.append([])
            for chunk in source_chunks(dataset, cfg.dataset_max_rows):
                key = chunk_key(recipe_key, chunk)
                if not is_built(cfg, key):
                    builder.add(dataset, chunk, key)
                # What assembly needs of a chunk: never its rows (memory stays flat).
                chunked[-1].append((SourceChunk(chunk.first_line, chunk.rows, chunk.digest, chunk.ends_source), key))
            if not chunked[-1]:
                raise DatasetError(f"{dataset.path}: the dataset is empty; add rows or remove it from `datasets`")
    chunks_total = sum(len(chunks) for chunks in chunked)
    seconds = {"read_and_tokenize": time.monotonic() - started}

    # Assembly: deduplication and test-set rows across chunks, quarantine, the contract.
    assembly = Assembly(cfg, held_out)
    with (work_dir / "quarantine.jsonl").open("w", encoding="utf-8") as quarantine:
        sources = [assembly.add_source(index, dataset, chunks, quarantine, work_dir)
                   for index, (dataset, chunks) in enumerate(zip(cfg.datasets, chunked))]
    rows_in = sum(source["rows_in"] for source in sources)
    rows_accepted = sum(source["rows_accepted"] for source in sources)
    rows_quarantined = sum(source["rows_quarantined"] for source in sources)
    rows_overlapping = sum(source["rows_overlapping_test_set"] for source in sources)
    if rows_in != rows_accepted + rows_quarantined:
        raise AssertionError(f"row accounting broke: {rows_in} in, {rows_accepted} accepted, {rows_quarantined} quarantined")
    # Rows held out for the test set are a decision, not bad data: they do not count against the threshold.
    _check_quarantine(cfg, rows_in, rows_quarantined - rows_overlapping, work_dir / "quarantine.jsonl")
    for index, source in enumerate(sources):
        if source["contract"] and not source["contract"]["passed"]:
            raise ContractError(describe_failures(source["contract"], cfg.datasets[index].path))

    seconds["assemble"] = time.monotonic() - started - seconds["read_and_tokenize"] - assembly.contract_seconds
    seconds["contract"] = assembly.contract_seconds

    # Pass 2: split by content, pack by length, gather samples into shards.
    lengths = assembly.lengths()
    is_val = split_train_val(assembly.content_hashes, cfg.val_set_size)
    train_indices = [i for i, val in enumerate(is_val) if not val]
    val_indices = [i for i, val in enumerate(is_val) if val]
    train_bins = _bins(cfg, lengths, train_indices)
    val_bins = _bins(cfg, lengths, val_indices)
    packed = assembly.packed_samples()
    train_shards = add_hashes(write_shards(packed.batches(train_bins), work_dir, "train", ROWS_PER_SHARD), work_dir)
    val_shards = add_hashes(write_shards(packed.batches(val_bins), work_dir, "val", ROWS_PER_SHARD), work_dir)
    val_messages = (assembly.messages(index) for index in val_indices)
    atomic.write_jsonl(work_dir / VAL_ITEMS, ({"messages": messages} for messages in val_messages if messages))
    # Without a val split (`val_set_size: 0`) the export still verifies its merge on some prompts:
    # a few training conversations (verification compares two models, it scores nothing).
    probe_indices = [] if val_indices else train_indices[:PROBE_ROWS]
    atomic.write_jsonl(work_dir / PROBE_ITEMS, ({"messages": assembly.messages(index)} for index in probe_indices))
    train_tokens = int(sum(lengths[i] for i in train_indices))
    efficiency = train_tokens / (len(train_bins) * cfg.sequence_len) if train_bins else 0.0

    seconds["pack_and_write"] = time.monotonic() - started - sum(seconds.values())
    manifest = {
        "sources": sources,
        "rows_in": rows_in,
        "rows_accepted": rows_accepted,
        "rows_quarantined": rows_quarantined,
        "documents_split": sum(source["documents_split"] for source in sources),
        "fragments_made": sum(source["fragments_made"] for source in sources),
        "chunks": {"total": chunks_total, "built": builder.built, "reused": chunks_total - builder.built},
        # Where the time went (the first and the later runs of a growing source differ in the first part).
        "seconds": {phase: round(value, 2) for phase, value in seconds.items()},
        "train_samples": len(train_indices),
        "val_samples": len(val_indices),
        "train_rows": len(train_bins),
        "val_rows": len(val_bins),
        "tokens": int(sum(lengths)),
        "trained_tokens": assembly.trained_tokens,
        "length_histogram": _histogram(lengths),
        "packing_efficiency": round(efficiency, 5),
        "train_shards": train_shards,
        "val_shards": val_shards,
        "val_items": VAL_ITEMS,
        "val_items_sha256": FileHasher().file(work_dir / VAL_ITEMS),
        "probe_items": PROBE_ITEMS,
        "probe_items_sha256": FileHasher().file(work_dir / PROBE_ITEMS),
        "rows_overlapping_test_set": rows_overlapping,
        **({"test_set": test_set, "test_items": TEST_ITEMS, "test_items_sha256": test_set["items_sha256"]} if test_set else {}),
    }
    if rows_overlapping:
        log.warning("prep: %d training rows also occur in the test set; they were dropped from training (see quarantine.jsonl)",
                    rows_overlapping)
    log.info(
        "prep: %d rows in, %d accepted, %d quarantined; %d train / %d val samples; packing efficiency %.4f; "
        "%d of %d chunks reused",
        rows_in, rows_accepted, rows_quarantined, len(train_indices), len(val_indices), efficiency,
        chunks_total - builder.built, chunks_total,
    )
    return manifest


@dataclass
class Assembly:
    """The accepted samples of every source in order, where they lie in the chunk outputs, and
    the state that spans chunks: the first occurrence of each row (exact deduplication) and the
    test set's rows."""

    cfg: RunConfig
    held_out: dict[str, int]
    outputs: list[ChunkOutput] = field(default_factory=list)
    seen: dict[str, tuple[str, int]] = field(default_factory=dict)
    chunk_of: list[np.ndarray] = field(default_factory=list)
    index_in_chunk: list[np.ndarray] = field(default_factory=list)
    content_hashes: list[str] = field(default_factory=list)
    # Per sample: the row whose messages it carries (chunk, row), or -1 for a document's later fragments.
    message_rows: list[tuple[int, int]] = field(default_factory=list)
    sample_lengths: list[np.ndarray] = field(default_factory=list)
    trained_tokens: int = 0
    contract_seconds: float = 0.0

    def add_source(self, source: int, dataset: DatasetConfig, chunks: list[tuple[SourceChunk, str]], quarantine: Any,
                   work_dir: Path) -> dict[str, Any]:
        counts = {"rows_in": 0, "rows_accepted": 0, "rows_quarantined": 0, "rows_truncated": 0, "rows_duplicate": 0,
                  "rows_overlapping_test_set": 0, "documents_split": 0, "fragments_made": 0}
        accepted_rows: list[tuple[str, list[int], ChunkOutput]] = []

        def reject(line: int, reason: str, raw: str) -> None:
            counts["rows_quarantined"] += 1
            quarantine.write(json.dumps(Rejected(dataset.path, line, reason, raw).as_record(), ensure_ascii=False) + "\n")

        for chunk, key in chunks:
            output = ChunkOutput.open(self.cfg, key)
            number = len(self.outputs)
            self.outputs.append(output)
            rows = output.rows.select(["line", "reason", "raw", "content_hash", "truncated", "fragments", "first_sample",
                                       "samples"]).to_pydict()
            accepted, samples = [], []
            for index, content_hash in enumerate(rows["content_hash"]):
                counts["rows_in"] += 1
                line = chunk.first_line + rows["line"][index]
                if content_hash is None:
                    reject(line, rows["reason"][index], rows["raw"][index])
                    continue
                if content_hash in self.held_out:
                    counts["rows_overlapping_test_set"] += 1
                    reject(line, f"also in the test set (eval.test_set, line {self.held_out[content_hash]}): held out, never trained on",
                           self._messages_record(output, index))
                    continue
                if self.cfg.dataset_exact_deduplication:
                    if content_hash in self.seen:
                        first_source, first_line = self.seen[content_hash]
                        counts["rows_duplicate"] += 1
                        reject(line, f"exact duplicate of row {first_line} of {first_source}", self._messages_record(output, index))
                        continue
                    self.seen[content_hash] = (dataset.path, line)
                counts["rows_truncated"] += rows["truncated"][index]
                if rows["fragments"][index]:
                    counts["documents_split"] += 1
                    counts["fragments_made"] += rows["fragments"][index]
                if rows["reason"][index] is not None:
                    reject(line, rows["reason"][index], rows["raw"][index])
                    continue
                counts["rows_accepted"] += 1
                accepted.append(index)
                first = rows["first_sample"][index]
                for piece in range(rows["samples"][index]):
                    samples.append(first + piece)
                    self.content_hashes.append(content_hash)
                    self.message_rows.append((number, index) if piece == 0 else (-1, -1))
            selected = np.array(samples, dtype=np.int64)
            self.chunk_of.append(np.full(len(selected), number, dtype=np.int64))
            self.index_in_chunk.append(selected)
            self.sample_lengths.append(pc.list_value_length(output.samples.column("input_ids")).to_numpy()[selected].astype(np.int64))
            self.trained_tokens += int(output.samples.column("trained").to_numpy()[selected].sum()) if len(selected) else 0
            accepted_rows.append((key, accepted, output))

        contract_summary = None
        if dataset.contract:
            contract = load_contract(Path(self.cfg.contract.dir), dataset.contract)
            docs_dir = work_dir / "data_docs" / f"source-{source}"
            started = time.monotonic()
            contract_summary = validate_chunks(self.cfg, contract, accepted_rows, chunks[-1][0].ends_source, docs_dir)
            self.contract_seconds += time.monotonic() - started
            if (docs_dir / "index.html").exists():
                contract_summary["data_docs"] = str(docs_dir.relative_to(work_dir) / "index.html")
        return {"type": dataset.type, **counts, "contract": contract_summary}

    @staticmethod
    def _messages_record(output: ChunkOutput, index: int) -> str:
        # The same text as json.dumps({"messages": messages}, ensure_ascii=False).
        return '{"messages": ' + output.rows.column("messages")[index].as_py() + "}"

    def lengths(self) -> np.ndarray:
        return np.concatenate(self.sample_lengths) if self.sample_lengths else np.zeros(0, dtype=np.int64)

    def packed_samples(self) -> PackedSamples:
        return PackedSamples([output.samples for output in self.outputs], np.concatenate(self.chunk_of),
                             np.concatenate(self.index_in_chunk))

    def messages(self, sample: int) -> list[dict[str, Any]]:
        chunk, row = self.message_rows[sample]
        return [] if chunk < 0 else json.loads(self.outputs[chunk].rows.column("messages")[row].as_py())


def read_test_set(cfg: RunConfig, tokenizer: Any, work_dir: Path) -> dict[str, Any]:
    """Reads the pinned test set (`eval.test_set`), checks it against its own contract and writes its
    items to `test_messages.jsonl`. A test set must be clean: any unreadable row, or one without an
    assistant turn to score, fails prep naming the file and line. Returns the manifest's `test_set`
    summary, plus `hashes` (row content hash -> line) for dropping its rows from training."""
    dataset = cfg.eval.test_set
    assert dataset is not None
    check_source(dataset)
    hashes: dict[str, int] = {}
    items: list[dict[str, Any]] = []
    problems: list[str] = []
    columns: list[dict[str, Any]] = []
    for chunk in _batches(read_conversations(dataset), TOKENIZE_BATCH):
        conversations = []
        for item in chunk:
            if isinstance(item, Rejected):
                problems.append(f"line {item.line}: {item.reason}")
            elif item.kind != "chat" or not any(message["role"] == "assistant" for message in item.messages):
                problems.append(f"line {item.line}: no assistant turn to score")
            else:
                conversations.append(item)
        for item, tokens in zip(conversations, tokenize_batch(cfg, dataset, tokenizer, conversations)):
            hashes.setdefault(hash_json({"kind": item.kind, "messages": item.messages}), item.line)
            items.append({"messages": item.messages})
            columns.append(contract_columns(item, None if isinstance(tokens, ContentError) else tokens))
    if problems:
        shown = "; ".join(problems[:5])
        raise DatasetError(f"eval.test_set {dataset.path}: {len(problems)} row(s) cannot be scored ({shown}); fix or remove them")
    if not items:
        raise DatasetError(f"eval.test_set {dataset.path} has no rows")
    contract_summary = None
    if dataset.contract:
        docs_dir = work_dir / "data_docs" / "test-set"
        contract_summary = validate_frames(load_contract(Path(cfg.contract.dir), dataset.contract), _frames(iter(columns)), docs_dir)
        if not contract_summary["passed"]:
            raise ContractError(describe_failures(contract_summary, dataset.path))
    atomic.write_jsonl(work_dir / TEST_ITEMS, items)
    return {"rows": len(items), "items_sha256": FileHasher().file(work_dir / TEST_ITEMS), "contract": contract_summary,
            "hashes": hashes}


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_contract(dataset: DatasetConfig, contract_dir: Path, tokenizer: Any | None, docs_dir: Path | None = None) -> dict[str, Any]:
    """Validates one source against its contract without running the pipeline (the
    `loraflow contract check` command). Without a tokenizer, token columns are absent."""
    check_source(dataset)
    contract = load_contract(contract_dir, dataset.contract or "")
    counts = {"rows_in": 0, "rows_rejected": 0}
    settings = RunConfig.model_construct(train_on_inputs=False)

    def rows() -> Iterator[dict[str, Any]]:
        for chunk in _batches(read_conversations(dataset), TOKENIZE_BATCH):
            counts["rows_in"] += len(chunk)
            items = [item for item in chunk if not isinstance(item, Rejected)]
            counts["rows_rejected"] += len(chunk) - len(items)
            tokenized = tokenize_batch(settings, dataset, tokenizer, items) if tokenizer else [None] * len(items)
            for item, tokens in zip(items, tokenized):
                yield contract_columns(item, None if isinstance(tokens, ContentError) else tokens)

    summary = validate_frames(contract, _frames(rows()), docs_dir)
    return {**summary, **counts}


def _frames(rows: Iterator[dict[str, Any]]) -> Iterator[Any]:
    import pandas as pd

    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == CONTRACT_FRAME_ROWS:
            yield pd.DataFrame(chunk)
            chunk = []
    if chunk:
        yield pd.DataFrame(chunk)


def _check_quarantine(cfg: RunConfig, rows_in: int, rows_quarantined: int, quarantine_file: Path) -> None:
    if rows_in and rows_quarantined / rows_in > cfg.contract.max_rejected_fraction:
        reasons: list[str] = []
        with quarantine_file.open(encoding="utf-8") as handle:
            for line in handle:
                reason = json.loads(line)["reason"]
                if reason not in reasons:
                    reasons.append(reason)
                if len(reasons) == 5:
                    break
        raise DatasetError(
            f"{rows_quarantined} of {rows_in} rows ({rows_quarantined / rows_in:.1%}) were quarantined, above "
            f"contract.max_rejected_fraction={cfg.contract.max_rejected_fraction}; see {quarantine_file}. "
            f"Reasons include: {'; '.join(reasons)}"
        )
    if rows_in == rows_quarantined:
        raise DatasetError("no rows left after quarantine; nothing to train on")


def split_train_val(content_hashes: list[str], val_set_size: float) -> list[bool]:
    """Whether each row is a val row, by a hash of its content: appending rows never moves
    existing rows between splits (for a fraction), and file order does not matter."""
    if val_set_size == 0:
        return [False] * len(content_hashes)
    if val_set_size < 1:
        threshold = int(val_set_size * 2**32)
        return [int(content_hash[:8], 16) < threshold for content_hash in content_hashes]
    ranked = sorted(range(len(content_hashes)), key=content_hashes.__getitem__)
    chosen = set(ranked[: int(val_set_size)])
    return [i in chosen for i in range(len(content_hashes))]


def _bins(cfg: RunConfig, lengths: list[int], indices: list[int]) -> list[list[int]]:
    """Rows as lists of sample indices: packed bins, or one sample per row without packing."""
    if not indices:
        return []
    if not cfg.sample_packing:
        return [[index] for index in indices]
    return [[indices[i] for i in bin_] for bin_ in pack_lengths([lengths[i] for i in indices], cfg.sequence_len, seed=cfg.seed)]


def _histogram(lengths: np.ndarray) -> dict[str, int]:
    counts = np.bincount(np.searchsorted(np.array(LENGTH_BUCKETS), lengths, side="left"), minlength=len(LENGTH_BUCKETS) + 1)
    names = [f"<={bucket}" for bucket in LENGTH_BUCKETS] + ["longer"]
    return {name: int(count) for name, count in zip(names, counts) if count}


def report(cfg: RunConfig, manifest: dict[str, Any]) -> None:
    """Prefect artifacts of a prep run: the row counts and the data contract's results."""
    from prefect.artifacts import create_table_artifact

    from tasks.stage import artifact_key

    create_table_artifact(
        table=[{key: manifest[key] for key in PREP_REPORT_KEYS}],
        key=artifact_key(cfg.name, "prep-report"),
        description="Rows in / accepted / quarantined, tokens and packing",
    )
    checks = [
        {"source": index, **check}
        for index, source in enumerate(manifest["sources"])
        for check in (source["contract"] or {}).get("checks", [])
    ]
    if checks:
        create_table_artifact(table=checks, key=artifact_key(cfg.name, "data-contract"), description="Data contract results")
