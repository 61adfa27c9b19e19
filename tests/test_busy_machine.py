"""The first command a newcomer types, on a busy machine: with a fresh PREFECT_HOME the ephemeral
Prefect server migrates its database at start, which took longer than Prefect's 20 s default on a
loaded 2-core machine and killed the run. Here three CPU-bound processes keep both cores busy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUSY_LOOP = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end:\n    pass\n"

pytestmark = pytest.mark.e2e


def test_first_run_with_a_fresh_prefect_home_survives_a_busy_machine(tiny_model_dir, tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    raw.update(base_model=str(tiny_model_dir), state_dir=str(tmp_path / "state"), output_dir=str(tmp_path / "out"))
    raw["contract"] = {"dir": str(REPO / "data_contracts")}
    raw["datasets"][0]["path"] = str(REPO / raw["datasets"][0]["path"])
    config = tmp_path / "quickstart.yaml"
    config.write_text(yaml.safe_dump(raw))
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    environment.update(PREFECT_HOME=str(tmp_path / "fresh-prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")

    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(3)]
    try:
        result = subprocess.run([str(BIN / "loraflow"), "run", str(config), "--only", "prep"], cwd=REPO, env=environment,
                                capture_output=True, text=True, timeout=900)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Timed out while attempting to connect" not in result.stdout + result.stderr
    assert "prep" in result.stdout and "ran" in result.stdout
