"""prep: sources -> contract validation -> messages -> tokens with masked labels -> split -> packed
Arrow shards + manifest.

Reads only the tokenizer of the base model, never its weights, so prep is cheap to re-run and
its fingerprint changes only when the data, the tokenizer, the contracts or the prep settings do.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from prefect import task

from tasks import store
from tasks.chat_tokens import TokenizedConversation, tokenize_conversation
from tasks.config import RunConfig, stage_settings
from tasks.contracts import ContractError, contract_path, describe_failures, load_contract, validate_frame
from tasks.fingerprint import FileHasher, code_version, hash_bytes, hash_json
from tasks.formats import Conversation, DatasetError, Rejected, read_conversations
from tasks.packing import pack_samples
from tasks.shards import add_hashes, write_shards

log = logging.getLogger("loraflow.prep")

ROWS_PER_SHARD = 50_000
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "chat_template.jinja", "vocab*", "merges.txt", "*.model")
LENGTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def tokenizer_hash(base_model: Path, hasher: FileHasher) -> str:
    files = sorted({path for pattern in TOKENIZER_FILES for path in base_model.glob(pattern) if path.is_file()})
    return hash_json({path.name: hasher.file(path) for path in files})


def fingerprint(cfg: RunConfig, hasher: FileHasher) -> str:
    contract_dir = Path(cfg.contract.dir)
    return hash_json({
        "settings": stage_settings(cfg, "prep"),
        "sources": [hasher.file(Path(dataset.path)) for dataset in cfg.datasets],
        "contracts": [
            hasher.file(contract_path(contract_dir, dataset.contract)) if dataset.contract else None
            for dataset in cfg.datasets
        ],
        "tokenizer": tokenizer_hash(Path(cfg.base_model), hasher),
        "code": code_version("prep", "formats", "chat_tokens", "contracts", "packing", "shards"),
    })


def run_prep(cfg: RunConfig, fingerprint: str) -> dict[str, Any]:
    final_dir = store.stage_dir(cfg, "prep", fingerprint)
    if (existing := store.read_manifest(final_dir)) is not None:
        return existing
    started = time.monotonic()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    work_dir = store.fresh_partial_dir(final_dir)

    samples: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    sources = []
    for dataset in cfg.datasets:
        accepted, rejected, contract_summary = _read_one_source(cfg, dataset, tokenizer)
        samples.extend(accepted)
        quarantine.extend(record.as_record() for record in rejected)
        sources.append({
            "type": dataset.type,
            "rows_in": len(accepted) + len(rejected),
            "rows_accepted": len(accepted),
            "rows_quarantined": len(rejected),
            "contract": contract_summary,
        })

    rows_in = sum(source["rows_in"] for source in sources)
    if rows_in != len(samples) + len(quarantine):
        raise AssertionError(f"row accounting broke: {rows_in} in, {len(samples)} accepted, {len(quarantine)} quarantined")
    rejected_fraction = len(quarantine) / rows_in
    _write_jsonl(work_dir / "quarantine.jsonl", quarantine)
    if rejected_fraction > cfg.contract.max_rejected_fraction:
        reasons = sorted({record["reason"] for record in quarantine})[:5]
        raise DatasetError(
            f"{len(quarantine)} of {rows_in} rows ({rejected_fraction:.1%}) were quarantined, above "
            f"contract.max_rejected_fraction={cfg.contract.max_rejected_fraction}; see "
            f"{final_dir}.partial/quarantine.jsonl. Reasons include: {'; '.join(reasons)}"
        )
    if not samples:
        raise DatasetError("no rows left after quarantine; nothing to train on")

    train_samples, val_samples = split_train_val(samples, cfg.val_set_size)
    train_rows, train_efficiency = _pack(cfg, train_samples)
    val_rows, _ = _pack(cfg, val_samples)
    train_shards = add_hashes(write_shards(train_rows, work_dir, "train", ROWS_PER_SHARD), work_dir)
    val_shards = add_hashes(write_shards(val_rows, work_dir, "val", ROWS_PER_SHARD), work_dir)
    _write_jsonl(work_dir / "val_messages.jsonl", [{"messages": sample["messages"]} for sample in val_samples])

    lengths = [len(sample["input_ids"]) for sample in samples]
    manifest = {
        "stage": "prep",
        "fingerprint": fingerprint,
        "sources": sources,
        "rows_in": rows_in,
        "rows_accepted": len(samples),
        "rows_quarantined": len(quarantine),
        "train_samples": len(train_samples),
        "val_samples": len(val_samples),
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "tokens": sum(lengths),
        "trained_tokens": sum(sample["trained_tokens"] for sample in samples),
        "length_histogram": _histogram(lengths),
        "length_median": statistics.median(lengths),
        "packing_efficiency": round(train_efficiency, 5),
        "train_shards": train_shards,
        "val_shards": val_shards,
        "duration_s": round(time.monotonic() - started, 2),
    }
    log.info(
        "prep: %d rows in, %d accepted, %d quarantined; %d train / %d val samples; packing efficiency %.4f",
        rows_in, len(samples), len(quarantine), len(train_samples), len(val_samples), train_efficiency,
    )
    return store.publish(work_dir, final_dir, manifest)


def _read_one_source(cfg: RunConfig, dataset: Any, tokenizer: Any) -> tuple[list[dict], list[Rejected], dict | None]:
    accepted: list[dict[str, Any]] = []
    rejected: list[Rejected] = []
    for item in read_conversations(dataset):
        if isinstance(item, Rejected):
            rejected.append(item)
            continue
        tokens = tokenize_conversation(tokenizer, item.messages)
        if len(tokens.input_ids) > cfg.sequence_len:
            rejected.append(Rejected(
                item.source, item.line,
                f"{len(tokens.input_ids)} tokens, longer than sequence_len={cfg.sequence_len}; "
                "raise sequence_len or shorten the row",
                json.dumps({"messages": item.messages}),
            ))
            continue
        if tokens.trained_tokens == 0:
            rejected.append(Rejected(item.source, item.line, "no trained tokens after masking", json.dumps({"messages": item.messages})))
            continue
        accepted.append(_sample(item, tokens))

    contract_summary = None
    if dataset.contract:
        contract = load_contract(Path(cfg.contract.dir), dataset.contract)
        contract_summary = validate_frame(contract, _contract_frame(accepted))
        if not contract_summary["passed"]:
            raise ContractError(describe_failures(contract_summary, dataset.path))
    return accepted, rejected, contract_summary


def _sample(conversation: Conversation, tokens: TokenizedConversation) -> dict[str, Any]:
    return {
        "messages": conversation.messages,
        "input_ids": tokens.input_ids,
        "labels": tokens.labels,
        "trained_tokens": tokens.trained_tokens,
        "content_hash": hash_bytes(json.dumps(conversation.messages, sort_keys=True).encode()),
    }


def _contract_frame(samples: list[dict[str, Any]]) -> Any:
    """The columns a contract can constrain: derived per row, so rules like "ends with an
    assistant turn" or "num_tokens <= 256" are one line of YAML."""
    import pandas as pd

    return pd.DataFrame({
        "num_messages": [len(sample["messages"]) for sample in samples],
        "role_sequence": [",".join(m["role"] for m in sample["messages"]) for sample in samples],
        "last_role": [sample["messages"][-1]["role"] for sample in samples],
        "num_chars": [sum(len(m["content"]) for m in sample["messages"]) for sample in samples],
        "num_tokens": [len(sample["input_ids"]) for sample in samples],
        "assistant_text": [
            next(m["content"] for m in reversed(sample["messages"]) if m["role"] == "assistant")
            for sample in samples
        ],
    })


