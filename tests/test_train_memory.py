"""Memory estimate, hardware checks and the shipped recipes, all without model files or a GPU.

The Llama-3-8B figures are worked out by hand below from its config.json (hidden 4096,
intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256, untied embeddings) and the
rules in `estimate_peak_memory`'s docstring.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import RunConfig
from tasks.config_load import load_config
from tasks.gpus import GpuInfo, visible_gpus
from tasks.launch import plan_processes, zero_stage
from tasks.memory import (
    describe_estimate,
    estimate_peak_memory,
    hardware_problems,
    out_of_memory_advice,
)

REPO = Path(__file__).resolve().parents[1]
LLAMA_3_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 8192,
}
LLAMA_3_70B = {
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}
RECIPE_MODELS = {  # public config.json values of the models the recipes name
    "llama3-8b-qlora": LLAMA_3_8B,
    "llama3-70b-lora-zero3": LLAMA_3_70B,
    "qwen2.5-7b-qlora": {
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
    },
    "mistral-7b-lora": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32768, "tie_word_embeddings": False,
    },
    "deepseek-style-lora": {
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 30, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 102400, "tie_word_embeddings": False,
    },
}
LINEAR_PARAMS = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # q, o; k, v; gate, up, down
EMBEDDING_PARAMS = 128256 * 4096
OTHER_PARAMS = 2 * EMBEDDING_PARAMS + (2 * 32 + 1) * 4096  # embeddings, lm_head, norms
GB = 1e9


def config(**settings) -> RunConfig:
    return RunConfig(base_model="models/llama", datasets=[{"path": "rows.jsonl"}], **settings)


def test_parameter_count_is_llama_3_8b():
    assert LINEAR_PARAMS + OTHER_PARAMS == 8_030_261_248


def test_qlora_estimate_matches_the_hand_computation():
    cfg = config(
        adapter="qlora", bf16=True, lora_r=16, lora_dropout=0.05, lora_target_modules="all-linear", micro_batch_size=1,
        sequence_len=2048, gradient_checkpointing=True, optimizer="paged_adamw_8bit",
    )
    estimate = estimate_peak_memory(cfg, LLAMA_3_8B)

    nf4_bytes = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + 8-bit absmax per 64 + fp32 scale per 256 absmax
    weights = LINEAR_PARAMS * nf4_bytes + OTHER_PARAMS * 4  # the rest in fp32 after prepare_model_for_kbit_training
    lora = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert lora == 41_943_040
    layer_bytes = (4 * 4096 + 2 * 4096 + 2 * 1024 + 4 * 14336) * 2 + 4 * (6 * 4096 + 14336)  # bf16 + LoRA's fp32 inputs
    expected = {
        "weights": weights / GB,
        "trainable": lora * 4 / GB,
        "gradients": lora * 4 / GB,
        "optimizer": 2 * lora / GB,
        "activations_without_checkpointing": 2048 * 32 * layer_bytes / GB,
        "activations_with_checkpointing": 2048 * (32 * 4096 * 2 + layer_bytes) / GB,
        "logits": 2048 * 128256 * (2 + 4 + 4) / GB,
        "cuda_context": 0.5,
        "gathered_layer": 0.0,  # nothing is sharded in one process
    }
    expected["peak"] = sum(value for name, value in expected.items() if name != "activations_without_checkpointing")
    assert estimate == pytest.approx(expected, rel=1e-12)
    assert estimate["weights"] == pytest.approx(7.804, abs=1e-3)
    assert estimate["peak"] == pytest.approx(12.550, abs=1e-3)


def test_lora_estimate_with_modules_to_save_matches_the_hand_computation():
    cfg = config(
        adapter="lora", bf16=True, lora_r=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"],
        lora_modules_to_save=["embed_tokens", "lm_head"], micro_batch_size=2, sequence_len=1024, optimizer="adamw_torch",
    )
    estimate = estimate_peak_memory(cfg, LLAMA_3_8B)

    lora = 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    trainable = lora * 4 + 2 * EMBEDDING_PARAMS * 2  # fp32 LoRA, bf16 copies of embeddings and lm_head
    layer_bytes = (4 * 4096 + 2 * 4096 + 2 * 1024 + 4 * 14336) * 2 + 4 * (4096 + 4096)
    expected_peak = (
        (LINEAR_PARAMS + OTHER_PARAMS) * 2 + 2 * trainable + 2 * trainable + 2048 * 32 * layer_bytes + 2048 * 128256 * 10
    ) / GB + 0.5
    assert estimate["peak"] == pytest.approx(expected_peak, rel=1e-12)
    assert estimate["optimizer"] == pytest.approx(2 * trainable / GB, rel=1e-12)
    assert estimate["activations_with_checkpointing"] < estimate["activations_without_checkpointing"] / 10


def test_sharding_divides_what_each_stage_of_zero_and_fsdp_shards():
    settings = {"adapter": "lora", "bf16": True, "lora_r": 16, "lora_target_modules": "all-linear", "gradient_checkpointing": True}
    cfg = config(**settings)
    alone = estimate_peak_memory(cfg, LLAMA_3_8B)
    ddp = estimate_peak_memory(cfg, LLAMA_3_8B, processes=8)
    zero1, zero2, zero3 = (estimate_peak_memory(cfg, LLAMA_3_8B, 8, stage) for stage in (1, 2, 3))
    fsdp = estimate_peak_memory(config(**settings, fsdp=["full_shard"]), LLAMA_3_8B, 8)

    assert ddp == alone  # every process holds everything
    assert zero1["optimizer"] == pytest.approx(alone["optimizer"] / 8) and zero1["gradients"] == alone["gradients"]
    assert zero2["gradients"] == pytest.approx(alone["gradients"] / 8) and zero2["weights"] == alone["weights"]
    for sharded in (zero3, fsdp):
        assert sharded["weights"] == pytest.approx(alone["weights"] / 8)
        assert sharded["trainable"] == pytest.approx(alone["trainable"] / 8)
        # One decoder layer's bf16 linear weights gathered at a time.
        assert sharded["gathered_layer"] == pytest.approx(LINEAR_PARAMS * 2 / 32 / GB)
        assert sharded["activations_with_checkpointing"] == alone["activations_with_checkpointing"]
    assert zero3 == fsdp
    assert alone["peak"] > zero1["peak"] > zero2["peak"] > zero3["peak"]


def test_qlora_sharded_keeps_unquantized_weights_in_the_compute_dtype():
    cfg = config(adapter="qlora", bf16=True, fsdp=["full_shard"])
    unsharded = estimate_peak_memory(config(adapter="qlora", bf16=True), LLAMA_3_8B)
    sharded = estimate_peak_memory(cfg, LLAMA_3_8B, processes=2)

    assert unsharded["weights"] * GB == pytest.approx(LINEAR_PARAMS * (0.5 + 1 / 64 + 4 / (64 * 256)) + OTHER_PARAMS * 4)
    assert sharded["weights"] * GB * 2 == pytest.approx(LINEAR_PARAMS * (0.5 + 1 / 64 + 4 / (64 * 256)) + OTHER_PARAMS * 2)


def test_validate_lines_warn_when_the_estimate_exceeds_the_gpu():
    cfg = config(bf16=True, micro_batch_size=2, sequence_len=2048)
    estimate = estimate_peak_memory(cfg, LLAMA_3_8B)
    small = [GpuInfo(0, "NVIDIA L4", 23.8, 8.9)]
    large = [GpuInfo(0, "NVIDIA H200", 150.0, 9.0)]
    assert 23.8 < estimate["peak"] < 150.0

    lines = describe_estimate(cfg, estimate, small)
    assert lines[0].startswith(f"estimated peak GPU memory: {estimate['peak']:.1f} GB")
    warning = lines[-1]
    assert warning.startswith("warning: the estimate exceeds GPU 0 (NVIDIA L4, 23.8 GB)")
    for knob in ("micro_batch_size: 1", "gradient_accumulation_steps: 2", "gradient_checkpointing: true", "adapter: qlora",
                 "sequence_len: 1024"):
        assert knob in warning
    assert not any(line.startswith("warning") for line in describe_estimate(cfg, estimate, large))
    assert "no GPU is visible" in describe_estimate(cfg, estimate, [])[-1]


def test_out_of_memory_advice_skips_knobs_already_turned():
    cfg = config(adapter="qlora", micro_batch_size=1, gradient_checkpointing=True, sequence_len=128, optimizer="paged_adamw_8bit")
    assert out_of_memory_advice(cfg, LLAMA_3_8B).endswith("every memory setting is already at its lowest")
    assert "estimated peak" not in out_of_memory_advice(cfg, None)


def test_hardware_problems_name_the_fix():
    gpu_settings = config(bf16=True, tf32=True, flash_attention=True, optimizer="paged_adamw_8bit")

    on_cpu = hardware_problems(gpu_settings, [])
    assert len(on_cpu) == 4
    assert any("`bf16: true` needs a GPU" in problem and "bf16: false" in problem for problem in on_cpu)
    assert any("paged_adamw_8bit` needs a CUDA GPU" in problem for problem in on_cpu)
    on_v100 = hardware_problems(gpu_settings, [GpuInfo(0, "Tesla V100", 34.1, 7.0)])
    assert len(on_v100) == 3 and all("compute capability 8.0+" in problem for problem in on_v100)
    assert hardware_problems(gpu_settings, [GpuInfo(0, "NVIDIA H100", 85.0, 9.0)]) == []
    assert hardware_problems(config(adapter="qlora"), []) == []  # QLoRA itself runs on a CPU, in fp32


def test_visible_gpus_reads_nvidia_smi():
    if shutil.which("nvidia-smi") is None:
        assert visible_gpus() == []
    else:
        assert all(gpu.memory_gb > 1 for gpu in visible_gpus())


@pytest.mark.parametrize("recipe", sorted(RECIPE_MODELS))
def test_recipe_loads_and_fits_the_gpu_its_comment_names(recipe):
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml")
    processes = plan_processes(cfg, []).processes
    estimate = estimate_peak_memory(cfg, RECIPE_MODELS[recipe], processes, zero_stage(cfg))
    stated = int(next(line for line in (REPO / "configs" / f"{recipe}.yaml").read_text().splitlines() if "about" in line and " GB" in line)
                 .split("about ")[1].split(" GB")[0])

    assert abs(estimate["peak"] - stated) < 1, (recipe, estimate["peak"])
    assert cfg.bf16 and cfg.gradient_checkpointing and cfg.val_set_size > 0
    assert cfg.load_in_4bit == recipe.endswith("qlora")
    if recipe == "deepseek-style-lora":
        assert cfg.lora_modules_to_save == ["embed_tokens", "lm_head"] and cfg.lora_target_modules == "all-linear"


@pytest.mark.parametrize("recipe", sorted(RECIPE_MODELS))
def test_recipe_passes_validate_offline_with_model_checks_skipped(recipe):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", f"configs/{recipe}.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped" in result.stdout
    assert f"configs/{recipe}.yaml: OK" in result.stdout
