"""Precision and 4-bit quantization, decided in one place for train, eval and export.

QLoRA's promise is that the merged model computes what the trained one did, which holds only if
every stage quantizes the base exactly as training did: the same nf4 config (double quant), the
same compute dtype, the same workaround for bitsandbytes' CPU repacking. So each of these exists
once, here.
"""

from __future__ import annotations

from typing import Any

from tasks.config import RunConfig


def compute_dtype_name(cfg: RunConfig) -> str:
    """bf16 where asked (preflight allows it on capable GPUs only); fp32 otherwise, QLoRA on a CPU included."""
    return "bfloat16" if cfg.bf16 else "float32"


def compute_dtype(cfg: RunConfig) -> Any:
    import torch

    return getattr(torch, compute_dtype_name(cfg))


def nf4_config(compute_dtype: Any, storage_dtype: Any = None) -> Any:
    """QLoRA's 4-bit config: nf4 with double quantization. `storage_dtype` packs the 4-bit weights
    into the compute dtype when FSDP or ZeRO-3 shard them (shards must share one dtype)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **({"bnb_4bit_quant_storage": storage_dtype} if storage_dtype is not None else {}),
    )


def keep_cpu_4bit_layers_exact(model: Any) -> None:
    """bitsandbytes on CPUs with avx512_bf16 repacks a 4-bit weight into an inference-only layout
    the first time the layer runs in eval mode on input that needs no grad (an evaluation); after
    that, no gradient flows through the layer and `dequantize_4bit` no longer reads it. Switching
    that repacking off keeps training exact and the merge's de-quantization right."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
