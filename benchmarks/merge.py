"""Merge benchmark: how long merging takes and how closely the merged model reproduces the adapter
model, per dtype, through the same functions the export stage uses (tasks/merge.py).

    .venv/bin/python -m benchmarks.merge                 # the tiny model, CPU (about a minute on 2 cores)
    python -m benchmarks.merge --shape 1b                # a ~1.2B random Llama, on the GPU when there is one
    python -m benchmarks.merge --shape 1b --device cpu   # the same on the CPU

The base model has random weights and the adapter random A and B (LoRA r=16 on every linear
layer), so nothing needs downloading. Per dtype it reports: merge time (adapter folded into the
weights, excluding loading), save time, the largest logit difference between the merged model
loaded back from disk and the adapter model (absolute and relative to the largest logit), and how
many greedy generations agree. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": None,  # tasks/tiny_model.py: the model the tests and the quickstart use
    "1b": (2048, 8192, 16, 32, 8, 32000),
}
PROMPTS = 8
PROMPT_TOKENS = 64
NEW_TOKENS = 16
SEED = 0


def build_base(shape: str, directory: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if SHAPES[shape] is None:
        from tasks.tiny_model import build_tiny_model

        return build_tiny_model(directory / "base", seed=SEED)
    hidden, intermediate, layers, heads, kv_heads, vocab = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=False, eos_token_id=vocab - 1, pad_token_id=0, bos_token_id=None,
    )
    torch.manual_seed(SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory / "base")
    return directory / "base"


def build_adapter(base_dir: Path, directory: Path) -> Path:
    """A LoRA adapter with random, non-zero A and B, at the scale a trained one reaches."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tasks.merge import load_base

    torch.manual_seed(SEED)
    model = get_peft_model(
        load_base(str(base_dir), "float32"),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.1)
    model.save_pretrained(directory / "adapter")
    return directory / "adapter"


def measure(base_dir: Path, adapter_dir: Path, dtype: str, prompts: list[Any], eos_id: int, directory: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.merge import load_adapter_model, max_logit_difference, model_outputs, record_adapter_deltas, unchanged_weights

    def synchronize() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    started = time.perf_counter()
    adapter_model = load_adapter_model(str(base_dir), adapter_dir, dtype)
    load_s = time.perf_counter() - started
    reference = model_outputs(adapter_model, prompts, NEW_TOKENS, [eos_id], 0)
    started = time.perf_counter()
    changes = record_adapter_deltas(adapter_model)
    synchronize()
    check_s = time.perf_counter() - started
    started = time.perf_counter()
    merged = adapter_model.merge_and_unload()
    synchronize()
    merge_s = time.perf_counter() - started
    started = time.perf_counter()
    merged.save_pretrained(directory / dtype)
    save_s = time.perf_counter() - started
    del merged, adapter_model
    reloaded = AutoModelForCausalLM.from_pretrained(directory / dtype, dtype=getattr(torch, dtype), device_map=_device_map())
    candidate = model_outputs(reloaded, prompts, NEW_TOKENS, [eos_id], 0)
    unchanged = unchanged_weights(reloaded, changes)
    del reloaded
    max_diff = max_logit_difference(reference, candidate)
    largest = max(float(logits.abs().max()) for logits in reference.logits)
    return {
        "dtype": dtype,
        "load_s": round(load_s, 3),
        "merge_s": round(merge_s, 3),
        "delta_check_s": round(check_s, 3),
        "save_s": round(save_s, 3),
        "max_logit_diff": max_diff,
        "largest_logit": largest,
        "relative_logit_diff": max_diff / max(1.0, largest),
        "greedy_match": sum(a == b for a, b in zip(reference.generations, candidate.generations)),
        "prompts": len(prompts),
        "adapted_weights": len(changes.nonzero_delta),
        "unchanged_weights": len(unchanged),
    }


def _device_map() -> Any:
    import torch

    return {"": 0} if torch.cuda.is_available() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    results = []
    with tempfile.TemporaryDirectory(prefix="loraflow-merge-bench-") as scratch:
        directory = Path(scratch)
        started = time.perf_counter()
        base_dir = build_base(args.shape, directory)
        adapter_dir = build_adapter(base_dir, directory)
        setup_s = time.perf_counter() - started
        config = json.loads((base_dir / "config.json").read_text())
        generator = torch.Generator().manual_seed(SEED)
        prompts = [torch.randint(1, config["vocab_size"] - 1, (1, PROMPT_TOKENS), generator=generator) for _ in range(PROMPTS)]
        eos_id = config["eos_token_id"] if isinstance(config["eos_token_id"], int) else config["eos_token_id"][0]
        parameters = _parameter_count(base_dir)
        for dtype in args.dtypes.split(","):
            result = measure(base_dir, adapter_dir, dtype, prompts, eos_id, directory)
            print(json.dumps(result))
            results.append(result)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(json.dumps({"benchmark": "merge", "shape": args.shape, "parameters": parameters, "device": device,
                      "setup_s": round(setup_s, 1), "results": results}))


def _parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    count = 0
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                count += math.prod(handle.get_slice(key).get_shape())
    return count


if __name__ == "__main__":
    main()
