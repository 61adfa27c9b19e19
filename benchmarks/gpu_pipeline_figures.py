"""Figures of benchmarks/gpu_pipeline.py's checks, read from what the stages published: run summaries,
manifests, metrics.jsonl, and tasks/memory.py's estimate for a config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_summary(cfg_overrides: dict[str, Any]) -> dict[str, Any]:
    return json.loads((Path(cfg_overrides["output_dir"]) / "run_summary.json").read_text())


def stage_dir(overrides: dict[str, Any], stage: str, fingerprint: str) -> Path:
    return Path(overrides["state_dir"]) / stage / fingerprint


def train_figures(overrides: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Losses (metrics.jsonl of the published train output), steps and eval loss."""
    train_dir = stage_dir(overrides, "train", summary["stages"]["train"]["fingerprint"])
    manifest = json.loads((train_dir / "manifest.json").read_text())
    records = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [record["loss"] for record in records if "loss" in record]
    return {
        "global_step": manifest["global_step"],
        "attn_implementation": manifest.get("attn_implementation"),
        "processes": manifest.get("processes"),
        **loss_figures(losses),
        "eval_loss": manifest.get("eval_loss"),
        "tokens_seen": manifest.get("tokens_seen"),
        "records": records,
    }


def loss_figures(losses: list[float]) -> dict[str, Any]:
    """JSON has no NaN: a diverged loss is null, and losses_finite says so. Falling: the mean of the last
    third of the logged losses below the mean of the first third."""
    finite = bool(losses) and all(math.isfinite(loss) for loss in losses)
    third = max(1, len(losses) // 3)
    falling = finite and len(losses) >= 2 and sum(losses[-third:]) / third < sum(losses[:third]) / third
    return {
        "losses": [round(loss, 4) if math.isfinite(loss) else None for loss in losses],
        "loss_first": round(losses[0], 4) if finite else None,
        "loss_last": round(losses[-1], 4) if finite else None,
        "losses_finite": finite,
        "losses_falling": falling,
    }


def memory_estimate(config_path: Path, processes: int = 1) -> dict[str, float] | None:
    """tasks/memory.py's estimate for the config, the figure `loraflow validate` prints."""
    from tasks.config_load import load_config
    from tasks.launch import zero_stage
    from tasks.memory import estimate_peak_memory, read_model_config

    cfg = load_config(config_path)
    model_config = read_model_config(cfg)
    if model_config is None:
        return None
    return {name: round(value, 3) for name, value in estimate_peak_memory(cfg, model_config, processes, zero_stage(cfg)).items()}


def compare_memory(measured_gb: float | None, estimate: dict[str, float] | None) -> dict[str, Any]:
    """Measured `max_memory_allocated` against the estimate less its CUDA-context allowance (which the
    allocator does not see)."""
    if estimate is None:
        return {"memory_estimate_gb": None}
    allocatable = estimate["peak"] - estimate["cuda_context"]
    return {
        "memory_estimate_gb": estimate["peak"],
        "memory_estimate_allocatable_gb": round(allocatable, 3),
        "measured_over_estimate": round(measured_gb / allocatable, 3) if measured_gb and allocatable > 0 else None,
    }


def non_embedding_parameters(model_config: dict[str, Any]) -> int:
    """N of gpu_train.py's MFU convention: every parameter but the input embedding (lm_head counted)."""
    from tasks.memory import ModelShape

    shape = ModelShape.from_config(model_config)
    per_layer = sum(fan_in * fan_out for fan_in, fan_out in shape.linear_shapes().values()) + 2 * shape.hidden
    return shape.layers * per_layer + shape.hidden + shape.vocab * shape.hidden


def attention_flops_per_token(prep_dir: Path, manifest: dict[str, Any], model_config: dict[str, Any]) -> float:
    """3 * 2 * L^2 * d * layers summed over the packed training samples, per token (gpu_train.py's attention
    term); sample boundaries are where position_ids restart at 0."""
    from datasets import Dataset

    squares = tokens = 0
    for shard in manifest["train_shards"]:
        for position_ids in Dataset.from_file(str(prep_dir / shard["file"]))["position_ids"]:
            starts = [index for index, position in enumerate(position_ids) if position == 0] + [len(position_ids)]
            squares += sum((end - start) ** 2 for start, end in zip(starts, starts[1:]))
            tokens += len(position_ids)
    return 3 * 2 * squares * model_config["hidden_size"] * model_config["num_hidden_layers"] / max(tokens, 1)


def median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
