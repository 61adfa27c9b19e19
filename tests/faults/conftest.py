"""Session fixtures of the fault suite: one eval endpoint (its URL is part of eval's fingerprint, so
the reference and the killed runs share it), one Prefect home, and one uninterrupted reference run
carrying canary secrets in every secret setting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import harness, secrets


@pytest.fixture(scope="session")
def faults_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def eval_endpoint() -> Iterator[harness.FaultServer]:
    keys = {secrets.CANARIES["LORAFLOW_FAULTS_EVAL_KEY"], secrets.CANARIES["LORAFLOW_FAULTS_JUDGE_KEY"]}
    with harness.eval_server(api_keys=keys) as server:
        yield server


@pytest.fixture(scope="session")
def run_env(faults_root: Path) -> Iterator[dict[str, str]]:
    """Runs talk to one Prefect server (its SQLite database is searched for secrets) and see the canaries."""
    with harness.prefect_server(faults_root / "prefect-home") as server_env:
        yield {**server_env, **secrets.canary_env()}


@pytest.fixture(scope="session")
def reference_run(faults_root: Path, tiny_model_dir: Path, eval_endpoint: harness.FaultServer, run_env: dict[str, str]) -> Path:
    """An uninterrupted run of the small pipeline, with canaries in every secret setting."""
    run_dir = faults_root / "reference"
    config = harness.write_small_config(run_dir, tiny_model_dir, eval_endpoint.base_url, **secrets.secret_settings(eval_endpoint.base_url))
    exit_code = harness.run_to_completion(config, run_env, run_dir / "run.log")
    assert exit_code == 0, (run_dir / "run.log").read_text()[-3000:]
    return run_dir
