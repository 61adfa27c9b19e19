"""Incremental prep (`tasks.prep_chunks`): a source that grew at its end re-tokenizes only its new
chunks, a middle edit only the chunk it falls in, and either way the shards, the quarantine and
the contract's verdict equal those of a prep from scratch on the same file; worker processes
build the same chunks as this process."""

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks import prep_chunks, store
from tasks.config import RunConfig
from tasks.contracts import ContractError
from tasks.stage import run_stage
from tasks.stages import PREP

CONTRACT = {
    "name": "incremental",
    "expectations": [
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "last_role", "value_set": ["assistant"]}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "num_tokens", "max_value": 256}},
        {"type": "expect_column_values_to_not_match_regex", "kwargs": {"column": "assistant_text", "regex": "forbidden", "mostly": 0.9}},
    ],
}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of tens of rows, so that a few hundred rows make many of them."""
    monkeypatch.setattr(prep_chunks, "CHUNK_MIN_ROWS", 8)
    monkeypatch.setattr(prep_chunks, "CHUNK_BOUNDARY", 16)
    monkeypatch.setattr(prep_chunks, "CHUNK_MAX_ROWS", 64)


def rows(start: int, count: int) -> list[dict[str, Any]]:
    out = []
    for index in range(start, start + count):
        answer = "positive" if index % 250 % 3 else "negative"
        out.append({"messages": [{"role": "user", "content": f"Headline {index % 250}: Nimbus Cloud posts record profit"},
                                 {"role": "assistant", "content": answer}]})
    return out


def write(path: Path, items: list[dict[str, Any]], mode: str = "w") -> None:
    with path.open(mode, encoding="utf-8") as handle:
        handle.writelines(json.dumps(item) + "\n" for item in items)


def config(tmp_path: Path, model_dir: Path, data: Path, state: str, contract: dict[str, Any] | None = CONTRACT,
           **settings: Any) -> RunConfig:
    contract_dir = tmp_path / "contracts"
    contract_dir.mkdir(exist_ok=True)
    if contract:
        (contract_dir / f"{contract['name']}.yaml").write_text(yaml.safe_dump(contract))
    return RunConfig.model_validate({
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "chat_template", **({"contract": contract["name"]} if contract else {})}],
        "contract": {"dir": str(contract_dir), "max_rejected_fraction": 0.9},
        "state_dir": str(tmp_path / state),
        "sequence_len": 256,
        "val_set_size": 0.1,
        "dataset_exact_deduplication": True,
        **settings,
    })


def outputs(cfg: RunConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    prep_dir = store.output_dir(cfg, manifest)
    return {
        "shards": [shard["sha256"] for shard in manifest["train_shards"] + manifest["val_shards"]],
        "quarantine": (prep_dir / "quarantine.jsonl").read_text(),
        "val_items": manifest["val_items_sha256"],
        "contract": [(check["expectation"], check["success"], check["unexpected_count"])
                     for check in (manifest["sources"][0]["contract"] or {}).get("checks", [])],
        "counts": {key: manifest[key] for key in ("rows_in", "rows_accepted", "rows_quarantined", "train_samples", "tokens")},
    }


def test_appended_rows_cost_only_the_new_chunks_and_give_the_shards_of_a_fresh_prep(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "rows.jsonl"
    write(data, rows(0, 400))  # rows repeat every 250: duplicates span chunks
    first = run_stage(PREP, config(tmp_path, tiny_model_dir, data, "state"))
    assert first["chunks"]["reused"] == 0 and first["chunks"]["total"] >= 8
    assert first["sources"][0]["rows_duplicate"] == 150

    write(data, rows(400, 12), mode="a")
    cfg = config(tmp_path, tiny_model_dir, data, "state")
    second = run_stage(PREP, cfg)
    # Every chunk of the old file but its last is reused; the last and the new rows are built.
    assert second["chunks"]["total"] - second["chunks"]["reused"] <= 2
    assert second["chunks"]["reused"] == first["chunks"]["total"] - 1
    # The contract validated only the rows of the chunks built now.
    assert second["sources"][0]["contract"]["rows_validated_now"] < 80

    scratch_cfg = config(tmp_path, tiny_model_dir, data, "scratch")
    scratch = run_stage(PREP, scratch_cfg)
    assert scratch["chunks"]["reused"] == 0
    assert outputs(cfg, second) == outputs(scratch_cfg, scratch)
    assert second["rows_in"] == 412 and second["sources"][0]["contract"]["rows"] == second["rows_accepted"]


def test_a_middle_edit_rebuilds_one_chunk(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "rows.jsonl"
    original = rows(1000, 300)
    write(data, original)
    first = run_stage(PREP, config(tmp_path, tiny_model_dir, data, "state", contract=None))
    edited = [*original[:150], {"messages": [{"role": "user", "content": "Harbor Bank cuts its dividend"},
                                             {"role": "assistant", "content": "negative"}]}, *original[151:]]
    write(data, edited)
    cfg = config(tmp_path, tiny_model_dir, data, "state", contract=None)
    second = run_stage(PREP, cfg)
    assert second["chunks"]["total"] - second["chunks"]["reused"] == 1
    scratch_cfg = config(tmp_path, tiny_model_dir, data, "scratch", contract=None)
    assert outputs(cfg, second) == outputs(scratch_cfg, run_stage(PREP, scratch_cfg))
    assert first["chunks"]["total"] == second["chunks"]["total"]


def test_worker_processes_build_the_chunks_this_process_builds(tmp_path: Path, tiny_model_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "rows.jsonl"
    write(data, rows(0, 300))
    monkeypatch.setattr(prep_chunks, "ROWS_PER_WORKER_START", 1)
    pooled_cfg = config(tmp_path, tiny_model_dir, data, "pooled", dataset_processes=2)
    pooled = run_stage(PREP, pooled_cfg)
    local_cfg = config(tmp_path, tiny_model_dir, data, "local", dataset_processes=1)
    local = run_stage(PREP, local_cfg)
    assert outputs(pooled_cfg, pooled) == outputs(local_cfg, local)
    # `dataset_processes` decides how, never what: both runs have the same stage key.
    assert pooled["fingerprint"] == local["fingerprint"]


def test_an_expectation_on_the_whole_column_is_validated_over_every_row(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Uniqueness cannot be combined from parts: a duplicate in another chunk must still fail it."""
    data = tmp_path / "rows.jsonl"
    write(data, rows(0, 300))
    contract = {"name": "unique_text", "expectations": [
        {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "role_sequence"}, "severity": "error"},
    ]}
    cfg = config(tmp_path, tiny_model_dir, data, "state", contract=contract, dataset_exact_deduplication=False)
    with pytest.raises(ContractError, match="expect_column_values_to_be_unique"):
        run_stage(PREP, cfg)


def test_mostly_is_judged_over_every_chunk_together(tmp_path: Path, tiny_model_dir: Path) -> None:
    """5% of the answers match a pattern that `mostly: 0.9` tolerates; each chunk alone may hold more."""
    data = tmp_path / "rows.jsonl"
    items = rows(2000, 300)
    for index in range(0, 15):
        items[index]["messages"][1]["content"] = "forbidden answer"
    write(data, items)
    manifest = run_stage(PREP, config(tmp_path, tiny_model_dir, data, "state", dataset_exact_deduplication=False))
    check = manifest["sources"][0]["contract"]["checks"][2]
    assert check["unexpected_count"] == 15 and check["success"]
    assert manifest["sources"][0]["contract"]["passed"]
