"""The stage contract (tasks/stage.py) on stages made up for the test: keys, early cutoff, reasons,
publishing, and the library versions that key the real stages. Real stages run end to end in
tests/test_pipeline_e2e.py."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tasks import store
from tasks.config import RunConfig
from tasks.stage import Stage, key_parts, remember, run_stage, stage_key, why_ran
from tasks.stages import TRAIN

# Build functions live in a module the contract imports by name, as the real stages' do.
BUILDS = types.ModuleType("stage_contract_builds")
BUILDS.calls = []  # type: ignore[attr-defined]


def _source_build(cfg: RunConfig, work_dir: Path, upstream: dict[str, Any], text: str = "") -> dict[str, Any]:
    BUILDS.calls.append("source")  # type: ignore[attr-defined]
    (work_dir / "data.txt").write_text(text)
    return {"content": text}


def _consumer_build(cfg: RunConfig, work_dir: Path, upstream: dict[str, Any]) -> dict[str, Any]:
    BUILDS.calls.append("consumer")  # type: ignore[attr-defined]
    return {"seen": upstream["prep"]["content"].upper()}


def _failing_build(cfg: RunConfig, work_dir: Path, upstream: dict[str, Any]) -> dict[str, Any]:
    (work_dir / "half-written").write_text("x")
    raise RuntimeError("build failed half way")


BUILDS._source_build = _source_build  # type: ignore[attr-defined]
BUILDS._consumer_build = _consumer_build  # type: ignore[attr-defined]
BUILDS._failing_build = _failing_build  # type: ignore[attr-defined]
sys.modules["stage_contract_builds"] = BUILDS

SOURCE = Stage("prep", (), ("packing",), "stage_contract_builds:_source_build", reads=lambda m: m["content"])
CONSUMER = Stage("train", ("prep",), ("packing",), "stage_contract_builds:_consumer_build", reads=lambda m: m["seen"])


@pytest.fixture
def cfg(tmp_path: Path) -> RunConfig:
    BUILDS.calls.clear()  # type: ignore[attr-defined]
    return RunConfig(base_model=str(tmp_path / "model"), datasets=[{"path": "rows.jsonl"}], state_dir=str(tmp_path / "state"))


def test_a_built_output_is_published_under_its_key_and_reused(cfg):
    first = run_stage(SOURCE, cfg, text="a")
    final_dir = store.output_dir(cfg, first)
    assert final_dir.name == stage_key(SOURCE, cfg, {}) == first["fingerprint"]
    assert (final_dir / "data.txt").read_text() == "a" and json.loads((final_dir / "manifest.json").read_text()) == first
    assert not store.partial_dir(final_dir).exists()
    assert run_stage(SOURCE, cfg, text="a") == first and BUILDS.calls == ["source"]  # type: ignore[attr-defined]


def test_the_downstream_key_follows_the_upstream_output_not_its_key(cfg):
    """Early cutoff: an upstream built under another key with the same output leaves the
    downstream key, and so its output, as it was."""
    source = run_stage(SOURCE, cfg, text="same")
    consumer = run_stage(CONSUMER, cfg, {"prep": source})

    rebuilt_elsewhere = {**source, "fingerprint": "another-key"}  # e.g. a contract edit, same shards
    assert stage_key(CONSUMER, cfg, {"prep": rebuilt_elsewhere}) == consumer["fingerprint"]
    changed = run_stage(SOURCE, cfg.model_copy(update={"seed": 7}), text="different")
    assert stage_key(CONSUMER, cfg, {"prep": changed}) != consumer["fingerprint"]


def test_why_a_stage_ran_names_what_changed(cfg):
    first = run_stage(SOURCE, cfg, text="a")
    assert why_ran(cfg, first) == "first run"
    remember(cfg, first)
    assert why_ran(cfg, first) == "output was missing"
    assert why_ran(cfg, first, refreshed=True) == "refreshed on request"
    other = run_stage(SOURCE, cfg.model_copy(update={"seed": 7}), text="a")
    assert why_ran(cfg, other) == "settings changed"


def test_a_failed_build_publishes_nothing(cfg):
    failing = Stage("prep", (), ("packing",), "stage_contract_builds:_failing_build")
    with pytest.raises(RuntimeError, match="half way"):
        run_stage(failing, cfg)
    assert store.read_manifest(store.stage_dir(cfg, "prep", stage_key(failing, cfg, {}))) is None


def test_a_missing_upstream_is_named(cfg):
    with pytest.raises(store.MissingUpstreamError, match="`train` needs the output of prep"):
        key_parts(CONSUMER, cfg, {})


def test_a_changed_library_version_changes_the_train_key(cfg, monkeypatch):
    """Upgrading peft (or torch, transformers, ...) must not reuse adapters trained with the old one."""
    from tasks import stages

    prep = {"output_digest": "prep-digest"}
    tiny = Path(cfg.base_model)
    tiny.mkdir()
    (tiny / "config.json").write_text("{}")
    before = stage_key(TRAIN, cfg, {"prep": prep})
    real_version = stages.metadata.version
    monkeypatch.setattr(stages.metadata, "version", lambda name: "999.0" if name == "peft" else real_version(name))
    assert stage_key(TRAIN, cfg, {"prep": prep}) != before
