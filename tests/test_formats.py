"""Every dataset type and source format, through the real readers and the tiny tokenizer: the trained
tokens (labels != -100) are decoded run by run and compared with the text that must be trained."""

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from datasets import Dataset, DatasetDict

from tasks import store
from tasks.chat_tokens import IGNORE_INDEX, TokenizedConversation
from tasks.config import ConfigError, DatasetConfig, RunConfig
from tasks.formats import Conversation, DatasetError, check_source, read_conversations
from tasks.preflight import preflight
from tasks.prep_chunks import tokenize_batch
from tasks.stage import run_stage
from tasks.stages import PREP

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTRACT_DIR = REPO_ROOT / "data_contracts"
END = "<|im_end|>"

SYSTEM = {"role": "system", "content": "Answer briefly."}
CHAT = [
    SYSTEM,
    {"role": "user", "content": "Nimbus Cloud posts record profit"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "And Harbor Bank cuts its dividend?"},
    {"role": "assistant", "content": "That one is negative."},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def run_config(tmp_path: Path, base_model: Path, datasets: list[dict[str, Any]], **overrides: Any) -> RunConfig:
    return RunConfig.model_validate({
        "base_model": str(base_model),
        "datasets": datasets,
        "contract": {"dir": str(CONTRACT_DIR), "max_rejected_fraction": 1.0},
        "state_dir": str(tmp_path / "state"),
        "output_dir": str(tmp_path / "outputs"),
        "val_set_size": 0,
        "sequence_len": 256,
        "lora_target_modules": ["q_proj", "v_proj"],
        **overrides,
    })


def trained_runs(tokenizer: Any, tokens: TokenizedConversation) -> list[str]:
    """Decoded runs of consecutive trained tokens; a trained label always equals its input id."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(tokens.input_ids, tokens.labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = trained
    return [tokenizer.decode(run) for run in runs]


def prepare(tmp_path: Path, tokenizer: Any, model_dir: Path, rows: list[Any], dataset: dict[str, Any],
            **settings: Any) -> tuple[list[Conversation], list[TokenizedConversation]]:
    """Rows -> JSONL -> Conversations -> tokens, the way prep's first pass does it."""
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = run_config(tmp_path, model_dir, [{"path": str(path), **dataset}], **settings)
    items = list(read_conversations(cfg.datasets[0]))
    assert all(isinstance(item, Conversation) for item in items), [getattr(item, "reason", None) for item in items]
    return items, tokenize_batch(cfg, cfg.datasets[0], tokenizer, items)


# ---------------------------------------------------------------- chat types: what is trained


CHAT_TYPE_CASES = {
    "chat_template": ({"type": "chat_template"}, {"messages": CHAT}, CHAT),
    "chatml_alias": ({"type": "chatml"}, {"messages": CHAT}, CHAT),
    "chat_template_mapped_fields": (
        {"type": "chat_template", "field_messages": "conversation", "message_property_mappings": {"role": "from", "content": "value"}},
        {"conversation": [{"from": m["role"], "value": m["content"]} for m in CHAT]},
        CHAT,
    ),
    "sharegpt": (
        {"type": "sharegpt", "field_messages": "conversations"},
        {"conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "Nimbus Cloud posts record profit"},
            {"from": "gpt", "value": "positive"},
            {"from": "human", "value": "And Harbor Bank cuts its dividend?"},
            {"from": "gpt", "value": "That one is negative."},
        ]},
        CHAT,
    ),
    "alpaca": (
        {"type": "alpaca"},
        {"instruction": "Classify the headline.", "output": "positive"},
        [{"role": "user", "content": "Classify the headline."}, {"role": "assistant", "content": "positive"}],
    ),
    "alpaca_with_input": (
        {"type": "alpaca"},
        {"instruction": "Classify the headline.", "input": "Nimbus Cloud posts record profit", "output": "positive"},
        [
            {"role": "user", "content": "Classify the headline.\n\nNimbus Cloud posts record profit"},
            {"role": "assistant", "content": "positive"},
        ],
    ),
    "alpaca_with_system_and_empty_input": (
        {"type": "alpaca"},
        {"system": "Answer briefly.", "instruction": "Classify: Harbor Bank cuts its dividend", "input": "", "output": "negative"},
        [SYSTEM, {"role": "user", "content": "Classify: Harbor Bank cuts its dividend"}, {"role": "assistant", "content": "negative"}],
    ),
}


