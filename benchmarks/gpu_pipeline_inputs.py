"""The inputs of benchmarks/gpu_pipeline.py's checks: run configs made from configs/quickstart.yaml, samples
with gpu_train.py's length distribution, and random-weight Llama models (built in a subprocess:
`python -m benchmarks.gpu_pipeline build-model`).

Configs use only keys of tasks/config.py; the pipeline validates every file before it runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "configs" / "quickstart.yaml"
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
# Llama 3.2 1B (tied embeddings); the vocabulary is the tiny model's tokenizer's (nothing is downloaded).
LLAMA_1B_SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
# The 8B shape is benchmarks/gpu_train.py's, vocabulary included, so both paths do the same FLOPs a token.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Steps at the start of the Trainer's run that tokens/s leaves out: torch.compile compiles in them.
TRAINER_WARMUP_STEPS = 4
TRAINER_TIMED_STEPS = 8


def write_config(path: Path, **overrides: Any) -> Path:
    """configs/quickstart.yaml with `overrides` (a dict value updates that section), as a new YAML file.
    Only keys of tasks/config.py: the pipeline validates the file before running."""
    raw = yaml.safe_load(TEMPLATE.read_text())
    raw["contract"] = {"dir": str(REPO / "data_contracts")}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        elif value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def pipeline_overrides(work: Path, model_dir: Path, data: Path, dry_run: bool, endpoint: str) -> dict[str, Any]:
    """The ~1B pipeline (GPU) or its tiny CPU equivalent: QLoRA, auto attention, the paged 8-bit optimizer."""
    return {
        "name": "gpu-pipeline",
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "chat_template", "field_messages": "messages", "contract": "quickstart_sentiment"}],
        "val_set_size": 0.1,
        "sequence_len": 256 if dry_run else 512,
        "adapter": "lora" if dry_run else "qlora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_target_modules": "all-linear",
        "micro_batch_size": 2 if dry_run else 8,
        "max_steps": 6 if dry_run else 40,
        "learning_rate": 2.0e-3 if dry_run else 1.0e-3,
        "warmup_ratio": None,
        "warmup_steps": 2,
        "optimizer": "adamw_torch" if dry_run else "paged_adamw_8bit",
        "bf16": not dry_run,
        "tf32": not dry_run,
        "attn_implementation": "auto",
        "gradient_checkpointing": True,
        "save_steps": 3 if dry_run else 20,
        "logging_steps": 1,
        "output_dir": str(work / "outputs" / "pipeline"),
        "state_dir": str(work / "state"),
        "eval": {
            "endpoint": endpoint,
            "max_samples": 8 if dry_run else 32,
            "max_tokens": 4,
            "startup_timeout": 240.0,
            "labels": ["positive", "negative", "neutral"],
        },
        # A random-weight model learns little in a few steps: no promotion gate, the merge is what is checked.
        "export": {"merge_dtype": "float32", "verify_prompts": 4, "verify_max_new_tokens": 8, "promote_if": []},
    }


def throughput_overrides(work: Path, model_dir: Path, data: Path, dry_run: bool) -> dict[str, Any]:
    """benchmarks/gpu_train.py's settings through the train stage: one row of 4096 tokens a step, LoRA r=16
    alpha 32 on every linear layer, AdamW lr 1e-4, gradient checkpointing, bf16, torch.compile."""
    return {
        "name": "gpu-throughput",
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "completion", "field": "text"}],
        "val_set_size": 2,
        "sequence_len": 256 if dry_run else 4096,
        "adapter": "lora" if dry_run else "qlora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_target_modules": LORA_TARGETS,
        "micro_batch_size": 1,
        "max_steps": TRAINER_WARMUP_STEPS + (2 if dry_run else TRAINER_TIMED_STEPS),
        "learning_rate": 1.0e-4,
        "lr_scheduler": "constant",
        "warmup_ratio": None,
        "warmup_steps": 0,
        "optimizer": "adamw_torch",
        "bf16": not dry_run,
        "attn_implementation": "auto",
        "gradient_checkpointing": True,
        # Compiling on a CPU takes minutes: the dry run trains the same path uncompiled.
        "torch_compile": not dry_run,
        "save_steps": None,
        "logging_steps": 1,
        "output_dir": str(work / "outputs" / "throughput"),
        "state_dir": str(work / "state-throughput"),
        "eval": {"max_samples": 1},
        "export": {"promote_if": []},
    }


def write_length_matched_data(path: Path, tokenizer_dir: Path, dry_run: bool, samples: int) -> None:
    """Completion rows whose token counts follow gpu_train.py's lengths (lognormal, median 300, sigma 1,
    clipped to [16, row length]): words the tokenizer holds as single tokens, so words ~ tokens."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = sorted(token[1:] for token in tokenizer.get_vocab() if token.startswith("\u0120") and token[1:].isalpha())
    median, high = (40, 240) if dry_run else (300, 4000)
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(math.log(median), 1.0, samples)), 16, high).astype(int)
    with path.open("w", encoding="utf-8") as handle:
        for length in lengths.tolist():
            handle.write(json.dumps({"text": " ".join(rng.choice(words, length).tolist())}) + "\n")


def main_build_model(shape_name: str, tokenizer_dir: Path, device: str, out_dir: Path) -> int:
    """A random-weight Llama of `shape_name` with the tokenizer of `tokenizer_dir`, saved in bf16 (written
    to a temporary sibling and renamed into place). Weights ~ N(0, 0.02), norms 1, as gpu_train.py builds."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from benchmarks.gpu_train import LLAMA3_8B_SHAPE

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {"llama-1b": {**LLAMA_1B_SHAPE, "vocab_size": len(tokenizer)}, "llama3-8b": LLAMA3_8B_SHAPE}[shape_name]
    config = LlamaConfig(**shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         dtype="bfloat16")
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: the default init runs, then is overwritten
        no_init_weights = contextlib.nullcontext
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device), no_init_weights():
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        generator = torch.Generator(device=device).manual_seed(0)
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 0.02, generator=generator)
            else:
                parameter.fill_(1.0)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokenizer.model_max_length = config.max_position_embeddings  # the tiny model's 2048 would warn at 4096
    temporary = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, max_shard_size="5GB")
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(out_dir, ignore_errors=True)
    temporary.rename(out_dir)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(json.dumps({"shape": shape_name, "parameters": parameters, "vocab_size": shape["vocab_size"],
                      "dir": str(out_dir), "seconds": round(time.monotonic() - started, 1)}), flush=True)
    return 0
