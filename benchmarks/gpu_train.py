"""GPU training throughput: QLoRA on a Llama-3-8B-shaped model, packed rows vs the plain HF baseline.

Run from the repository root on a machine with one CUDA GPU (H100/H200, about 4-6 minutes):

    python -m benchmarks.gpu_train --results benchmarks/RESULTS.md

Needs torch (CUDA), transformers, peft and bitsandbytes; flash-attn and liger-kernel are optional
(their variants are reported as skipped without them). Without a GPU it prints a skip message and
exits 0; `--tiny` runs the same code path on CPU with a tiny Llama (about 20 s on 2 idle cores).

What it measures. A model with Llama-3-8B's exact shape and random weights (nothing downloaded)
is trained with LoRA r=16, alpha 32 on q,k,v,o,gate,up,down, non-reentrant gradient
checkpointing, bf16 autocast (what the Trainer does with `bf16=True`), AdamW lr 1e-4 on the LoRA
parameters and gradient clipping at 1.0, in a plain loop: forward with labels, backward, step.
Samples have long-tailed lengths (lognormal, median 300, sigma 1.0, clipped to [16, 4096],
seeded) and random token ids. Each variant trains W warm-up steps, then S timed steps with
`torch.cuda.synchronize()` around each, on the SAME samples:

- `baseline`: what most users run: random batches padded to their longest sample, with an
  attention mask, SDPA. The batch size is chosen so that a batch holds about as many real tokens
  as one packed row (`sequence_len / mean sample length`, 8 at the defaults).
- `packed`: one row of `sequence_len` tokens per step from `tasks.packing.pack_samples`, with
  position_ids and no attention mask (transformers then builds a block-diagonal mask), SDPA.
  Rows are padded to exactly `sequence_len` (the padding is a sample of its own that no real
  token attends to) so every step has one shape and compiled kernels compile once.
- `packed_flex`: the same with `attn_implementation="flex_attention"` (document block mask).
- `packed_flash`: with `flash_attention_2` (varlen), only if `flash_attn` imports.
- `packed_compile` (only with `--compile`): regional `torch.compile` of each decoder layer on
  top of the fastest packed variant so far.
- `packed_liger`: `packed` plus Liger kernels (rope, RMSNorm, SwiGLU, fused linear cross-entropy), if
  `liger_kernel` imports. Liger patches transformers' Llama module globals, so it always runs
  last and cannot affect the other variants.

A variant that fails (import error, OOM, kernel error) is reported with its error and the run
goes on. Variants not yet started when `--budget-s` seconds have passed are skipped.

How the model is built. The model is constructed directly on the GPU in bf16 (about 16 GB for
8B) under transformers' `no_init_weights` (no slow default init), then every weight is filled
in place: matrices with `normal_(0, 0.02)`, norms with ones. Each decoder `nn.Linear` is then
replaced by hand with a `bitsandbytes.nn.Linear4bit` (nf4, double quantization, bf16 compute)
whose `Params4bit` quantizes the bf16 weight on the GPU; the bf16 copy is freed layer by layer,
so after `empty_cache()` the base holds about 5.7 GB (embeddings and lm_head stay bf16, as with
`BitsAndBytesConfig`). Nothing is written to disk. `prepare_model_for_kbit_training` is not
called: it would upcast embeddings, norms and lm_head to fp32 (about 3 GB more and a cast per
step under autocast); its other effects (input grads, checkpointing) are applied directly. The
base is built once; each variant attaches a fresh LoRA adapter (same seed) and optimizer and
removes them afterwards; the attention implementation is switched with
`model.set_attn_implementation`.

Figures. Useful tokens/s counts real (non-pad) tokens only. MFU = model FLOPs of the timed steps
/ their seconds / the GPU's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s; unknown GPUs and
CPU: null), with model FLOPs =
    4 * N * T                                  (linear layers: forward 2N + activation grads 2N;
                                                 the frozen base's weight grads are not computed)
  + 3 * sum over samples of 2 * L^2 * d * n_layers
                                               (causal attention forward: QK^T and PV, 2 FLOPs
                                                 per multiply-add over L^2/2 pairs, d = hidden
                                                 size; backward = 2x forward: dQ, dK, dV, dP)
where N = parameters other than the input embedding (lm_head included), T = useful tokens and
L = each sample's length. The recompute forward of gradient checkpointing, the LoRA matmuls
and padding are not counted: they are overhead. Peak memory is `max_memory_allocated` per
variant, base model included, in GB (1e9 bytes).

Output: one line per variant, a table in `--results` (default `benchmarks/RESULTS.md` on GPU;
in `--tiny` mode only when `--results` is given) and, as the last line, one JSON object with
every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Padded batches of 8 x 4096 tokens fragment the allocator; must be set before CUDA starts.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tasks.chat_tokens import IGNORE_INDEX  # noqa: E402
from tasks.packing import PackedCollator, pack_samples  # noqa: E402

SEED = 0
PAD_TOKEN_ID = 0
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SKIP_MESSAGE = "no CUDA GPU: skipped; use --tiny to exercise the code path on CPU"
DEFAULT_RESULTS = Path("benchmarks/RESULTS.md")
# Canonical order: liger last, since it patches transformers' Llama module for the whole process.
VARIANTS = ("baseline", "packed", "packed_flex", "packed_flash", "packed_compile", "packed_liger")
ATTENTION = {"packed_flex": "flex_attention", "packed_flash": "flash_attention_2"}
# Dense bf16 peaks (TFLOP/s), matched against torch.cuda.get_device_name() in this order.
PEAK_BF16_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0))
LLAMA3_8B_SHAPE = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY_SHAPE = {
    **LLAMA3_8B_SHAPE,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


@dataclass(frozen=True)
class Settings:
    tiny: bool
    device: str
    sequence_len: int
    warmup_steps: int
    timed_steps: int
    padded_batch_size: int
    median_len: int
    sigma: float
    min_len: int
    lora_r: int = 16
    lora_alpha: int = 32


@dataclass
class Workload:
    """The same samples as packed rows and as padded batches, split into warm-up and timed steps."""

    packed_warmup: list[dict[str, torch.Tensor]]
    packed_timed: list[dict[str, torch.Tensor]]
    padded_warmup: list[dict[str, torch.Tensor]]
    padded_timed: list[dict[str, torch.Tensor]]
    useful_tokens: int  # real tokens in the timed steps
    attention_l2: int  # sum of L^2 over the timed samples
    packed_fill: float  # real tokens / slots in the timed packed rows
    padded_fill: float  # real tokens / slots in the timed padded batches


@contextlib.contextmanager
def phase(name: str, phases: dict[str, float]) -> Iterator[None]:
    started = time.perf_counter()
    yield
    phases[name] = round(time.perf_counter() - started, 2)
    print(f"[phase] {name}: {phases[name]:.1f} s", flush=True)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sample_lengths(median: int, sigma: float, low: int, high: int, count: int) -> np.ndarray:
    """Seeded long-tailed sample lengths: lognormal, clipped to [low, high]."""
    lengths = np.round(np.random.default_rng(SEED).lognormal(math.log(median), sigma, count))
    return np.clip(lengths, low, high).astype(np.int64)


def build_workload(settings: Settings, vocab_size: int) -> Workload:
    """Pack random samples into rows; the baseline gets the samples of the same rows, padded."""
    # Imported here: it imports transformers, which the no-GPU skip should not wait for.
    from benchmarks.packing import pad_to_longest

    steps = settings.warmup_steps + settings.timed_steps
    mean_len = settings.median_len * math.exp(settings.sigma**2 / 2)
    count = max(1000, math.ceil(2 * steps * settings.sequence_len / mean_len))
    token_rng = np.random.default_rng(SEED + 1)
    samples = []
    for length in sample_lengths(settings.median_len, settings.sigma, settings.min_len, settings.sequence_len, count).tolist():
        input_ids = token_rng.integers(1, vocab_size, length).tolist()
        samples.append({"input_ids": input_ids, "labels": input_ids})
    rows = pack_samples(samples, settings.sequence_len, seed=SEED)[:steps]
    if len(rows) < steps:
        raise ValueError(f"{count} samples gave {len(rows)} packed rows, fewer than the {steps} steps asked for")
    collate = PackedCollator(pad_token_id=PAD_TOKEN_ID)
    packed = [pad_row(collate([row]), settings.sequence_len) for row in rows]

    def padded_batches(row_group: list[dict]) -> list[dict[str, torch.Tensor]]:
        unpacked = []
        for row in row_group:
            start = 0
            for length in row["sample_lengths"]:
                unpacked.append(row["input_ids"][start : start + length])
                start += length
        order = np.random.default_rng(SEED).permutation(len(unpacked)).tolist()
        size = settings.padded_batch_size
        return [pad_to_longest([unpacked[i] for i in order[start : start + size]]) for start in range(0, len(order), size)]

    timed_rows = rows[settings.warmup_steps :]
    padded_timed = padded_batches(timed_rows)
    useful_tokens = sum(row["num_tokens"] for row in timed_rows)
    return Workload(
        packed_warmup=packed[: settings.warmup_steps],
        packed_timed=packed[settings.warmup_steps :],
        padded_warmup=padded_batches(rows[: settings.warmup_steps]),
        padded_timed=padded_timed,
        useful_tokens=useful_tokens,
        attention_l2=sum(length**2 for row in timed_rows for length in row["sample_lengths"]),
        packed_fill=useful_tokens / (len(timed_rows) * settings.sequence_len),
        padded_fill=useful_tokens / sum(batch["input_ids"].numel() for batch in padded_timed),
    )


def pad_row(batch: dict[str, torch.Tensor], sequence_len: int) -> dict[str, torch.Tensor]:
    """Pad a one-row packed batch to exactly `sequence_len`, the padding being a sample of its own."""
    padding = sequence_len - batch["input_ids"].shape[1]
    return {
        "input_ids": torch.nn.functional.pad(batch["input_ids"], (0, padding), value=PAD_TOKEN_ID),
        "labels": torch.nn.functional.pad(batch["labels"], (0, padding), value=IGNORE_INDEX),
        "position_ids": torch.cat([batch["position_ids"], torch.arange(padding)[None]], dim=1),
    }


def build_quantized_base(shape: dict[str, Any], device: str, phases: dict[str, float]) -> tuple[Any, int]:
    """The Llama base with random weights and nf4 decoder linears; returns it and N (see the docstring)."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: default init runs, then is overwritten below
        no_init_weights = contextlib.nullcontext
    config = LlamaConfig(**shape, pad_token_id=PAD_TOKEN_ID, use_cache=False)
    default_dtype = torch.get_default_dtype()
    with phase("build: construct bf16", phases), torch.device(device), no_init_weights():
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
    with phase("build: random init", phases), torch.no_grad():
        generator = torch.Generator(device=device).manual_seed(SEED)
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 0.02, generator=generator)
            else:
                parameter.fill_(1.0)
        synchronize(device)
    non_embedding = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    with phase("build: quantize nf4", phases):
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, linear in list(parent.named_children()):
                    if isinstance(linear, torch.nn.Linear):
                        setattr(parent, name, quantize_linear(bnb, linear, device))
        model.is_loaded_in_4bit = True  # peft then wraps them with its bitsandbytes LoRA layer
        synchronize(device)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    model.requires_grad_(False)
    model.enable_input_require_grads()
    enable_checkpointing = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable_checkpointing({"use_reentrant": False})
    model.train()
    return model, non_embedding