def split_train_val(samples: list[dict[str, Any]], val_set_size: float) -> tuple[list[dict], list[dict]]:
    """Splits by a hash of each row's content: appending rows never moves existing rows between
    splits (for a fraction), and the split does not depend on file order."""
    if val_set_size == 0:
        return samples, []
    if val_set_size < 1:
        threshold = int(val_set_size * 2**32)
        is_val = [int(sample["content_hash"][:8], 16) < threshold for sample in samples]
    else:
        ranked = sorted(range(len(samples)), key=lambda i: samples[i]["content_hash"])
        chosen = set(ranked[: int(val_set_size)])
        is_val = [i in chosen for i in range(len(samples))]
    train = [sample for sample, val in zip(samples, is_val) if not val]
    val = [sample for sample, val in zip(samples, is_val) if val]
    return train, val


def _pack(cfg: RunConfig, samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    """Rows of at most `sequence_len` tokens and their packing efficiency (real tokens / slots)."""
    if not samples:
        return [], 0.0
    if cfg.sample_packing:
        rows = pack_samples(samples, cfg.sequence_len, seed=cfg.seed)
    else:
        rows = [
            {"input_ids": s["input_ids"], "labels": s["labels"], "position_ids": list(range(len(s["input_ids"])))}
            for s in samples
        ]
    return rows, sum(len(row["input_ids"]) for row in rows) / (len(rows) * cfg.sequence_len)


def _histogram(lengths: list[int]) -> dict[str, int]:
    histogram = {f"<={bucket}": 0 for bucket in LENGTH_BUCKETS}
    histogram["longer"] = 0
    for length in lengths:
        bucket = next((f"<={b}" for b in LENGTH_BUCKETS if length <= b), "longer")
        histogram[bucket] += 1
    return {key: count for key, count in histogram.items() if count}


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


@task(name="prep", cache_key_fn=store.stage_cache_key, persist_result=True, result_serializer="json")
def prep_task(cfg: RunConfig, fingerprint: str) -> dict[str, Any]:
    return run_prep(cfg, fingerprint)
