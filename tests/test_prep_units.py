"""prep and the modules it is built from, on real files, the tiny tokenizer and real GX validation."""

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from datasets import Dataset

from tasks import store
from tasks.chat_tokens import IGNORE_INDEX, tokenize_conversation
from tasks.config import ConfigError, DatasetConfig, RunConfig
from tasks.contracts import ContractError, load_contract, validate_frame
from tasks.fingerprint import FileHasher, hash_bytes
from tasks.formats import Conversation, DatasetError, Rejected, read_conversations
from tasks.preflight import preflight
from tasks.prep import split_train_val
from tasks.stage import run_stage, stage_key
from tasks.stages import PREP

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTRACT_DIR = REPO_ROOT / "data_contracts"
QUICKSTART_DATA = REPO_ROOT / "examples" / "quickstart" / "finance_sentiment.jsonl"
QUICKSTART_CONTRACT = "quickstart_sentiment"
SEQUENCE_LEN = 256


def quickstart_lines(count: int) -> list[str]:
    with QUICKSTART_DATA.open(encoding="utf-8") as handle:
        return [next(handle).rstrip("\n") for _ in range(count)]


def make_config(tmp_path: Path, base_model: Path, data_path: Path, **overrides: Any) -> RunConfig:
    settings: dict[str, Any] = {
        "base_model": str(base_model),
        "datasets": [{"path": str(data_path), "type": "chat_template", "contract": QUICKSTART_CONTRACT}],
        "contract": {"dir": str(CONTRACT_DIR), "max_rejected_fraction": 0.1},
        "state_dir": str(tmp_path / "state"),
        "output_dir": str(tmp_path / "outputs"),
        "sequence_len": SEQUENCE_LEN,
        "val_set_size": 0.1,
        "lora_target_modules": ["q_proj", "v_proj"],
    }
    return RunConfig.model_validate({**settings, **overrides})


