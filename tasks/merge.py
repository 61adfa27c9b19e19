"""Folding a LoRA adapter into its base model, shared by eval (to serve the tuned model) and
export (to publish it).

For QLoRA the adapter is merged into base weights loaded de-quantized in the merge dtype, never
into 4-bit weights: rounding the merged weights back to nf4 would change the model's outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def load_adapter_model(base_model: str, adapter_dir: Path, dtype: str = "float32", trust_remote_code: bool = False) -> Any:
    """The base model in `dtype` with the trained adapter attached (not merged)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=getattr(torch, DTYPES[dtype]), trust_remote_code=trust_remote_code
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model


def save_merged(model: Any, tokenizer: Any, out_dir: Path, max_shard_size: str = "2GB") -> None:
    """Saves a merged model with its tokenizer; the generation config stops at the chat
    template's end-of-turn token, so the served model does not run on past its answer."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