@pytest.mark.parametrize("dataset, row, messages", CHAT_TYPE_CASES.values(), ids=CHAT_TYPE_CASES.keys())
def test_chat_types_train_exactly_the_assistant_turns_and_their_end_token(
    tmp_path: Path, tiny_tokenizer: Any, tiny_model_dir: Path, dataset: dict[str, Any], row: dict[str, Any],
    messages: list[dict[str, str]],
) -> None:
    (item,), (tokens,) = prepare(tmp_path, tiny_tokenizer, tiny_model_dir, [row], dataset)

    assert item.kind == "chat" and item.messages == messages
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokens.input_ids == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert trained_runs(tiny_tokenizer, tokens) == [m["content"] + END for m in messages if m["role"] == "assistant"]


def test_sharegpt_reads_conversations_by_default(tmp_path: Path, tiny_tokenizer: Any, tiny_model_dir: Path) -> None:
    _, row, messages = CHAT_TYPE_CASES["sharegpt"]

    (item,), _ = prepare(tmp_path, tiny_tokenizer, tiny_model_dir, [row], {"type": "sharegpt"})

    assert item.messages == messages


TWO_TURN_RUNS = {
    "turn": ["positive" + END, "That one is negative." + END],
    "last": ["positive", "That one is negative." + END],
    "all": [END, END, "positive" + END, END, "That one is negative." + END],
    "none": ["positive", "That one is negative."],
}


@pytest.mark.parametrize("mode", TWO_TURN_RUNS)
def test_train_on_eos_modes(tmp_path: Path, tiny_tokenizer: Any, tiny_model_dir: Path, mode: str) -> None:
    _, (tokens,) = prepare(tmp_path, tiny_tokenizer, tiny_model_dir, [{"messages": CHAT}], {"train_on_eos": mode})

    assert trained_runs(tiny_tokenizer, tokens) == TWO_TURN_RUNS[mode]


def test_user_turns_are_trained_with_their_end_token_when_listed_in_roles_to_train(
    tmp_path: Path, tiny_tokenizer: Any, tiny_model_dir: Path
) -> None:
    _, (tokens,) = prepare(tmp_path, tiny_tokenizer, tiny_model_dir, [{"messages": CHAT}], {"roles_to_train": ["assistant", "user"]})

    runs = trained_runs(tiny_tokenizer, tokens)
    assert len(runs) == 4
    for run, message in zip(runs, CHAT[1:]):
        assert run.endswith(message["content"] + END)
    assert not any("Answer briefly." in run for run in runs)


def test_trained_user_turns_exclude_their_role_header(tmp_path: Path, tiny_tokenizer: Any, tiny_model_dir: Path) -> None:
    _, (tokens,) = prepare(tmp_path, tiny_tokenizer, tiny_model_dir, [{"messages": CHAT}], {"roles_to_train": ["assistant", "user"]})

    assert trained_runs(tiny_tokenizer, tokens) == [m["content"] + END for m in CHAT[1:]]


