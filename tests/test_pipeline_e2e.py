"""End-to-end: the real Prefect flow on the tiny model, and what the cache promises.

- the quickstart learns: tuned accuracy on the held-out split far above the base model's;
- an unchanged re-run does no work (every stage cached);
- changing an eval setting re-runs eval (and export, which records eval's metrics), nothing upstream;
- changing one byte of one data row re-runs every stage;
- a stage whose output directory was deleted runs again although Prefect remembers it;
- early cutoff: an edit that leaves prep's output byte-identical (an expectation every row meets,
  a comment in the prep code) re-runs prep and nothing downstream, and says why.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tasks.config_load import load_config

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"


def write_config(
    directory: Path, base_model: Path, data: Path | None = None, name: str = "run", template: str = "quickstart.yaml", **overrides
) -> Path:
    """A shipped config (the quickstart's by default), redirected to a scratch state/output dir, with
    `data` (else the shipped data) and overrides."""
    raw = yaml.safe_load((REPO / "configs" / template).read_text(encoding="utf-8"))
    raw.update(
        base_model=str(base_model),
        state_dir=str(directory / "state"),
        output_dir=str(directory / "outputs"),
    )
    raw["datasets"][0]["path"] = str(data) if data is not None else str(REPO / raw["datasets"][0]["path"])
    raw["contract"] = {"dir": str(REPO / "data_contracts")}
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def states(summary: dict) -> dict[str, str]:
    return {stage: outcome["state"] for stage, outcome in summary["stages"].items()}


def reasons(summary: dict) -> dict[str, str]:
    return {stage: f"{outcome['state']}: {outcome['reason']}" for stage, outcome in summary["stages"].items()}


def test_quickstart_learns_and_reruns_cached(prefect_harness, tiny_model_dir, tmp_path):
    from flows.pipeline import pipeline

    config_path = write_config(tmp_path, tiny_model_dir, QUICKSTART_DATA)
    first = pipeline(str(config_path))
    assert states(first) == {"prep": "ran", "train": "ran", "eval": "ran", "export": "ran"}
    tuned, base = first["eval"]["tuned"], first["eval"]["base"]
    assert tuned["accuracy"] >= 0.9, tuned
    assert base["accuracy"] <= 0.4, base
    assert tuned["samples"] == base["samples"] == 150
    assert first["prep"]["rows_in"] == first["prep"]["rows_accepted"] + first["prep"]["rows_quarantined"] == 3000

    written = json.loads((tmp_path / "outputs" / "run_summary.json").read_text())
    assert written["stages"]["train"]["fingerprint"] == first["stages"]["train"]["fingerprint"]
    exported = Path(written["export_path"])
    assert (exported / "model.safetensors").is_file() and (exported / "README.md").is_file()
    assert (exported / "tokenizer.json").is_file()

    assert first["promotion"]["version"] == "v0001" and first["promotion"]["promoted"]

    second = pipeline(str(config_path))
    assert states(second) == {"prep": "cached", "train": "cached", "eval": "cached", "export": "cached"}
    assert second["eval"] == first["eval"]
    assert second["promotion"]["version"] == "v0001"  # a cached re-run registers no new version


def test_cache_follows_content_not_paths(prefect_harness, tiny_model_dir, tmp_path):
    from flows.pipeline import pipeline

    data = tmp_path / "data.jsonl"
    data.write_bytes(b"".join(QUICKSTART_DATA.read_bytes().splitlines(keepends=True)[:400]))
    small = {"max_steps": 12, "save_steps": 6, "eval": {"max_samples": 8}}
    config_path = write_config(tmp_path, tiny_model_dir, data, **small)
    assert states(pipeline(str(config_path))) == {"prep": "ran", "train": "ran", "eval": "ran", "export": "ran"}

    # Moving the data elsewhere changes no content: nothing runs.
    moved = tmp_path / "moved" / "data.jsonl"
    moved.parent.mkdir()
    shutil.copy2(data, moved)
    moved_config = write_config(tmp_path, tiny_model_dir, moved, name="moved", **small)
    assert set(states(pipeline(str(moved_config))).values()) == {"cached"}

    # An eval-only setting: eval (and export, which carries eval's metrics) re-run, nothing upstream.
    eval_change = write_config(tmp_path, tiny_model_dir, data, name="eval-change", **{**small, "eval": {"max_samples": 8, "max_tokens": 5}})
    assert states(pipeline(str(eval_change))) == {"prep": "cached", "train": "cached", "eval": "ran", "export": "ran"}

    # One byte of one row: every stage runs again.
    content = data.read_bytes()
    position = content.index(b"shares")
    data.write_bytes(content[:position] + b"Shares" + content[position + len(b"shares"):])
    assert states(pipeline(str(config_path))) == {"prep": "ran", "train": "ran", "eval": "ran", "export": "ran"}

    # An output deleted behind Prefect's back is a cache miss, not a broken pipeline.
    cfg = load_config(config_path)
    for directory in (Path(cfg.state_dir) / "eval").iterdir():
        if directory.is_dir():
            shutil.rmtree(directory)
    rerun = states(pipeline(str(config_path)))
    assert rerun["eval"] == "ran" and rerun["train"] == "cached"


def test_an_edit_that_leaves_prep_output_unchanged_reruns_nothing_downstream(prefect_harness, tiny_model_dir, tmp_path, monkeypatch):
    from flows.pipeline import pipeline
    from tasks import fingerprint

    data = tmp_path / "data.jsonl"
    data.write_bytes(b"".join(QUICKSTART_DATA.read_bytes().splitlines(keepends=True)[:400]))
    contracts = tmp_path / "contracts"
    contracts.mkdir()
    contract = contracts / "quickstart_sentiment.yaml"
    shutil.copy2(REPO / "data_contracts" / "quickstart_sentiment.yaml", contract)
    config_path = write_config(tmp_path, tiny_model_dir, data, max_steps=8, save_steps=4, eval={"max_samples": 6},
                               contract={"dir": str(contracts)})
    first = pipeline(str(config_path))
    assert states(first) == {"prep": "ran", "train": "ran", "eval": "ran", "export": "ran"}

    # A data engineer adds an expectation that every row already meets.
    raw = yaml.safe_load(contract.read_text())
    raw["expectations"].append({"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "assistant_text"},
                                "severity": "error"})
    contract.write_text(yaml.safe_dump(raw))
    after_contract = pipeline(str(config_path))
    assert reasons(after_contract) == {
        "prep": "ran: contracts changed", "train": "cached: upstream output unchanged",
        "eval": "cached: upstream output unchanged", "export": "cached: upstream output unchanged",
    }
    assert after_contract["stages"]["prep"]["fingerprint"] != first["stages"]["prep"]["fingerprint"]
    assert after_contract["stages"]["train"]["fingerprint"] == first["stages"]["train"]["fingerprint"]

    # A developer edits a comment in tasks/prep.py (a copy of tasks/ stands in for the edited tree).
    edited = tmp_path / "tasks"
    shutil.copytree(fingerprint.TASKS_DIR, edited, ignore=shutil.ignore_patterns("__pycache__"))
    (edited / "prep.py").write_text((edited / "prep.py").read_text() + "\n# a comment that changes no output\n")
    monkeypatch.setattr(fingerprint, "TASKS_DIR", edited)
    after_comment = pipeline(str(config_path))
    assert reasons(after_comment) == {
        "prep": "ran: code changed", "train": "cached: upstream output unchanged",
        "eval": "cached: upstream output unchanged", "export": "cached: upstream output unchanged",
    }

    # Nothing changed: every stage comes back cached on its own inputs.
    assert set(reasons(pipeline(str(config_path))).values()) == {"cached: inputs unchanged"}


def test_smoke_run_tries_every_stage_on_the_first_rows_in_its_own_state(prefect_harness, tiny_model_dir, tmp_path):
    from flows.pipeline import pipeline
    from tasks import registry

    config_path = write_config(tmp_path, tiny_model_dir, QUICKSTART_DATA)
    smoke = pipeline(str(config_path), smoke_rows=120)
    assert states(smoke) == {"prep": "ran", "train": "ran", "eval": "ran", "export": "ran"}
    assert smoke["prep"]["rows_in"] == 120 and smoke["train"]["global_step"] == 5
    assert Path(smoke["export_path"]).parent == tmp_path / "outputs" / "smoke"
    cfg = load_config(config_path)
    # Its own state and registry: the real run's stages and production are untouched.
    assert not (Path(cfg.state_dir) / "prep").exists()
    assert registry.production(registry.registry_dir(cfg)) is None


def test_a_stage_past_its_timeout_fails_naming_the_setting(prefect_harness, tiny_model_dir, tmp_path):
    from flows.pipeline import StageTimeoutError, pipeline

    data = tmp_path / "data.jsonl"
    data.write_bytes(b"".join(QUICKSTART_DATA.read_bytes().splitlines(keepends=True)[:200]))
    config_path = write_config(tmp_path, tiny_model_dir, data, max_steps=400, save_steps=None, timeouts={"train": 3})
    started = time.monotonic()
    with pytest.raises(StageTimeoutError, match=r"`train` ran past `timeouts.train: 3` seconds"):
        pipeline(str(config_path))
    assert time.monotonic() - started < 120  # stopped, not trained to the end (400 steps)
