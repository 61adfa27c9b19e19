"""The model registry and the promotion gate, on real directories (no model needed: an export is
a directory of files with a manifest, exactly what the export stage publishes).

- the gate promotes a better model and refuses a worse one, and says why;
- registering the same export twice makes one version, decided once (a cached nightly re-run
  cannot re-promote a version someone rolled back);
- `loraflow models / promote / rollback` move the pointer by hand;
- kill -9 while registering leaves no version or a complete one, never a partial one;
- a hub push is skipped with a message when offline and fails loudly otherwise.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.registry_cli import registry_app
from tasks import registry, store
from tasks.config import RunConfig
from tasks.fingerprint import hash_json
from tasks.serving import free_port

REPO = Path(__file__).resolve().parents[1]
GATE = [{"metric": "accuracy", "min": 0.9, "max_regression": 0.01}]


def make_config(tmp_path: Path, promote_if: list | None = None, **overrides) -> RunConfig:
    raw = {
        "name": "sentiment",
        "base_model": str(tmp_path / "base"),
        "datasets": [{"path": str(tmp_path / "data.jsonl")}],
        "state_dir": str(tmp_path / "state"),
        "export": {"promote_if": promote_if if promote_if is not None else GATE},
        **overrides,
    }
    return RunConfig.model_validate(raw)


def make_export(cfg: RunConfig, accuracy: float, eval_loss: float = 0.5, files: int = 1, tag: str = "") -> tuple[Path, dict]:
    """An export stage output as the stage publishes it: model files, card, manifest last."""
    fingerprint = hash_json({"accuracy": accuracy, "loss": eval_loss, "files": files, "tag": tag})
    final_dir = store.stage_dir(cfg, "export", fingerprint)
    work_dir = store.fresh_partial_dir(final_dir)
    model_dir = work_dir / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "README.md").write_text(f"# card\naccuracy {accuracy}\n")
    for index in range(files):
        (model_dir / f"model-{index:05d}.safetensors").write_bytes(os.urandom(256))
    manifest = {
        "stage": "export",
        "fingerprint": fingerprint,
        "model_dir": "model",
        "kind": "merged",
        "metrics": {"tuned": {"accuracy": accuracy, "exact_match": accuracy}, "base": {"accuracy": 0.3}, "eval_loss": eval_loss},
        "lineage": {"data_fingerprint": "d" * 64},
    }
    return final_dir, store.publish(work_dir, final_dir, manifest)


def gate(cfg: RunConfig, accuracy: float, **kwargs) -> dict:
    return registry.register_and_gate(cfg, *make_export(cfg, accuracy, **kwargs))


def test_gate_promotes_a_better_model_and_refuses_a_worse_one(tmp_path):
    cfg = make_config(tmp_path)
    root = registry.registry_dir(cfg)
    assert root == tmp_path / "registry" / "sentiment"  # beside the state dir, not inside the cache

    first = gate(cfg, 0.92)
    assert first["promoted"] and first["version"] == "v0001" and first["production"] == "v0001"
    assert "no production version yet" in first["reason"]

    better = gate(cfg, 0.95)
    assert better["promoted"] and better["production"] == "v0002" and better["production_before"] == "v0001"

    worse = gate(cfg, 0.93)  # 0.02 below production, margin 0.01
    assert not worse["promoted"], worse
    assert worse["version"] == "v0003" and worse["production"] == "v0002"
    assert "0.93 vs 0.95 in production v0002 (beyond max_regression 0.01)" in worse["reason"]

    slightly_worse = gate(cfg, 0.945)  # within the margin
    assert slightly_worse["promoted"] and slightly_worse["production"] == "v0004"

    below_minimum = gate(cfg, 0.85)
    assert not below_minimum["promoted"] and "0.85 < min 0.9" in below_minimum["reason"]

    # A refused model is kept as a version, with its card, metrics and decision.
    versions = {v.name: v for v in registry.list_versions(root)}
    assert list(versions) == ["v0001", "v0002", "v0003", "v0004", "v0005"]
    refused = versions["v0003"]
    assert (refused.path / "model" / "README.md").read_text().startswith("# card")
    assert refused.metrics["tuned"]["accuracy"] == 0.93
    assert refused.decision["promoted"] is False
    assert registry.production(root) == "v0004"
    assert (root / "production" / "model" / "config.json").is_file()


def test_same_export_registers_once_and_is_decided_once(tmp_path):
    cfg = make_config(tmp_path)
    root = registry.registry_dir(cfg)
    gate(cfg, 0.92)
    second_dir, second_manifest = make_export(cfg, 0.95)
    assert registry.register_and_gate(cfg, second_dir, second_manifest)["production"] == "v0002"

    registry.rollback(root)  # someone decides v0002 is bad in production
    assert registry.production(root) == "v0001"
    again = registry.register_and_gate(cfg, second_dir, second_manifest)  # the nightly re-run, cached
    assert again["already_decided"] and again["version"] == "v0002"
    assert registry.production(root) == "v0001"
    assert [v.name for v in registry.list_versions(root)] == ["v0001", "v0002"]
    # Hard links: the version shares the export's bytes instead of copying them.
    exported = second_dir / "model" / "model-00000.safetensors"
    assert (root / "versions" / "v0002" / "model" / "model-00000.safetensors").stat().st_ino == exported.stat().st_ino


def test_lower_is_better_metrics_and_missing_metrics(tmp_path):
    cfg = make_config(tmp_path, promote_if=[{"metric": "eval_loss", "max_regression": 0.05, "higher_is_better": False}])
    assert gate(cfg, 0.9, eval_loss=0.80)["promoted"]
    refused = gate(cfg, 0.9, eval_loss=0.90, tag="higher loss")
    assert not refused["promoted"] and "eval_loss 0.9 vs 0.8" in refused["reason"]
    assert gate(cfg, 0.9, eval_loss=0.82, tag="slightly higher")["promoted"]

    misspelled = make_config(tmp_path, promote_if=[{"metric": "acuracy", "min": 0.5}])
    decision = gate(misspelled, 0.99, tag="misspelled")
    assert not decision["promoted"]
    assert "metric `acuracy` is not in the eval metrics" in decision["reason"] and "tuned.accuracy" in decision["reason"]


def test_without_conditions_every_new_version_is_promoted(tmp_path):
    cfg = make_config(tmp_path, promote_if=[])
    gate(cfg, 0.9)
    assert gate(cfg, 0.1)["production"] == "v0002"


def test_cli_lists_promotes_and_rolls_back(tmp_path):
    cfg = make_config(tmp_path)
    root = registry.registry_dir(cfg)
    gate(cfg, 0.92)
    gate(cfg, 0.95)
    gate(cfg, 0.50)  # refused
    runner = CliRunner()

    listed = runner.invoke(registry_app, ["models", "--registry", str(root), "--json"])
    assert listed.exit_code == 0, listed.output
    listing = json.loads(listed.output)
    assert listing["production"] == "v0002"
    assert [(v["version"], v["production"]) for v in listing["versions"]] == [("v0001", False), ("v0002", True), ("v0003", False)]
    assert listing["versions"][2]["metrics"]["tuned.accuracy"] == 0.5
    assert "not promoted" in listing["versions"][2]["decision"]
    table = runner.invoke(registry_app, ["models", "--registry", str(root)])
    assert table.exit_code == 0 and "v0003" in table.output and "production: v0002" in table.output

    config_path = tmp_path / "sentiment.yaml"
    config_path.write_text(json.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    promoted = runner.invoke(registry_app, ["promote", "3", "--config", str(config_path)])
    assert promoted.exit_code == 0, promoted.output
    assert "v0002 -> v0003" in promoted.output and registry.production(root) == "v0003"

    assert "v0003 -> v0002" in runner.invoke(registry_app, ["rollback", "-r", str(root)]).output
    assert "v0002 -> v0001" in runner.invoke(registry_app, ["rollback", "-r", str(root)]).output
    nothing_left = runner.invoke(registry_app, ["rollback", "-r", str(root)])
    assert nothing_left.exit_code == 2 and "first production version" in nothing_left.output
    unknown = runner.invoke(registry_app, ["promote", "v0009", "-r", str(root)])
    assert unknown.exit_code == 2 and "no version v0009" in unknown.output
    missing = runner.invoke(registry_app, ["models", "-r", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no registry at" in missing.output
    history = [entry["event"] for entry in registry.read_history(root)]
    assert history.count("rollback") == 2 and history.count("registered") == 3


REGISTER_SCRIPT = """
import json, sys
from pathlib import Path
from tasks import registry
from tasks.config import RunConfig
cfg = RunConfig.model_validate_json(Path(sys.argv[1]).read_text())
export_dir = Path(sys.argv[2])
registry.register_and_gate(cfg, export_dir, json.loads((export_dir / "manifest.json").read_text()))
"""


def test_kill_9_while_registering_leaves_no_partial_version(tmp_path):
    cfg = make_config(tmp_path)
    root = registry.registry_dir(cfg)
    export_dir, manifest = make_export(cfg, 0.95, files=3000)
    config_file = tmp_path / "cfg.json"
    config_file.write_text(cfg.model_dump_json())
    partial = root / "versions" / ".v0001.partial"

    killed_mid_registration = False
    for _ in range(5):
        process = subprocess.Popen([sys.executable, "-c", REGISTER_SCRIPT, str(config_file), str(export_dir)], cwd=REPO)
        while process.poll() is None and not partial.exists():
            time.sleep(0.001)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            killed_mid_registration = not (root / "versions" / "v0001").exists()
        assert registry.list_versions(root) == [] or registry.list_versions(root)[0].record["fingerprint"] == manifest["fingerprint"]
        if killed_mid_registration:
            break
        shutil.rmtree(root)  # it finished before the kill landed: try again
    assert killed_mid_registration, "the kill never landed while the version was being assembled"

    # Readers see nothing: no version, no production pointer.
    assert registry.list_versions(root) == []
    assert registry.production(root) is None
    assert not (root / "production").exists()

    decision = registry.register_and_gate(cfg, export_dir, manifest)
    assert decision["promoted"] and decision["version"] == "v0001"
    version = registry.read_version(root, "v0001")
    assert len(list((version.path / "model").glob("*.safetensors"))) == 3000
    assert not partial.exists()


class _FailingHub(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_error(500, "hub is down")

    do_POST = do_PUT = do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_hub_push_is_skipped_offline_and_fails_loudly_otherwise(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, hub_model_id="acme/sentiment")
    root = registry.registry_dir(cfg)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = gate(cfg, 0.92)
    assert offline["promoted"] and offline["hub"]["status"] == "skipped"
    assert "HF_HUB_OFFLINE is set" in offline["hub"]["reason"] and "hf upload acme/sentiment" in offline["hub"]["reason"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    unreachable = gate(cfg, 0.95)
    assert unreachable["promoted"] and "is unreachable" in unreachable["hub"]["reason"]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(registry.HubPushError, match=r"\$HF_TOKEN is not set"):
            gate(cfg, 0.96)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        with pytest.raises(registry.HubPushError, match="push of .* to acme/sentiment failed"):
            gate(cfg, 0.96)
    finally:
        server.shutdown()
    # The push is part of promoting: it failed, so production did not move and the version is
    # left undecided, to be gated (and pushed) again by the next run.
    assert registry.production(root) == "v0002"
    assert registry.read_version(root, "v0003").decision is None


def test_promote_task_runs_in_a_flow_and_leaves_an_artifact(tmp_path, prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks.promotion import promote_task

    cfg = make_config(tmp_path)
    export_dir, manifest = make_export(cfg, 0.97)

    @flow
    def promote_flow() -> dict:
        return promote_task(cfg, manifest)

    decision = promote_flow()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    assert decision["promoted"] and decision["version"] == "v0001" and decision["production"] == "v0001"
    markdown = next(a for a in artifacts if a.key == "sentiment-promotion")
    assert "v0001 promoted to production" in markdown.data