def test_a_user_only_row_is_accepted_only_when_user_turns_are_trained(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": "Just a statement."}]}])

    (rejected,) = read_conversations(DatasetConfig(path=str(path)))
    (accepted,) = read_conversations(DatasetConfig(path=str(path), roles_to_train=["user"]))

    assert "no turn of a trained role (assistant)" in rejected.reason
    assert isinstance(accepted, Conversation)


def test_train_on_inputs_trains_every_token(tmp_path: Path, tiny_tokenizer: Any, tiny_model_dir: Path) -> None:
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    question_answer = [{"text": "Q: 2+2?\n", "train": False}, {"text": "A: 4", "train": True}]
    segments = write_jsonl(tmp_path / "segments.jsonl", [{"segments": question_answer}])
    cfg = run_config(
        tmp_path, tiny_model_dir, [{"path": str(chat)}, {"path": str(segments), "type": "input_output"}], train_on_inputs=True
    )

    chat_tokens, segment_tokens = [
        tokenize_batch(cfg, dataset, tiny_tokenizer, [next(read_conversations(dataset))])[0] for dataset in cfg.datasets
    ]

    assert chat_tokens.labels == chat_tokens.input_ids
    assert tiny_tokenizer.decode(chat_tokens.input_ids) == tiny_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert segment_tokens.labels == segment_tokens.input_ids
    assert tiny_tokenizer.decode(segment_tokens.input_ids) == "Q: 2+2?\nA: 4" + END


# ---------------------------------------------------------------- text types


def test_completion_trains_the_whole_text_and_the_end_token(tmp_path: Path, tiny_tokenizer: Any, tiny_model_dir: Path) -> None:
    text = "Nimbus Cloud posts record profit.\nShares rose 12% on Friday."

    row = {"text": text, "id": "r1"}

    (item,), (tokens,) = prepare(tmp_path, tiny_tokenizer, tiny_model_dir, [row], {"type": "completion", "field": "text"})

    assert item.kind == "text" and item.raw_columns == {"text": text, "id": "r1"}
    assert tokens.input_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert trained_runs(tiny_tokenizer, tokens) == [text + END]


def test_input_output_trains_only_the_marked_segments(tmp_path: Path, tiny_tokenizer: Any, tiny_model_dir: Path) -> None:
    segments = [
        {"text": "Headline: Nimbus Cloud posts record profit\nSentiment: ", "train": False},
        {"text": "positive", "train": True},
        {"text": "\nHeadline: Harbor Bank cuts its dividend\nSentiment: "},  # `train` defaults to false
        {"text": "negative", "train": True},
    ]

    (item,), (tokens,) = prepare(tmp_path, tiny_tokenizer, tiny_model_dir, [{"segments": segments}], {"type": "input_output"})

    assert item.messages == [{"text": s["text"], "train": s.get("train", False)} for s in segments]
    assert tiny_tokenizer.decode(tokens.input_ids) == "".join(s["text"] for s in segments) + END
    assert trained_runs(tiny_tokenizer, tokens) == ["positive", "negative" + END]


# ---------------------------------------------------------------- source formats


THREE_ROWS = [
    {"id": "a", "messages": [{"role": "user", "content": "Nimbus Cloud posts record profit"},
                             {"role": "assistant", "content": "positive"}]},
    {"id": "b", "messages": [SYSTEM, {"role": "user", "content": "Two lines:\nHarbor Bank cuts its dividend"},
                             {"role": "assistant", "content": "negative"}]},
    {"id": "c", "messages": [{"role": "user", "content": "Pinecone Software appoints new CFO, \"effective\" today"},
                             {"role": "assistant", "content": "neutral, café ☕"}]},
]


def write_csv(path: Path, rows: list[dict[str, Any]], indent: int | None = None) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "messages"])
        for row in rows:
            writer.writerow([row["id"], json.dumps(row["messages"], ensure_ascii=False, indent=indent)])


def write_source(kind: str, directory: Path) -> tuple[Path, dict[str, Any]]:
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in THREE_ROWS).encode()
    if kind == "jsonl":
        (path := directory / "rows.jsonl").write_bytes(lines)
    elif kind == "jsonl_gz":
        (path := directory / "rows.jsonl.gz").write_bytes(gzip.compress(lines))
    elif kind == "jsonl_zst":
        (path := directory / "rows.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif kind == "jsonl_bom":
        (path := directory / "rows.jsonl").write_bytes(b"\xef\xbb\xbf" + lines)
    elif kind == "json_array":
        (path := directory / "rows.json").write_text(json.dumps(THREE_ROWS, indent=2, ensure_ascii=False), encoding="utf-8")
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(THREE_ROWS), path := directory / "rows.parquet")
    elif kind == "csv":
        write_csv(path := directory / "rows.csv", THREE_ROWS)
    elif kind == "csv_quoted_newlines":
        write_csv(path := directory / "rows.csv", THREE_ROWS, indent=1)
        assert path.read_text(encoding="utf-8").count("\n") > 4 * len(THREE_ROWS)  # newlines inside quoted cells
    elif kind == "datasets_dir":
        Dataset.from_list(THREE_ROWS).save_to_disk(str(path := directory / "saved"))
    elif kind == "datasetdict_split":
        other = [{"id": "z", "messages": [{"role": "user", "content": "Other split"}, {"role": "assistant", "content": "ignored"}]}]
        splits = DatasetDict({"train": Dataset.from_list(other), "holdout": Dataset.from_list(THREE_ROWS)})
        splits.save_to_disk(str(path := directory / "dd"))
        return path, {"split": "holdout"}
    return path, {}


