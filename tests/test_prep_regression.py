"""Prep's tokens and labels, pinned: every case below must give exactly the rows (input ids,
labels, position ids, in order) that the row-by-row prep of December 2026 gave, before prep
became incremental and parallel (`tests/golden/prep_digests.json`, written by that code).

A digest covers the train and val shards read back row by row, the quarantine reasons and the
row counts; a changed label, a reordered row or a row quarantined for another reason changes it.
Regenerate only for an intended change of prep's output, and say why in the commit:
`.venv/bin/python -m tests.test_prep_regression --write`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN = REPO_ROOT / "tests" / "golden" / "prep_digests.json"
BAD = REPO_ROOT / "examples" / "bad"
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Nimbus Cloud posts record profit"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "And Harbor Bank cuts its dividend?"},
    {"role": "assistant", "content": "That one is negative."},
]


def _chat_rows(count: int) -> list[dict[str, Any]]:
    """Multi-turn rows of varied shapes (with and without system, one to three exchanges)."""
    rows = []
    for index in range(count):
        turns = CHAT[: 3 + 2 * (index % 2)] if index % 3 else CHAT[1 : 3 + 2 * (index % 2)]
        rows.append({"messages": [{**m, "content": f"{m['content']} #{index}"} for m in turns]})
    return rows


def _rows_file(tmp_path: Path, name: str, rows: list[dict[str, Any]]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _cases(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Case name -> config overrides (datasets and settings)."""
    chat = _rows_file(tmp_path, "chat.jsonl", _chat_rows(60))
    sharegpt = _rows_file(tmp_path, "sharegpt.jsonl", [
        {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                           for m in row["messages"]]} for row in _chat_rows(20)
    ])
    alpaca = _rows_file(tmp_path, "alpaca.jsonl", [
        {"instruction": f"Classify headline {i}.", "input": "Harbor Bank cuts its dividend" if i % 2 else "", "output": "negative",
         **({"system": "Answer briefly."} if i % 3 == 0 else {})} for i in range(20)
    ])
    completion = _rows_file(tmp_path, "completion.jsonl", [{"text": f"Nimbus Cloud posts record profit, quarter {i}."} for i in range(20)])
    segments = _rows_file(tmp_path, "segments.jsonl", [
        {"segments": [{"text": f"Q{i}: Harbor Bank? ", "train": False}, {"text": "A: negative.", "train": True}]} for i in range(20)
    ])
    quickstart = str(REPO_ROOT / "examples" / "quickstart" / "finance_sentiment.jsonl")
    zh = [str(REPO_ROOT / "examples" / "quickstart-zh" / name) for name in ("finance_sentiment_zh.jsonl", "finance_analysis_zh.jsonl")]
    long_rows = _rows_file(tmp_path, "long.jsonl", [
        {"messages": [{"role": "user", "content": f"Summarise report {i}."},
                      {"role": "assistant", "content": "\n\n".join(f"Point {j} of the report on Nimbus." for j in range(10 + 5 * i))}]}
        for i in range(8)
    ] + _chat_rows(10))
    return {
        "quickstart": {"datasets": [{"path": quickstart, "type": "chat_template", "contract": "quickstart_sentiment"}],
                       "val_set_size": 0.1, "sequence_len": 512},
        "quickstart_zh": {"datasets": [{"path": zh[0], "type": "chat_template"}, {"path": zh[1], "type": "chat_template"}],
                          "val_set_size": 0.1, "sequence_len": 512},
        "chat_multi_turn": {"datasets": [{"path": chat, "type": "chat_template"}], "val_set_size": 0.2},
        "chat_eos_last": {"datasets": [{"path": chat, "type": "chat_template", "train_on_eos": "last"}]},
        "chat_eos_all": {"datasets": [{"path": chat, "type": "chat_template", "train_on_eos": "all"}]},
        "chat_eos_none": {"datasets": [{"path": chat, "type": "chat_template", "train_on_eos": "none"}]},
        "chat_user_trained": {"datasets": [{"path": chat, "type": "chat_template", "roles_to_train": ["user", "assistant"]}]},
        "chat_train_on_inputs": {"datasets": [{"path": chat, "type": "chat_template"}], "train_on_inputs": True},
        "chat_unpacked": {"datasets": [{"path": chat, "type": "chat_template"}], "sample_packing": False},
        "sharegpt": {"datasets": [{"path": sharegpt, "type": "sharegpt", "field_messages": "conversations"}]},
        "alpaca": {"datasets": [{"path": alpaca, "type": "alpaca"}]},
        "completion": {"datasets": [{"path": completion, "type": "completion"}]},
        "input_output": {"datasets": [{"path": segments, "type": "input_output"}]},
        "long_split": {"datasets": [{"path": long_rows, "type": "chat_template"}], "sequence_len": 128,
                       "excess_length_strategy": "split"},
        "long_truncate": {"datasets": [{"path": long_rows, "type": "chat_template"}], "sequence_len": 128,
                          "excess_length_strategy": "truncate"},
        "long_quarantine": {"datasets": [{"path": long_rows, "type": "chat_template"}], "sequence_len": 128},
        "bad_inputs": {"datasets": [
            {"path": str(BAD / name), "type": "chat_template"}
            for name in ("bom.jsonl", "crlf_and_blank_lines.jsonl", "duplicates.jsonl", "empty_content.jsonl",
                         "special_token_in_content.jsonl", "null_messages.jsonl", "content_not_a_string.jsonl")
        ]},
    }


