"""prep: sources -> messages -> tokens with masked labels -> contract validation -> split ->
packed Arrow shards + manifest.

Two streaming passes keep memory flat however large the sources are: the first reads, converts
and tokenizes row by row into a memory-mapped sample file (quarantining bad rows as it goes); the
second packs by lengths alone and copies samples into shards. Reads only the tokenizer of the base
model, never its weights. The stage is declared in `tasks/stages.py`: its key changes when the
data, the contracts, the tokenizer, the prep settings or this code do; train, eval and export
re-run only when the shards or the val items it publishes change.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks import atomic, hub
from tasks.chat_tokens import ContentError, TokenizedConversation, render_conversation, tokenize_rendered, tokenize_segments
from tasks.config import DatasetConfig, RunConfig
from tasks.contracts import ContractError, describe_failures, load_contract, validate_frames
from tasks.fingerprint import FileHasher, hash_json
from tasks.formats import Conversation, DatasetError, Rejected, check_source, read_conversations
from tasks.fragments import FragmentError, fragment_settings, split_row
from tasks.packing import pack_lengths, packed_row
from tasks.shards import SampleFile, add_hashes, write_shards

log = logging.getLogger("loraflow.prep")

ROWS_PER_SHARD = 50_000
CONTRACT_CHUNK_ROWS = 100_000
TOKENIZE_BATCH = 512
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
    from tasks.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg, hub.base_model_dir(cfg))

    # The pinned test set first: its rows are held out of training.
    test_set = read_test_set(cfg, tokenizer, work_dir) if cfg.eval.test_set else None
    held_out = test_set.pop("hashes") if test_set else {}

    # Pass 1: every row becomes a tokenized sample or a quarantine record.
    samples = SampleFile(work_dir / "samples.tmp.arrow")
    sources = []
    with (work_dir / "quarantine.jsonl").open("w", encoding="utf-8") as quarantine:
        seen_hashes: dict[str, tuple[str, int]] = {}
        for index, dataset in enumerate(cfg.datasets):
            sources.append(_read_source(cfg, index, dataset, tokenizer, samples, quarantine, seen_hashes, work_dir, held_out))
    samples.close()

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

    # Pass 2: split by content, pack by length, copy samples into shards.
    reader = samples.open_reader()
    is_val = split_train_val(reader.content_hashes, cfg.val_set_size)
    train_indices = [i for i, val in enumerate(is_val) if not val]
    val_indices = [i for i, val in enumerate(is_val) if val]
    train_bins = _bins(cfg, reader.lengths, train_indices)
    val_bins = _bins(cfg, reader.lengths, val_indices)
    train_shards = add_hashes(write_shards(_packed_rows(reader, train_bins), work_dir, "train", ROWS_PER_SHARD), work_dir)
    val_shards = add_hashes(write_shards(_packed_rows(reader, val_bins), work_dir, "val", ROWS_PER_SHARD), work_dir)
    val_messages = (reader.messages(index) for index in val_indices)
    atomic.write_jsonl(work_dir / VAL_ITEMS, ({"messages": messages} for messages in val_messages if messages))
    # Without a val split (`val_set_size: 0`) the export still verifies its merge on some prompts:
    # a few training conversations (verification compares two models, it scores nothing).
    probe_indices = [] if val_indices else train_indices[:PROBE_ROWS]
    atomic.write_jsonl(work_dir / PROBE_ITEMS, ({"messages": reader.messages(index)} for index in probe_indices))
    lengths = reader.lengths
    train_tokens = sum(lengths[i] for i in train_indices)
    efficiency = train_tokens / (len(train_bins) * cfg.sequence_len) if train_bins else 0.0
    trained_tokens = reader.trained_tokens_total
    reader.close()
    (work_dir / "samples.tmp.arrow").unlink()

    manifest = {
        "sources": sources,
        "rows_in": rows_in,
        "rows_accepted": rows_accepted,
        "rows_quarantined": rows_quarantined,
        "documents_split": sum(source["documents_split"] for source in sources),
        "fragments_made": sum(source["fragments_made"] for source in sources),
        "train_samples": len(train_indices),
        "val_samples": len(val_indices),
        "train_rows": len(train_bins),
        "val_rows": len(val_bins),
        "tokens": sum(lengths),
        "trained_tokens": trained_tokens,
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
        "prep: %d rows in, %d accepted, %d quarantined; %d train / %d val samples; packing efficiency %.4f",
        rows_in, rows_accepted, rows_quarantined, len(train_indices), len(val_indices), efficiency,
    )
    return manifest


def _read_source(
    cfg: RunConfig, index: int, dataset: DatasetConfig, tokenizer: Any, samples: SampleFile, quarantine: Any,
    seen_hashes: dict[str, tuple[str, int]], work_dir: Path, held_out: dict[str, int] | None = None,
) -> dict[str, Any]:
    check_source(dataset)
    held_out = held_out or {}
    counts = {"rows_in": 0, "rows_accepted": 0, "rows_quarantined": 0, "rows_truncated": 0, "rows_duplicate": 0,
              "rows_overlapping_test_set": 0, "documents_split": 0, "fragments_made": 0}

    def reject(record: Rejected) -> None:
        counts["rows_quarantined"] += 1
        quarantine.write(json.dumps(record.as_record(), ensure_ascii=False) + "\n")

    def accepted_rows() -> Iterator[dict[str, Any]]:
        for chunk in _batches(itertools.islice(read_conversations(dataset), cfg.dataset_max_rows), TOKENIZE_BATCH):
            conversations = []
            for item in chunk:
                counts["rows_in"] += 1
                if isinstance(item, Rejected):
                    reject(item)
                    continue
                content_hash = hash_json({"kind": item.kind, "messages": item.messages})
                if content_hash in held_out:
                    counts["rows_overlapping_test_set"] += 1
                    reject(_rejected(item, f"also in the test set (eval.test_set, line {held_out[content_hash]}): held out, "
                                           "never trained on"))
                    continue
                if cfg.dataset_exact_deduplication:
                    if content_hash in seen_hashes:
                        first_source, first_line = seen_hashes[content_hash]
                        counts["rows_duplicate"] += 1
                        reject(_rejected(item, f"exact duplicate of row {first_line} of {first_source}"))
                        continue
                    seen_hashes[content_hash] = (item.source, item.line)
                conversations.append((item, content_hash))
            tokenized = _tokenize_batch(cfg, dataset, tokenizer, [item for item, _ in conversations])
            for (item, content_hash), tokens in zip(conversations, tokenized):
                if isinstance(tokens, ContentError):
                    reject(_rejected(item, str(tokens)))
                    continue
                pieces = [tokens]
                if len(tokens.input_ids) > cfg.sequence_len:
                    if cfg.excess_length_strategy == "quarantine":
                        reject(_rejected(item, f"{len(tokens.input_ids)} tokens, longer than sequence_len={cfg.sequence_len}; "
                                               "raise sequence_len, shorten the row, or set excess_length_strategy: split (or truncate)"))
                        continue
                    if cfg.excess_length_strategy == "split":
                        try:
                            pieces = split_row(tokenizer, item.kind, item.messages, dataset.roles_to_train, tokens, fragment_settings(cfg))
                        except FragmentError as error:
                            reject(_rejected(item, f"{len(tokens.input_ids)} tokens, longer than sequence_len={cfg.sequence_len}, "
                                                   f"and cannot be split: {error}"))
                            continue
                        counts["documents_split"] += 1
                        counts["fragments_made"] += len(pieces)
                    else:
                        pieces = [tokens.truncated(cfg.sequence_len)]
                        counts["rows_truncated"] += 1
                if sum(piece.trained_tokens for piece in pieces) == 0:
                    reject(_rejected(item, "no trained tokens after masking (or truncation)"))
                    continue
                counts["rows_accepted"] += 1
                # Fragments share the row's hash (one split for the whole document) and only the first
                # carries its messages: the document is one eval item, not one per fragment.
                for position, piece in enumerate(pieces):
                    samples.append(piece, item.messages if position == 0 else [], content_hash)
                yield _contract_columns(item, tokens)

    contract_summary = None
    if dataset.contract:
        contract = load_contract(Path(cfg.contract.dir), dataset.contract)
        docs_dir = work_dir / "data_docs" / f"source-{index}"
        contract_summary = validate_frames(contract, _frames(accepted_rows()), docs_dir)
        contract_summary["data_docs"] = str(docs_dir.relative_to(work_dir) / "index.html")
    else:
        for _ in accepted_rows():
            pass
    return {"type": dataset.type, **counts, "contract": contract_summary}


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
        for item, tokens in zip(conversations, _tokenize_batch(cfg, dataset, tokenizer, conversations)):
            hashes.setdefault(hash_json({"kind": item.kind, "messages": item.messages}), item.line)
            items.append({"messages": item.messages})
            columns.append(_contract_columns(item, None if isinstance(tokens, ContentError) else tokens))
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


def _rejected(item: Conversation, reason: str) -> Rejected:
    return Rejected(item.source, item.line, reason, json.dumps({"messages": item.messages}, ensure_ascii=False))


def _tokenize_batch(
    cfg: RunConfig, dataset: DatasetConfig, tokenizer: Any, items: list[Conversation]
) -> list[TokenizedConversation | ContentError]:
    """Tokenized rows in order; a row whose content cannot be tokenized faithfully gets its error."""
    results: list[TokenizedConversation | ContentError | None] = [None] * len(items)
    rendered, rendered_at = [], []
    for position, item in enumerate(items):
        try:
            if item.kind == "text":
                results[position] = tokenize_segments(tokenizer, item.messages, cfg.train_on_inputs)
            else:
                rendered.append(render_conversation(tokenizer, item.messages, dataset.roles_to_train))
                rendered_at.append(position)
        except ContentError as error:
            results[position] = error
    if rendered:
        for position, tokens in zip(rendered_at, tokenize_rendered(tokenizer, rendered, dataset.train_on_eos, cfg.train_on_inputs)):
            results[position] = tokens
    return results


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _contract_columns(item: Conversation, tokens: TokenizedConversation | None) -> dict[str, Any]:
    """The columns a contract can constrain: the row's scalar fields, plus columns derived per row
    so that rules like "ends with an assistant turn" or "num_tokens <= 256" are one line of YAML."""
    if item.kind == "chat":
        roles = [m["role"] for m in item.messages]
        answer = next((m["content"] for m in reversed(item.messages) if m["role"] == "assistant"), "")
        characters = sum(len(m["content"]) for m in item.messages)
    else:
        roles = ["text"] * len(item.messages)
        answer = next((s["text"] for s in reversed(item.messages) if s["train"]), "")
        characters = sum(len(s["text"]) for s in item.messages)
    return {
        **item.raw_columns,
        "num_messages": len(item.messages),
        "role_sequence": ",".join(roles),
        "last_role": roles[-1],
        "num_chars": characters,
        "assistant_text": answer,
        **({"num_tokens": len(tokens.input_ids), "trained_tokens": tokens.trained_tokens} if tokens else {}),
    }


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
            tokenized = _tokenize_batch(settings, dataset, tokenizer, items) if tokenizer else [None] * len(items)
            for item, tokens in zip(items, tokenized):
                yield _contract_columns(item, None if isinstance(tokens, ContentError) else tokens)

    summary = validate_frames(contract, _frames(rows()), docs_dir)
    return {**summary, **counts}


def _frames(rows: Iterator[dict[str, Any]]) -> Iterator[Any]:
    import pandas as pd

    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == CONTRACT_CHUNK_ROWS:
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


def _packed_rows(reader: Any, bins: list[list[int]]) -> Iterator[dict[str, list[int]]]:
    for bin_ in bins:
        yield packed_row({"input_ids": ids, "labels": labels} for ids, labels in map(reader.sample, bin_))


def _histogram(lengths: list[int]) -> dict[str, int]:
    histogram = {f"<={bucket}": 0 for bucket in LENGTH_BUCKETS}
    histogram["longer"] = 0
    for length in lengths:
        bucket = next((f"<={b}" for b in LENGTH_BUCKETS if length <= b), "longer")
        histogram[bucket] += 1
    return {key: count for key, count in histogram.items() if count}


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
