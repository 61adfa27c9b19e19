"""Hub model ids, as real configs write them, resolved from a hub-layout cache offline.

No hub is reachable here, so the tests build what `huggingface_hub` leaves on disk after a download
(`$HF_HOME/hub/models--ORG--NAME/snapshots/<commit>/` and `refs/main`) from the tiny model, and run
with HF_HUB_OFFLINE=1. The pipeline must load the snapshot `refs/main` names, key prep and train on
its commit hash (not a re-hash of the weights), and name that revision in the model card.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks import hub
from tasks.config import RunConfig
from tasks.fingerprint import FileHasher
from tests.test_pipeline_e2e import QUICKSTART_DATA, reasons, states, write_config

HUB_ID = "loraflow-test/tiny-llama"
FIRST_COMMIT = "1" * 40
SECOND_COMMIT = "2" * 40


def add_snapshot(hf_home: Path, hub_id: str, model_dir: Path, commit: str) -> Path:
    """Puts `model_dir` into the cache as snapshot `commit` and points refs/main at it."""
    repo = hf_home / "hub" / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def test_hub_id_resolves_to_the_snapshot_refs_main_names(offline_hub, tiny_model_dir):
    add_snapshot(offline_hub, HUB_ID, tiny_model_dir, FIRST_COMMIT)
    resolved = hub.resolve(HUB_ID)
    assert resolved.path.name == FIRST_COMMIT and (resolved.path / "config.json").is_file()
    assert resolved.identity(FileHasher()) == {"hub_id": HUB_ID, "commit": FIRST_COMMIT}

    add_snapshot(offline_hub, HUB_ID, tiny_model_dir, SECOND_COMMIT)  # refs/main moves on
    assert hub.resolve(HUB_ID).commit == SECOND_COMMIT
    assert hub.resolve(HUB_ID, revision=FIRST_COMMIT).commit == FIRST_COMMIT  # a pinned revision stays

    cfg = RunConfig(base_model=HUB_ID, revision_of_model=FIRST_COMMIT, datasets=[{"path": "rows.jsonl"}])
    assert hub.base_model(cfg).commit == FIRST_COMMIT


def test_a_model_missing_from_the_cache_offline_names_the_fix(offline_hub):
    with pytest.raises(hub.ModelNotFoundError, match="not in the local hub cache.*HF_HUB_OFFLINE=1.*hf download acme/absent"):
        hub.resolve("acme/absent")
    with pytest.raises(hub.ModelNotFoundError, match="neither a local directory nor a hub id"):
        hub.resolve("./no/such/dir/")


@pytest.mark.e2e
def test_quickstart_from_a_hub_id_offline_and_a_new_revision(prefect_harness, offline_hub, tiny_model_dir, tmp_path):
    from flows.pipeline import pipeline

    add_snapshot(offline_hub, HUB_ID, tiny_model_dir, FIRST_COMMIT)
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"".join(QUICKSTART_DATA.read_bytes().splitlines(keepends=True)[:400]))
    config_path = write_config(tmp_path, tiny_model_dir, data, max_steps=8, save_steps=4, eval={"max_samples": 6})
    config_path.write_text(config_path.read_text().replace(str(tiny_model_dir), HUB_ID))

    first = pipeline(str(config_path))
    assert states(first) == {"prep": "ran", "train": "ran", "eval": "ran", "export": "ran"}
    card = (Path(first["export_path"]) / "README.md").read_text()
    assert f"base_model: {HUB_ID}" in card and f"at revision `{FIRST_COMMIT}`" in card

    # refs/main moves to another snapshot (the same files here): the stages that key on the model's
    # revision run again. Eval and export follow only if train's output (adapter + base) changed,
    # which it did: the adapter now belongs to another base revision.
    add_snapshot(offline_hub, HUB_ID, tiny_model_dir, SECOND_COMMIT)
    second = pipeline(str(config_path))
    why = reasons(second)
    assert why["prep"] == "ran: tokenizer changed"
    assert why["train"].startswith("ran: ") and "base_model changed" in why["train"]
    card = (Path(second["export_path"]) / "README.md").read_text()
    assert f"at revision `{SECOND_COMMIT}`" in card


def test_a_hub_dataset_id_is_read_from_the_cache_with_split_and_data_files(offline_hub, tiny_model_dir, tmp_path):
    from tasks.stage import run_stage, stage_key
    from tasks.stages import PREP

    repo = offline_hub / "hub" / "datasets--acme--finance-chat"
    snapshot = repo / "snapshots" / FIRST_COMMIT / "data"
    snapshot.mkdir(parents=True)
    lines = QUICKSTART_DATA.read_bytes().splitlines(keepends=True)
    (snapshot / "train.jsonl").write_bytes(b"".join(lines[:120]))
    (snapshot / "other.jsonl").write_bytes(b"".join(lines[120:130]))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FIRST_COMMIT)
    cfg = RunConfig(
        base_model=str(tiny_model_dir), state_dir=str(tmp_path / "state"), sequence_len=256,
        datasets=[{"path": "acme/finance-chat", "type": "chat_template", "data_files": "data/train.jsonl", "split": "train"}],
    )
    manifest = run_stage(PREP, cfg)
    assert manifest["rows_in"] == 120 and manifest["rows_quarantined"] == 0
    assert manifest["key_parts"]["inputs.sources"]  # keyed on the dataset's commit, not on its files' bytes
    other = cfg.model_copy(update={"datasets": [cfg.datasets[0].model_copy(update={"data_files": "data/other.jsonl"})]})
    assert stage_key(PREP, other, {}) != manifest["fingerprint"]

    with pytest.raises(Exception, match="acme/absent.*not in the local hub cache"):
        run_stage(PREP, cfg.model_copy(update={"datasets": [cfg.datasets[0].model_copy(update={"path": "acme/absent"})]}))