SOURCE_KINDS = [
    "jsonl", "jsonl_gz", "jsonl_zst", "jsonl_bom", "json_array", "parquet", "csv", "csv_quoted_newlines",
    "datasets_dir", "datasetdict_split",
]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_every_source_format_gives_the_same_conversations(tmp_path: Path, kind: str) -> None:
    path, settings = write_source(kind, tmp_path)
    dataset = DatasetConfig(path=str(path), **settings)

    check_source(dataset)
    items = list(read_conversations(dataset))

    assert all(isinstance(item, Conversation) for item in items), [getattr(item, "reason", None) for item in items]
    assert [item.line for item in items] == [1, 2, 3]
    assert [item.messages for item in items] == [row["messages"] for row in THREE_ROWS]
    assert [item.raw_columns["id"] for item in items] == ["a", "b", "c"]
    assert all(item.source == str(path) for item in items)


# ---------------------------------------------------------------- run_prep over several sources


ALPACA_CONTRACT = {
    "name": "alpaca_labels",
    "expectations": [
        {"type": "expect_column_values_to_be_in_set",
         "kwargs": {"column": "assistant_text", "value_set": ["positive", "negative", "neutral"]}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "role_sequence", "value_set": ["user,assistant"]}},
    ],
}


def test_several_datasets_each_with_its_type_and_contract_reconcile_in_the_manifest(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    contract_dir = tmp_path / "contracts"
    contract_dir.mkdir()
    (contract_dir / "quickstart_sentiment.yaml").write_bytes((CONTRACT_DIR / "quickstart_sentiment.yaml").read_bytes())
    (contract_dir / "alpaca_labels.yaml").write_text(yaml.safe_dump(ALPACA_CONTRACT))
    headlines = ["Nimbus Cloud posts record profit", "Harbor Bank cuts its dividend", "Pinecone Software appoints new CFO"]
    labels = ["positive", "negative", "neutral"]
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Classify the sentiment of the headline."},
                      {"role": "user", "content": headline}, {"role": "assistant", "content": label}]}
        for headline, label in zip(headlines, labels)
    ] + ["not an object"])
    pq.write_table(pa.Table.from_pylist([
        {"instruction": f"Classify the sentiment: {headline}", "input": "", "output": label} for headline, label in zip(headlines, labels)
    ] + [{"instruction": "Classify the sentiment: no answer", "input": "", "output": ""}]), alpaca := tmp_path / "alpaca.parquet")
    write_csv_text = tmp_path / "text.csv"
    write_csv_text.write_text("text\n\"Quarterly report:\nrevenue up 8%\"\nShares closed flat\n", encoding="utf-8")
    cfg = run_config(tmp_path, tiny_model_dir, [
        {"path": str(chat), "type": "chat_template", "contract": "quickstart_sentiment"},
        {"path": str(alpaca), "type": "alpaca", "contract": "alpaca_labels"},
        {"path": str(write_csv_text), "type": "completion"},
    ], contract={"dir": str(contract_dir), "max_rejected_fraction": 0.5})

    manifest = run_stage(PREP, cfg)

    sources = manifest["sources"]
    assert [source["type"] for source in sources] == ["chat_template", "alpaca", "completion"]
    assert [(s["rows_in"], s["rows_accepted"], s["rows_quarantined"]) for s in sources] == [(4, 3, 1), (4, 3, 1), (2, 2, 0)]
    assert [s["contract"]["contract"] if s["contract"] else None for s in sources] == ["quickstart_sentiment", "alpaca_labels", None]
    assert all(s["contract"]["passed"] and s["contract"]["rows"] == s["rows_accepted"] for s in sources[:2])
    for key in ("rows_in", "rows_accepted", "rows_quarantined"):
        assert manifest[key] == sum(source[key] for source in sources)
    assert manifest["rows_in"] == manifest["rows_accepted"] + manifest["rows_quarantined"] == 10
    assert manifest["train_samples"] + manifest["val_samples"] == manifest["rows_accepted"]


# ---------------------------------------------------------------- deduplication and length


