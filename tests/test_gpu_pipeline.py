"""benchmarks/gpu_pipeline.sh: its dry run on a CPU (CI), and its GPU checks as `gpu` tests.

The dry run runs the script's whole sequence on the tiny model (under 2 minutes on two cores unless
other jobs share them).
The `gpu` tests read the JSON of one real run on a CUDA GPU: the file named by GPU_PIPELINE_JSON
(written by an earlier `bash benchmarks/gpu_pipeline.sh`, so a lent GPU's minutes are spent once),
else a run of the script made here for the session. Without CUDA they skip.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_pipeline.sh"
GPU_CHECKS = ("base_model", "validate", "pipeline", "zero2", "zero3", "loop_compile_8b", "trainer_compile_8b")
# The estimate may overstate the peak (it is for sizing a GPU) but must not understate it by more than this.
ESTIMATE_UNDERSTATES_AT_MOST = 1.25
# ... nor overstate it so much that it stops being useful.
ESTIMATE_OVERSTATES_AT_MOST = 4.0
# benchmarks/RESULTS.md: packed + flex + regional compile reached MFU 0.403 on an H200 (2026-11-27).
LOOP_COMPILE_MFU_FLOOR = 0.35


def run_script(out_dir: Path, *arguments: str, timeout: float) -> dict[str, Any]:
    """Runs the script; returns the JSON object of its last stdout line (which it also writes to OUT)."""
    completed = subprocess.run(
        ["bash", str(SCRIPT), *arguments],
        cwd=REPO_ROOT,
        env={**os.environ, "OUT": str(out_dir)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert json.loads((out_dir / "gpu_pipeline.json").read_text()) == report
    return report


def failures(report: dict[str, Any]) -> str:
    """The failed checks with their errors, for assertion messages (the log is gpu_pipeline.log)."""
    return "; ".join(f"{name}: {check.get('error')}" for name, check in report["checks"].items() if check["status"] == "failed")


def assert_losses_finite(train: dict[str, Any]) -> None:
    assert train["losses_finite"], train["losses"]
    assert train["losses"] and all(loss is not None and math.isfinite(loss) for loss in train["losses"])


# --- the dry run (CPU, CI) ------------------------------------------------------------------------


def test_dry_run(tmp_path: Path) -> None:
    report = run_script(tmp_path / "out", "--dry-run", timeout=360)
    assert report["mode"] == "dry-run"
    assert report["status"] == "ok", failures(report)
    checks = report["checks"]
    assert tuple(checks) == GPU_CHECKS
    for name, check in checks.items():
        assert check["status"] in ("ok", "skipped"), (name, check)
        if check["status"] == "skipped":
            assert check["reason"], name
    # DeepSpeed is the one GPU-only path with no CPU equivalent.
    for name in ("zero2", "zero3"):
        assert checks[name]["status"] == "skipped" and checks[name]["reason"].startswith("needs a GPU"), checks[name]
    for name in ("base_model", "validate", "pipeline", "loop_compile_8b", "trainer_compile_8b"):
        assert checks[name]["status"] == "ok", (name, checks[name])
    assert set(report["replaced"]) >= {"optimizer", "bf16", "eval.endpoint", "deepspeed", "torch_compile"}

    pipeline = checks["pipeline"]
    # `loraflow run --only prep`, `--only train`, then the whole run, in which prep and train are cached.
    assert pipeline["whole_run_states"] == {"prep": "cached", "train": "cached", "eval": "ran", "export": "ran"}
    assert all(seconds is not None and seconds > 0 for seconds in pipeline["stage_seconds"].values()), pipeline["stage_seconds"]
    assert_losses_finite(pipeline["train"])
    assert pipeline["train"]["losses_falling"], pipeline["train"]["losses"]
    assert pipeline["merge"]["within_tolerance"] and pipeline["merge"]["max_logit_diff"] <= pipeline["merge"]["tolerance"]
    assert pipeline["merge"]["weights_changed"] > 0
    assert pipeline["eval"]["tuned"]["samples"] == pipeline["eval"]["base"]["samples"] > 0
    assert pipeline["memory_estimate_gb"] > 0
    assert checks["validate"]["printed_estimate_gb"] == pytest.approx(checks["validate"]["memory_estimate"]["peak"], abs=0.051)

    assert checks["loop_compile_8b"]["useful_tokens_per_s"] > 0 and checks["loop_compile_8b"]["losses_finite"]
    trainer = checks["trainer_compile_8b"]
    assert trainer["tokens_per_s"] > 0 and trainer["timed_steps"] > 0
    assert_losses_finite(trainer["train"])
    assert trainer["mfu"] is None  # no peak FLOP/s for a CPU
    assert "comparison" in report


# --- on a CUDA GPU --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gpu_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
    if os.environ.get("GPU_PIPELINE_JSON"):
        report = json.loads(Path(os.environ["GPU_PIPELINE_JSON"]).read_text())
    else:
        report = run_script(tmp_path_factory.mktemp("gpu-pipeline"), timeout=600)
    assert report["mode"] == "gpu", report.get("mode")
    return report


def gpu_check(report: dict[str, Any], name: str) -> dict[str, Any]:
    check = report["checks"][name]
    assert check["status"] == "ok", f"{name}: {check.get('error') or check.get('reason')}"
    return check


@pytest.mark.gpu
def test_gpu_every_check_ok(gpu_report: dict[str, Any]) -> None:
    assert {name: check["status"] for name, check in gpu_report["checks"].items()} == dict.fromkeys(GPU_CHECKS, "ok"), failures(gpu_report)


@pytest.mark.gpu
def test_gpu_pipeline_runs_every_stage_and_losses_fall(gpu_report: dict[str, Any]) -> None:
    pipeline = gpu_check(gpu_report, "pipeline")
    assert pipeline["whole_run_states"] == {"prep": "cached", "train": "cached", "eval": "ran", "export": "ran"}
    train = pipeline["train"]
    assert_losses_finite(train)
    assert train["losses_falling"], train["losses"]
    # auto: flash-attn when installed, else flex attention; never the CPU's SDPA.
    assert train["attn_implementation"] in ("flash_attention_2", "flex_attention")
    assert pipeline["eval"]["tuned"]["samples"] > 0


@pytest.mark.gpu
def test_gpu_merge_within_tolerance(gpu_report: dict[str, Any]) -> None:
    merge = gpu_check(gpu_report, "pipeline")["merge"]
    assert merge["max_logit_diff"] <= merge["tolerance"], merge
    assert merge["weights_changed"] > 0 and merge["generations_match"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_gpu_deepspeed_train_stage(gpu_report: dict[str, Any], name: str) -> None:
    train = gpu_check(gpu_report, name)["train"]
    assert_losses_finite(train)
    assert train["global_step"] == 6


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["pipeline", "trainer_compile_8b"])
def test_gpu_memory_estimate_against_max_memory_allocated(gpu_report: dict[str, Any], name: str) -> None:
    check = gpu_check(gpu_report, name)
    measured = check["peak_memory_gb"]["train"] if name == "pipeline" else check["peak_memory_gb"]
    estimate = check["memory_estimate_allocatable_gb"]
    assert measured and estimate, check
    assert measured <= ESTIMATE_UNDERSTATES_AT_MOST * estimate, f"measured {measured} GB, estimated {estimate} GB"
    assert estimate <= ESTIMATE_OVERSTATES_AT_MOST * measured, f"measured {measured} GB, estimated {estimate} GB"


@pytest.mark.gpu
def test_gpu_throughput_trainer_and_loop_are_measured(gpu_report: dict[str, Any]) -> None:
    loop = gpu_check(gpu_report, "loop_compile_8b")
    trainer = gpu_check(gpu_report, "trainer_compile_8b")
    assert loop["useful_tokens_per_s"] > 0 and trainer["tokens_per_s"] > 0
    assert loop["mfu"] >= LOOP_COMPILE_MFU_FLOOR, loop
    assert trainer["mfu"] > 0 and trainer["torch_compile"]
    assert_losses_finite(trainer["train"])
    assert gpu_report["comparison"]["trainer_over_loop"] > 0
