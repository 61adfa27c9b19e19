"""The GPU training benchmark: its code path on a tiny CPU model, and its skip without a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is not an installed package: `make test` (python -m pytest from the root) finds it,
# a plain `pytest` does not.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.gpu_train import SKIP_MESSAGE, Settings, build_workload, peak_tflops  # noqa: E402


def run_benchmark(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_train", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_tiny_run_reports_every_variant_and_writes_results(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    # On a GPU, --tiny also compiles flex attention (and Liger's kernels, if installed): minutes.
    timeout = 600 if torch.cuda.is_available() else 90
    completed = run_benchmark("--tiny", "--steps", "2", "--warmup", "1", "--results", str(results), timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    variants = report["variants"]
    assert set(variants) == {"baseline", "packed", "packed_flex", "packed_flash", "packed_liger"}
    for name in ("baseline", "packed"):
        figures = variants[name]
        assert figures["status"] == "ok", figures
        assert figures["useful_tokens_per_s"] > 0
        assert figures["losses_finite"]
        # Both train on the same samples, so the same useful tokens.
        assert figures["useful_tokens"] == variants["baseline"]["useful_tokens"]
        if not torch.cuda.is_available():
            assert figures["mfu"] is None
    assert variants["baseline"]["vs_baseline"] == 1.0
    assert variants["packed"]["slot_fill"] > variants["baseline"]["slot_fill"]
    for figures in variants.values():
        assert figures["status"] in ("ok", "skipped", "failed")
        assert figures["status"] == "ok" or figures["error"]
    markdown = results.read_text()
    assert "| baseline | ok |" in markdown and "| packed | ok |" in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the benchmark would run")
def test_without_a_gpu_it_skips_cleanly() -> None:
    completed = run_benchmark(timeout=60)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert SKIP_MESSAGE in completed.stdout


def test_baseline_and_packed_rows_hold_the_same_samples() -> None:
    settings = Settings(
        tiny=True, device="cpu", sequence_len=256, warmup_steps=1, timed_steps=4, padded_batch_size=4, median_len=40, sigma=1.0, min_len=8
    )
    workload = build_workload(settings, vocab_size=512)
    assert len(workload.packed_timed) == 4
    assert all(batch["input_ids"].shape == (1, 256) for batch in workload.packed_warmup + workload.packed_timed)
    assert sum(int(batch["attention_mask"].sum()) for batch in workload.padded_timed) == workload.useful_tokens
    real_tokens = sum(int((batch["labels"] != -100).sum()) for batch in workload.packed_timed)
    # Packing masks each sample's first label (it would be predicted from the previous sample).
    samples = sum(len(batch["attention_mask"]) for batch in workload.padded_timed)
    assert real_tokens == workload.useful_tokens - samples
    assert workload.packed_fill > 0.9 > workload.padded_fill


def test_peak_flops_by_gpu_name() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("Tesla T4") is None
    assert peak_tflops(None) is None