def quantize_linear(bnb: Any, linear: torch.nn.Linear, device: str) -> Any:
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.bfloat16,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    quantized.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=quantized
    ).to(device)
    return quantized


def attach_lora(base: Any, settings: Settings) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    config = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    return get_peft_model(base, config)


def train_steps(model: Any, batches: list[dict[str, torch.Tensor]], optimizer: Any, device: str) -> list[tuple[float, float]]:
    """(seconds, loss) per step: forward with labels under bf16 autocast, backward, clip, AdamW step."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    results = []
    for batch in batches:
        synchronize(device)
        started = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        results.append((time.perf_counter() - started, loss.item()))
    return results


def missing_requirement(name: str, device: str, results: dict[str, dict]) -> str | None:
    """Why `name` cannot run here, or None."""
    if name == "packed_flash":
        try:
            import flash_attn  # noqa: F401
        except ImportError as error:
            return f"flash_attn not importable ({error})"
    if name == "packed_liger":
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError as error:
            return f"liger_kernel not importable ({error})"
    if name == "packed_compile" and best_packed(results) is None:
        return "no packed variant succeeded to compile on top of"
    if name in ("packed_flex", "packed_compile") and device == "cpu":
        return "GPU only: flex attention has no backward on CPU, and torch.compile there takes minutes"
    return None


def best_packed(results: dict[str, dict]) -> str | None:
    candidates = [name for name in ("packed", "packed_flex", "packed_flash") if results.get(name, {}).get("status") == "ok"]
    return max(candidates, key=lambda name: results[name]["useful_tokens_per_s"], default=None)


def run_variant(name: str, base: Any, workload: Workload, settings: Settings, results: dict[str, dict]) -> tuple[Any, dict]:
    """Train one variant on the shared base; returns the base (LoRA removed) and the variant's figures."""
    if (reason := missing_requirement(name, settings.device, results)) is not None:
        return base, {"status": "skipped", "error": reason}
    on_top_of = best_packed(results) if name == "packed_compile" else None
    attention = ATTENTION.get(on_top_of or name, "sdpa")
    cuda = settings.device == "cuda"
    model = optimizer = None
    record: dict[str, Any] = {"attention": attention}
    if on_top_of:
        record["on_top_of"] = on_top_of
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base.set_attn_implementation(attention)
        if name == "packed_liger":
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, model=base)
        model = attach_lora(base, settings)
        if name == "packed_compile":
            for layer in base.model.layers:
                layer.compile()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
        padded = name == "baseline"
        warmup = workload.padded_warmup if padded else workload.packed_warmup
        timed = workload.padded_timed if padded else workload.packed_timed
        to_device = [[{key: value.to(settings.device) for key, value in batch.items()} for batch in group] for group in (warmup, timed)]
        warmup_steps = train_steps(model, to_device[0], optimizer, settings.device)
        timed_steps = train_steps(model, to_device[1], optimizer, settings.device)
        seconds = sum(step_seconds for step_seconds, _ in timed_steps)
        losses = [loss for _, loss in timed_steps]
        record.update(
            status="ok",
            steps=len(timed_steps),
            warmup_s=round(sum(step_seconds for step_seconds, _ in warmup_steps), 3),
            timed_s=round(seconds, 3),
            step_s=round(seconds / len(timed_steps), 4),
            useful_tokens=workload.useful_tokens,
            useful_tokens_per_s=round(workload.useful_tokens / seconds, 1),
            slot_fill=round(workload.padded_fill if padded else workload.packed_fill, 4),
            peak_memory_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
            # JSON has no NaN: a diverged loss is null, and losses_finite says so.
            loss_first=round(losses[0], 4) if math.isfinite(losses[0]) else None,
            loss_last=round(losses[-1], 4) if math.isfinite(losses[-1]) else None,
            losses_finite=all(math.isfinite(loss) for loss in losses),
        )
    except Exception as error:  # a failing variant is a result, not the end of the run
        traceback.print_exc()
        record.update(status="failed", error=f"{type(error).__name__}: {str(error)[:500]}")
        if cuda:
            record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    finally:
        if name == "packed_compile":
            for layer in base.model.layers:
                layer._compiled_call_impl = None
        if model is not None:
            base = model.unload()
        del model, optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return base, record