def prep_digest(tmp_path: Path, model_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    from tasks import store
    from tasks.config import RunConfig
    from tasks.stage import run_stage
    from tasks.stages import PREP

    cfg = RunConfig.model_validate({
        "base_model": str(model_dir),
        "contract": {"dir": str(REPO_ROOT / "data_contracts"), "max_rejected_fraction": 1.0},
        "state_dir": str(tmp_path / "state"),
        "output_dir": str(tmp_path / "outputs"),
        "val_set_size": 0,
        "sequence_len": 256,
        "sample_packing": True,
        "lora_target_modules": ["q_proj", "v_proj"],
        **overrides,
    })
    manifest = run_stage(PREP, cfg)
    prep_dir = store.output_dir(cfg, manifest)
    rows = hashlib.sha256()
    for split in ("train_shards", "val_shards"):
        for shard in manifest[split]:
            with pa.memory_map(str(prep_dir / shard["file"])) as source:
                table = pa.ipc.open_stream(source).read_all()
            for row in table.to_pylist():
                rows.update(json.dumps([row["input_ids"], row["labels"], row["position_ids"]]).encode())
    records = map(json.loads, (prep_dir / "quarantine.jsonl").read_text().splitlines())
    quarantine = [(record["line"], record["reason"]) for record in records]
    return {
        "rows": rows.hexdigest(),
        "quarantine": hashlib.sha256(json.dumps(sorted(quarantine)).encode()).hexdigest(),
        "counts": [manifest[key] for key in ("rows_in", "rows_accepted", "rows_quarantined", "train_samples", "val_samples", "tokens",
                                             "trained_tokens")],
    }


CASE_NAMES = (
    "quickstart", "quickstart_zh", "chat_multi_turn", "chat_eos_last", "chat_eos_all", "chat_eos_none", "chat_user_trained",
    "chat_train_on_inputs", "chat_unpacked", "sharegpt", "alpaca", "completion", "input_output", "long_split", "long_truncate",
    "long_quarantine", "bad_inputs",
)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_prep_gives_the_pinned_tokens_and_labels(tmp_path: Path, tiny_model_dir: Path, case: str) -> None:
    expected = json.loads(GOLDEN.read_text())[case]
    assert prep_digest(tmp_path, tiny_model_dir, _cases(tmp_path)[case]) == expected


def _write_golden() -> None:
    import tempfile

    from tasks.tiny_model import build_tiny_model

    digests = {}
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        corpus = REPO_ROOT / "examples" / "quickstart" / "finance_sentiment.jsonl"
        model_dir = build_tiny_model(root / "model", seed=0, corpus_files=[corpus])
        for case in CASE_NAMES:
            case_dir = root / case
            case_dir.mkdir()
            digests[case] = prep_digest(case_dir, model_dir, _cases(case_dir)[case])
            print(case, digests[case]["counts"], flush=True)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(digests, indent=1) + "\n")


if __name__ == "__main__" and "--write" in sys.argv:
    _write_golden()
