"""Canary values in every secret setting (eval API key, judge API key, hub token): a full run and a
failing one (an endpoint that rejects the key and echoes it back, as some providers do) leave them
in no log, artifact, manifest, report, model card, saved config, Prefect record or exception."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.faults import harness, secrets

pytestmark = pytest.mark.e2e


def test_canaries_reach_the_servers_and_nothing_else(faults_root: Path, tiny_model_dir: Path, eval_endpoint, run_env: dict,
                                                     reference_run: Path) -> None:
    failing_dir = faults_root / "failing"
    shutil.copytree(reference_run / "state", failing_dir / "state", symlinks=True)
    with harness.eval_server(api_keys={"the-only-key-it-takes"}) as rejecting:
        config = harness.write_small_config(failing_dir, tiny_model_dir, rejecting.base_url, **secrets.secret_settings(rejecting.base_url))
        exit_code = harness.run_to_completion(config, run_env, failing_dir / "run.log")
    failing_log = (failing_dir / "run.log").read_text()
    assert exit_code == 4, failing_log[-3000:]  # a service (the endpoint) refused: exit code 4
    assert "invalid api key ***" in failing_log  # the server echoed the key; our message redacts it

    # The canaries were really used: the keys went to the endpoint and the judge; the hub push was skipped.
    eval_key, judge_key = (secrets.CANARIES[name] for name in ("LORAFLOW_FAULTS_EVAL_KEY", "LORAFLOW_FAULTS_JUDGE_KEY"))
    assert {f"Bearer {eval_key}", f"Bearer {judge_key}"} <= eval_endpoint.authorizations
    report = json.loads(next((reference_run / "state" / "eval").glob("*/eval_report.json")).read_text())
    assert report["judge"]["comparisons"] > 0
    reference_log = (reference_run / "run.log").read_text()
    assert "push to loraflow-faults/canary-model skipped" in reference_log

    roots = [reference_run, failing_dir, faults_root / "prefect-home"]
    assert secrets.find_leaks(roots) == []


def test_the_leak_search_finds_a_planted_canary(tmp_path: Path) -> None:
    """The search would see a leak: as written, base64-encoded, or in a binary file."""
    import base64

    value = secrets.CANARIES["LORAFLOW_FAULTS_HUB_TOKEN"]
    (tmp_path / "log.txt").write_text(f"token={value}\n")
    (tmp_path / "auth.bin").write_bytes(b"\x00Basic " + base64.b64encode(value.encode()) + b"\xff")
    assert sorted(leak.path.name for leak in secrets.find_leaks([tmp_path])) == ["auth.bin", "log.txt"]