def peak_tflops(device_name: str | None) -> float | None:
    if device_name is None:
        return None
    return next((tflops for marker, tflops in PEAK_BF16_TFLOPS if marker in device_name), None)


def add_ratios(results: dict[str, dict], timed_flops: float, peak: float | None) -> None:
    baseline = results.get("baseline", {})
    for record in results.values():
        if record.get("status") != "ok":
            continue
        record["vs_baseline"] = (
            round(record["useful_tokens_per_s"] / baseline["useful_tokens_per_s"], 3) if baseline.get("status") == "ok" else None
        )
        record["mfu"] = round(timed_flops / record["timed_s"] / (peak * 1e12), 4) if peak else None


def versions() -> dict[str, str | None]:
    found = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "flash_attn", "liger_kernel", "triton"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def shown(value: Any) -> str:
    return "-" if value is None else str(value)


def render_markdown(report: dict) -> str:
    settings = report["settings"]
    lines = [
        "# GPU training throughput: QLoRA on a Llama-3-8B-shaped model" + (" (tiny CPU run)" if settings["tiny"] else ""),
        "",
        f"- date: {report['date']}",
        f"- device: {report['device']} (dense bf16 peak: {report['peak_bf16_tflops'] or 'unknown'} TFLOP/s)",
        "- versions: " + ", ".join(f"{name} {version or 'not installed'}" for name, version in report["versions"].items()),
        f"- model: {report['model']}",
        f"- settings: {json.dumps(settings)}",
        f"- MFU convention: {report['mfu_convention']}",
        "- phases (s): " + ", ".join(f"{name} {seconds}" for name, seconds in report["phases_s"].items()),
        "",
        "| variant | status | useful tok/s | vs baseline | MFU | peak GB | step s | slot fill | loss first -> last |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, record in report["variants"].items():
        if record["status"] == "ok":
            lines.append(
                f"| {name} | ok | {record['useful_tokens_per_s']:,.0f} | {shown(record['vs_baseline'])} | {shown(record['mfu'])} | "
                f"{shown(record['peak_memory_gb'])} | {record['step_s']} | {record['slot_fill']} | "
                f"{record['loss_first']} -> {record['loss_last']} |"
            )
        else:
            lines.append(f"| {name} | {record['status']}: {record['error'].replace('|', '/')} | | | | | | | |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_train", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny Llama on CPU (or GPU): exercises the code path")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant (default 2)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    parser.add_argument("--variants", default=None, help=f"comma list from {','.join(VARIANTS)} (default: all but packed_compile)")
    parser.add_argument("--compile", action="store_true", help="add packed_compile to the variants")
    parser.add_argument("--results", type=Path, default=None, help=f"markdown report (default {DEFAULT_RESULTS} on GPU, none with --tiny)")
    parser.add_argument("--seq-len", type=int, default=None, help="packed row length (default 4096, 256 with --tiny)")
    parser.add_argument("--padded-batch-size", type=int, default=None, help="baseline batch size (default: real tokens ~ one packed row)")
    parser.add_argument("--budget-s", type=float, default=360.0, help="start no new variant after this many seconds (default 360)")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        parser.error("--warmup must be >= 0 and --steps >= 1")
    return args


def chosen_variants(args: argparse.Namespace) -> list[str]:
    requested = args.variants.split(",") if args.variants else [name for name in VARIANTS if name != "packed_compile"]
    requested = [name.strip() for name in requested] + (["packed_compile"] if args.compile else [])
    unknown = sorted(set(requested) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return [name for name in VARIANTS if name in requested]


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    variants = chosen_variants(args)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print(SKIP_MESSAGE, flush=True)
        return 0
    device = "cuda" if cuda else "cpu"
    shape = TINY_SHAPE if args.tiny else LLAMA3_8B_SHAPE
    sequence_len = args.seq_len or (256 if args.tiny else 4096)
    median_len, sigma, min_len = (40, 1.0, 8) if args.tiny else (300, 1.0, 16)
    mean_len = float(np.mean(sample_lengths(median_len, sigma, min_len, sequence_len, 10_000)))
    settings = Settings(
        tiny=args.tiny,
        device=device,
        sequence_len=sequence_len,
        warmup_steps=args.warmup,
        timed_steps=args.steps,
        padded_batch_size=args.padded_batch_size or max(1, round(sequence_len / mean_len)),
        median_len=median_len,
        sigma=sigma,
        min_len=min_len,
    )
    if args.tiny:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    device_name = torch.cuda.get_device_name() if cuda else None
    peak = peak_tflops(device_name)
    print(f"device {device_name or 'cpu'}, dense bf16 peak {peak or 'unknown'} TFLOP/s; settings {asdict(settings)}", flush=True)

    phases: dict[str, float] = {}
    with phase("imports", phases):
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
    with phase("data", phases):
        workload = build_workload(settings, shape["vocab_size"])
    print(
        f"timed work: {workload.useful_tokens:,} real tokens; packed {len(workload.packed_timed)} rows "
        f"(fill {workload.packed_fill:.4f}); baseline {len(workload.padded_timed)} batches of "
        f"{settings.padded_batch_size} (fill {workload.padded_fill:.4f})",
        flush=True,
    )
    with phase("model build", phases):
        base, non_embedding = build_quantized_base(shape, device, phases)
    layers, hidden = shape["num_hidden_layers"], shape["hidden_size"]
    timed_flops = 4 * non_embedding * workload.useful_tokens + 3 * 2 * workload.attention_l2 * hidden * layers
    if cuda:
        print(f"base model on GPU: {torch.cuda.memory_allocated() / 1e9:.2f} GB allocated", flush=True)

    results_path = args.results or (None if args.tiny else DEFAULT_RESULTS)
    report: dict[str, Any] = {
        "benchmark": "gpu_train",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name or "cpu",
        "peak_bf16_tflops": peak,
        "versions": versions(),
        "model": f"Llama {'tiny' if args.tiny else '3 8B'} shape, N (non-embedding params) = {non_embedding:,}, nf4 double-quant base",
        "settings": asdict(settings),
        "mfu_convention": (
            "MFU = model FLOPs of the timed steps / their seconds / dense bf16 peak; model FLOPs = 4*N*useful_tokens "
            "+ 3*sum over samples of 2*L^2*d_model*n_layers (forward + activation grads; no frozen-weight grads, "
            "no checkpoint recompute, no LoRA matmuls, no padding)"
        ),
        "phases_s": phases,
        "variants": {},
    }
    for name in variants:
        if time.perf_counter() - started > args.budget_s:
            report["variants"][name] = {"status": "skipped", "error": f"time budget of {args.budget_s:.0f} s (--budget-s) spent"}
        else:
            with phase(f"variant {name}", phases):
                base, report["variants"][name] = run_variant(name, base, workload, settings, report["variants"])
        add_ratios(report["variants"], timed_flops, peak)
        print_variant(name, report["variants"][name])
        if results_path is not None:
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(render_markdown(report))
    phases["total"] = round(time.perf_counter() - started, 2)
    if results_path is not None:
        results_path.write_text(render_markdown(report))
        print(f"wrote {results_path}", flush=True)
    print(json.dumps(report), flush=True)
    return 0


def print_variant(name: str, record: dict) -> None:
    if record["status"] != "ok":
        print(f"{name}: {record['status']}: {record['error']}", flush=True)
        return
    mfu = f"{record['mfu']:.3f}" if record["mfu"] is not None else "null"
    ratio = f"x{record['vs_baseline']:.2f}" if record["vs_baseline"] is not None else "no baseline"
    memory = f"{record['peak_memory_gb']:.1f} GB" if record["peak_memory_gb"] is not None else "n/a"
    print(
        f"{name}: {record['useful_tokens_per_s']:,.0f} useful tok/s, {ratio} vs baseline, MFU {mfu}, "
        f"peak {memory}, {record['step_s']:.3f} s/step, fill {record['slot_fill']:.3f}, "
        f"loss {record['loss_first']} -> {record['loss_last']}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