def trained_spans(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    spans: list[list[int]] = []
    previous_trained = False
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token
            if not previous_trained:
                spans.append([])
            spans[-1].append(token)
        previous_trained = trained
    return [tokenizer.decode(span) for span in spans]


# --- tokenize_conversation -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "messages",
    [
        [
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": "Nimbus Cloud posts record profit"},
            {"role": "assistant", "content": "positive"},
        ],
        [
            {"role": "user", "content": "Shares rise after earnings"},
            {"role": "assistant", "content": "positive"},
            {"role": "user", "content": "And this one: factory closes"},
            {"role": "assistant", "content": "It is negative."},
        ],
    ],
    ids=["system-user-assistant", "multi-turn"],
)
def test_only_assistant_turns_and_their_end_token_are_trained(tiny_tokenizer: Any, messages: list[dict[str, str]]) -> None:
    tokens = tokenize_conversation(tiny_tokenizer, messages)

    full_text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokens.input_ids == tiny_tokenizer(full_text, add_special_tokens=False)["input_ids"]
    assert len(tokens.labels) == len(tokens.input_ids)
    expected = [message["content"] + "<|im_end|>" for message in messages if message["role"] == "assistant"]
    assert trained_spans(tiny_tokenizer, tokens.input_ids, tokens.labels) == expected
    prompt_length = len(tiny_tokenizer(
        tiny_tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"])
    assert tokens.labels[0] == IGNORE_INDEX
    assert tokens.labels[prompt_length - 1] == IGNORE_INDEX  # the `assistant\n` header of the last turn
    assert tokens.labels[prompt_length] != IGNORE_INDEX
    assert tokens.labels[-1] == IGNORE_INDEX  # the newline ChatML puts after <|im_end|>
    assert tokens.trained_tokens == sum(label != IGNORE_INDEX for label in tokens.labels)


# --- read_conversations ----------------------------------------------------------------------------

def jsonl_line(messages: Any, field: str = "messages") -> bytes:
    return json.dumps({field: messages}).encode() + b"\n"


def test_every_bad_row_is_rejected_with_its_line_and_reason(tmp_path: Path) -> None:
    valid = [{"role": "user", "content": "Shares rise"}, {"role": "assistant", "content": "positive"}]
    lines = [
        jsonl_line(valid),  # 1
        b'{"messages": [{"role": "user"\n',  # 2
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',  # 3
        jsonl_line(valid, field="conversation"),  # 4
        jsonl_line([{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "positive"}]),  # 5
        jsonl_line([{"role": "user", "content": "Shares rise"}, {"role": "assistant", "content": "   "}]),  # 6
        jsonl_line([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Shares rise"}]),  # 7
        b"   \n",  # 8: blank, ignored
        jsonl_line(valid),  # 9
    ]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(lines))

    items = list(read_conversations(DatasetConfig(path=str(path))))

    assert len(items) == 8
    assert [item.line for item in items if isinstance(item, Conversation)] == [1, 9]
    assert items[0].messages == valid
    rejected = {item.line: item for item in items if isinstance(item, Rejected)}
    assert sorted(rejected) == [2, 3, 4, 5, 6, 7]
    assert all(item.source == str(path) for item in rejected.values())
    assert "not valid JSON" in rejected[2].reason
    assert "invalid UTF-8" in rejected[3].reason
    assert "no field `messages`" in rejected[4].reason and "conversation" in rejected[4].reason
    assert "`messages[0].role` is 'robot'" in rejected[5].reason
    assert "`messages[1].content` is empty" in rejected[6].reason
    assert "no turn of a trained role (assistant)" in rejected[7].reason
    assert "caf" in rejected[3].as_record()["raw"]


def test_custom_messages_field_is_read(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(jsonl_line([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], field="chat"))

    (item,) = read_conversations(DatasetConfig(path=str(path), field_messages="chat"))

    assert isinstance(item, Conversation)


def test_missing_and_empty_files_are_dataset_errors_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent.jsonl"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")

    with pytest.raises(DatasetError, match="not found") as raised:
        list(read_conversations(DatasetConfig(path=str(missing))))
    assert str(missing) in str(raised.value)
    with pytest.raises(DatasetError, match="empty") as raised:
        list(read_conversations(DatasetConfig(path=str(empty))))
    assert str(empty) in str(raised.value)


# --- split_train_val -------------------------------------------------------------------------------

def row_hashes(count: int) -> list[str]:
    return [hash_bytes(f"row {index}".encode()) for index in range(count)]


def val_rows(hashes: list[str], val_set_size: float) -> set[str]:
    return {content_hash for content_hash, is_val in zip(hashes, split_train_val(hashes, val_set_size)) if is_val}


def test_split_is_deterministic_and_independent_of_row_order() -> None:
    hashes = row_hashes(500)

    val = val_rows(hashes, 0.1)

    assert val_rows(list(reversed(hashes)), 0.1) == val
    assert 25 <= len(val) <= 75  # about 10%


def test_fraction_split_keeps_existing_rows_in_place_when_rows_are_appended() -> None:
    val_before = val_rows(row_hashes(300), 0.2)
    val_after = val_rows(row_hashes(600), 0.2)

    assert val_after & set(row_hashes(300)) == val_before
    assert val_after - set(row_hashes(300))


def test_integer_size_gives_exactly_that_many_val_rows() -> None:
    assert sum(split_train_val(row_hashes(200), 7)) == 7
    assert split_train_val(row_hashes(200), 0) == [False] * 200


# --- contracts -------------------------------------------------------------------------------------

def contract_frame(**changes: list[Any]) -> pd.DataFrame:
    columns: dict[str, list[Any]] = {
        "num_messages": [3, 3, 2],
        "role_sequence": ["system,user,assistant", "system,user,assistant", "user,assistant"],
        "last_role": ["assistant"] * 3,
        "num_chars": [120, 140, 40],
        "num_tokens": [60, 70, 20],
        "assistant_text": ["positive", "neutral", "negative"],
    }
    return pd.DataFrame({**columns, **changes})


def check_for(summary: dict[str, Any], column: str) -> dict[str, Any]:
    (check,) = [check for check in summary["checks"] if check["column"] == column]
    return check


def test_frame_that_meets_the_contract_passes() -> None:
    summary = validate_frame(load_contract(CONTRACT_DIR, QUICKSTART_CONTRACT), contract_frame())

    assert summary["passed"]
    assert summary["rows"] == 3
    assert len(summary["checks"]) == 5
    assert all(check["success"] for check in summary["checks"])


def test_bad_value_fails_an_error_expectation_and_is_listed() -> None:
    summary = validate_frame(
        load_contract(CONTRACT_DIR, QUICKSTART_CONTRACT),
        contract_frame(assistant_text=["positive", "maybe", "negative"]),
    )

    assert not summary["passed"]
    check = check_for(summary, "assistant_text")
    assert check["expectation"] == "expect_column_values_to_be_in_set"
    assert not check["success"]
    assert check["unexpected_count"] == 1
    assert check["unexpected_examples"] == ["maybe"]


def test_warn_expectation_failure_alone_still_passes() -> None:
    summary = validate_frame(load_contract(CONTRACT_DIR, QUICKSTART_CONTRACT), contract_frame(num_chars=[120, 5, 40]))

    assert summary["passed"]
    check = check_for(summary, "num_chars")
    assert check["severity"] == "warn"
    assert not check["success"]
    assert check["unexpected_examples"] == [5]


def test_missing_contract_lists_the_available_ones() -> None:
    with pytest.raises(ContractError) as raised:
        load_contract(CONTRACT_DIR, "quickstart_sentimnet")

    assert "`quickstart_sentimnet` not found" in str(raised.value)
    assert QUICKSTART_CONTRACT in str(raised.value)


# --- the prep stage end to end--------------------------------------------------------------------------

BAD_LINES = {5: "{not json", 31: json.dumps({"messages": [{"role": "user", "content": "no answer here"}]})}


def write_prep_data(path: Path, rows: int = 60) -> Path:
    lines = quickstart_lines(rows)
    for line_number in sorted(BAD_LINES):
        lines.insert(line_number - 1, BAD_LINES[line_number])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[RunConfig, str, dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("prep")
    cfg = make_config(tmp_path, tiny_model_dir, write_prep_data(tmp_path / "rows.jsonl"))
    prep_fingerprint = stage_key(PREP, cfg, {})
    return cfg, prep_fingerprint, run_stage(PREP, cfg)


def test_prep_manifest_reconciles_and_quarantine_keeps_bad_rows(prepared: tuple[RunConfig, str, dict[str, Any]]) -> None:
    cfg, prep_fingerprint, manifest = prepared
    final_dir = store.stage_dir(cfg, "prep", prep_fingerprint)

    assert manifest["rows_in"] == 62
    assert manifest["rows_accepted"] == 60
    assert manifest["rows_quarantined"] == 2
    assert manifest["rows_in"] == manifest["rows_accepted"] + manifest["rows_quarantined"]
    assert manifest["train_samples"] + manifest["val_samples"] == manifest["rows_accepted"]
    assert manifest["val_samples"] > 0
    assert manifest["sources"][0]["contract"]["passed"]
    assert json.loads((final_dir / store.MANIFEST_NAME).read_text()) == manifest
    quarantine = [json.loads(line) for line in (final_dir / "quarantine.jsonl").read_text().splitlines()]
    assert [record["line"] for record in quarantine] == sorted(BAD_LINES)
    assert "not valid JSON" in quarantine[0]["reason"]
    assert "no turn of a trained role" in quarantine[1]["reason"]
    assert [record["raw"] for record in quarantine] == [BAD_LINES[line] for line in sorted(BAD_LINES)]
    val_messages = (final_dir / "val_messages.jsonl").read_text().splitlines()
    assert len(val_messages) == manifest["val_samples"]


def test_prep_shards_hold_packed_rows_with_restarting_positions(
    prepared: tuple[RunConfig, str, dict[str, Any]], tiny_tokenizer: Any
) -> None:
    cfg, prep_fingerprint, manifest = prepared
    final_dir = store.stage_dir(cfg, "prep", prep_fingerprint)
    start_token = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")

    for split in ("train", "val"):
        rows = [row for shard in manifest[f"{split}_shards"] for row in Dataset.from_file(str(final_dir / shard["file"]))]
        assert len(rows) == manifest[f"{split}_rows"]
        samples_seen = 0
        for row in rows:
            positions = row["position_ids"]
            assert len(row["input_ids"]) == len(row["labels"]) == len(positions) <= SEQUENCE_LEN
            assert positions[0] == 0
            for index, position in enumerate(positions):
                assert position == 0 or position == positions[index - 1] + 1
                if position == 0:
                    samples_seen += 1
                    assert row["input_ids"][index] == start_token
                    assert row["labels"][index] == IGNORE_INDEX
        assert samples_seen == manifest[f"{split}_samples"]
    assert 0 < manifest["packing_efficiency"] <= 1


def test_prep_leaves_no_partial_dir_and_reuses_the_published_output(prepared: tuple[RunConfig, str, dict[str, Any]]) -> None:
    cfg, prep_fingerprint, manifest = prepared
    final_dir = store.stage_dir(cfg, "prep", prep_fingerprint)
    mtimes = {path.name: path.stat().st_mtime_ns for path in final_dir.iterdir()}

    assert not store.partial_dir(final_dir).exists()
    assert [path.name for path in final_dir.parent.iterdir()] == [prep_fingerprint]
    assert run_stage(PREP, cfg) == manifest
    assert {path.name: path.stat().st_mtime_ns for path in final_dir.iterdir()} == mtimes


def test_prep_fingerprint_follows_data_content_not_its_location(
    prepared: tuple[RunConfig, str, dict[str, Any]], tmp_path: Path, tiny_model_dir: Path
) -> None:
    cfg, prep_fingerprint, _ = prepared
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(Path(cfg.datasets[0].path).read_bytes())
    changed = tmp_path / "changed.jsonl"
    changed.write_bytes(moved.read_bytes() + quickstart_lines(61)[-1].encode() + b"\n")

    assert stage_key(PREP, make_config(tmp_path, tiny_model_dir, moved), {}) == prep_fingerprint
    assert stage_key(PREP, make_config(tmp_path, tiny_model_dir, changed), {}) != prep_fingerprint
    assert stage_key(PREP, make_config(tmp_path, tiny_model_dir, moved, sequence_len=512), {}) != prep_fingerprint


def test_prep_fails_when_more_rows_are_quarantined_than_allowed(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = make_config(
        tmp_path, tiny_model_dir, write_prep_data(tmp_path / "rows.jsonl"),
        contract={"dir": str(CONTRACT_DIR), "max_rejected_fraction": 0.0},
    )
    prep_fingerprint = stage_key(PREP, cfg, {})

    with pytest.raises(DatasetError, match="quarantine") as raised:
        run_stage(PREP, cfg)
    assert "2 of 62 rows" in str(raised.value)
    assert not store.stage_dir(cfg, "prep", prep_fingerprint).exists()


def test_contract_violation_stops_prep_and_publishes_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    lines = quickstart_lines(12)
    row = json.loads(lines[3])
    row["messages"][-1]["content"] = "maybe"
    lines[3] = json.dumps(row)
    data_path = tmp_path / "rows.jsonl"
    data_path.write_text("\n".join(lines) + "\n")
    cfg = make_config(tmp_path, tiny_model_dir, data_path)
    prep_fingerprint = stage_key(PREP, cfg, {})

    with pytest.raises(ContractError) as raised:
        run_stage(PREP, cfg)
    message = str(raised.value)
    assert "expect_column_values_to_be_in_set(assistant_text)" in message
    assert "'maybe'" in message
    assert str(data_path) in message
    assert not store.stage_dir(cfg, "prep", prep_fingerprint).exists()


# --- store -----------------------------------------------------------------------------------------

def test_publish_writes_the_manifest_and_renames_the_partial_dir(tmp_path: Path) -> None:
    final_dir = tmp_path / "prep" / "abc123"
    work_dir = store.fresh_partial_dir(final_dir)
    (work_dir / "data.bin").write_bytes(b"payload")

    manifest = store.publish(work_dir, final_dir, {"stage": "prep", "rows": 3})

    assert not work_dir.exists()
    assert (final_dir / "data.bin").read_bytes() == b"payload"
    assert store.read_manifest(final_dir) == manifest
    assert manifest["rows"] == 3 and "created_at" in manifest


def test_publish_onto_an_existing_output_keeps_the_first(tmp_path: Path) -> None:
    final_dir = tmp_path / "prep" / "abc123"
    first = store.publish(store.fresh_partial_dir(final_dir), final_dir, {"writer": "first"})

    second = store.publish(store.fresh_partial_dir(final_dir), final_dir, {"writer": "second"})

    assert second == first
    assert not store.partial_dir(final_dir).exists()


def test_read_manifest_is_none_without_a_manifest(tmp_path: Path) -> None:
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "train-00000.arrow").write_bytes(b"")

    assert store.read_manifest(incomplete) is None
    assert store.read_manifest(tmp_path / "absent") is None


# --- FileHasher ------------------------------------------------------------------------------------

def test_same_content_gives_the_same_hash(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"same bytes")
    (tmp_path / "b.txt").write_bytes(b"same bytes")
    hasher = FileHasher()

    assert hasher.file(tmp_path / "a.txt") == hasher.file(tmp_path / "b.txt") == hash_bytes(b"same bytes")


def test_one_changed_byte_of_the_same_size_changes_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abcdef")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    memo = tmp_path / "memo" / "hashes.json"
    hasher = FileHasher(memo)
    before = hasher.file(path)
    hasher.save()

    path.write_bytes(b"abcdeg")
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))

    assert FileHasher(memo).file(path) != before
    assert hasher.file(path) == hash_bytes(b"abcdeg")


def test_tree_hash_ignores_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    hasher = FileHasher()
    before = hasher.tree(tmp_path)

    (tmp_path / ".lock").write_text("pid 1")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "blob").write_text("cached")
    assert hasher.tree(tmp_path) == before

    (tmp_path / "model" / "extra.txt").write_text("new")
    assert hasher.tree(tmp_path) != before


# --- preflight -------------------------------------------------------------------------------------

def preflight_error(tmp_path: Path, tiny_model_dir: Path, **overrides: Any) -> str:
    data_path = overrides.pop("data_path", QUICKSTART_DATA)
    with pytest.raises(ConfigError) as raised:
        preflight(make_config(tmp_path, tiny_model_dir, data_path, **overrides), "run.yaml")
    return str(raised.value)


def test_quickstart_like_config_passes_preflight(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert preflight(make_config(tmp_path, tiny_model_dir, QUICKSTART_DATA), "run.yaml") == []
    assert preflight(make_config(tmp_path, tiny_model_dir, QUICKSTART_DATA, lora_target_modules="all-linear")) == []


def test_sequence_len_above_the_model_maximum_fails_preflight(tmp_path: Path, tiny_model_dir: Path) -> None:
    message = preflight_error(tmp_path, tiny_model_dir, sequence_len=4096)

    assert "run.yaml: 1 problem(s)" in message
    assert "`sequence_len` 4096" in message
    assert "2048" in message


def test_unknown_lora_target_module_fails_preflight(tmp_path: Path, tiny_model_dir: Path) -> None:
    message = preflight_error(tmp_path, tiny_model_dir, lora_target_modules=["q_proj", "c_attn"])

    assert "`lora_target_modules`: c_attn not found" in message


def test_flash_attention_without_bf16_fails_preflight(tmp_path: Path, tiny_model_dir: Path) -> None:
    message = preflight_error(tmp_path, tiny_model_dir, flash_attention=True, bf16=False)

    assert "`flash_attention: true` needs half precision; set `bf16: true`" in message


def test_missing_dataset_file_fails_preflight(tmp_path: Path, tiny_model_dir: Path) -> None:
    message = preflight_error(tmp_path, tiny_model_dir, data_path=tmp_path / "absent.jsonl")

    assert "`datasets[0].path`" in message
    assert str(tmp_path / "absent.jsonl") in message


def test_two_runs_of_one_stage_at_once_build_it_once_and_share_the_output(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Two `loraflow run` of the same config at the same time: the second waits on the key's lock
    and reuses what the first published; neither reads a half-written partial directory."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = make_config(tmp_path, tiny_model_dir, write_prep_data(tmp_path / "rows.jsonl"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = [future.result() for future in [pool.submit(run_stage, PREP, cfg) for _ in range(2)]]

    assert first == second
    final_dir = store.output_dir(cfg, first)
    assert [path.name for path in final_dir.parent.iterdir()] == [final_dir.name]  # no partial, no second copy