def quarantine_of(cfg: RunConfig, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    path = store.stage_dir(cfg, "prep", manifest["fingerprint"]) / "quarantine.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_exact_duplicates_are_quarantined_naming_the_first_occurrence(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"messages": row["messages"]} for row in THREE_ROWS]
    first = write_jsonl(tmp_path / "first.jsonl", [rows[0], rows[1], rows[0]])
    second = write_jsonl(tmp_path / "second.jsonl", [rows[2], {"id": "other columns do not matter", **rows[1]}])
    cfg = run_config(tmp_path, tiny_model_dir, [{"path": str(first)}, {"path": str(second)}], dataset_exact_deduplication=True)

    manifest = run_stage(PREP, cfg)

    assert (manifest["rows_in"], manifest["rows_accepted"], manifest["rows_quarantined"]) == (5, 3, 2)
    assert [source["rows_duplicate"] for source in manifest["sources"]] == [1, 1]
    assert [(r["source"], r["line"], r["reason"]) for r in quarantine_of(cfg, manifest)] == [
        (str(first), 3, f"exact duplicate of row 1 of {first}"),
        (str(second), 2, f"exact duplicate of row 2 of {first}"),
    ]


def test_without_deduplication_duplicates_are_kept(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"messages": THREE_ROWS[0]["messages"]}] * 3
    cfg = run_config(tmp_path, tiny_model_dir, [{"path": str(write_jsonl(tmp_path / "rows.jsonl", rows))}])

    manifest = run_stage(PREP, cfg)

    assert (manifest["rows_accepted"], manifest["rows_quarantined"]) == (3, 0)


LONG_ANSWER = " ".join(["Shares surged after the retailer beat analyst estimates on revenue and earnings."] * 8)


@pytest.mark.parametrize("strategy", ["truncate", "quarantine"])
def test_excess_length_strategy(tmp_path: Path, tiny_tokenizer: Any, tiny_model_dir: Path, strategy: str) -> None:
    short = {"messages": THREE_ROWS[0]["messages"]}
    long = {"messages": [{"role": "user", "content": "Summarise the quarter"}, {"role": "assistant", "content": LONG_ANSWER}]}
    path = write_jsonl(tmp_path / "rows.jsonl", [short, long])
    cfg = run_config(
        tmp_path, tiny_model_dir, [{"path": str(path)}], sequence_len=64, sample_packing=False, excess_length_strategy=strategy
    )
    full_ids = tiny_tokenizer(tiny_tokenizer.apply_chat_template(long["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
    assert len(full_ids) > 64

    manifest = run_stage(PREP, cfg)

    quarantine = quarantine_of(cfg, manifest)
    final_dir = store.stage_dir(cfg, "prep", manifest["fingerprint"])
    samples = [row["input_ids"] for shard in manifest["train_shards"] for row in Dataset.from_file(str(final_dir / shard["file"]))]
    if strategy == "truncate":
        assert (manifest["rows_accepted"], manifest["rows_quarantined"], manifest["sources"][0]["rows_truncated"]) == (2, 0, 1)
        assert full_ids[:64] in samples
        assert max(len(sample) for sample in samples) == 64
    else:
        assert (manifest["rows_accepted"], manifest["rows_quarantined"], manifest["sources"][0]["rows_truncated"]) == (1, 1, 0)
        assert [record["line"] for record in quarantine] == [2]
        assert f"{len(full_ids)} tokens, longer than sequence_len=64" in quarantine[0]["reason"]
        assert max(len(sample) for sample in samples) < 64


# ---------------------------------------------------------------- dataset-level problems


def test_configured_field_missing_from_the_rows_is_one_dataset_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "alpaca_rows.jsonl", [{"instruction": "Classify", "input": "Shares rise", "output": "positive"}] * 3)
    cfg = run_config(tmp_path, tiny_model_dir, [{"path": str(path), "type": "chat_template"}], val_set_size=0.1)

    with pytest.raises(DatasetError) as raised:
        check_source(cfg.datasets[0])
    with pytest.raises(ConfigError) as reported:
        preflight(cfg, "run.yaml")

    message = str(raised.value)
    assert str(path) in message
    assert "no column 'messages'" in message
    assert "columns: input, instruction, output" in message
    assert "the rows look like `type: alpaca`" in message
    assert "run.yaml: 1 problem(s)" in str(reported.value)
    assert f"`datasets[0]`: {message}" in str(reported.value)
