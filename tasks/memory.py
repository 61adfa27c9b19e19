"""Will this config fit and run on this hardware? Answered from config.json alone, before any weights load.

`estimate_peak_memory` sizes a training run's peak GPU memory from the model's shape; `visible_gpus`
asks `nvidia-smi` (never torch, so `loraflow validate` stays fast) what is there; `hardware_problems`
names the settings the visible hardware cannot honour; `out_of_memory_advice` turns an OOM into the
knobs to turn. All sizes are decimal GB (1e9 bytes), as GPU vendors print them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tasks.config import RunConfig
from tasks.gpus import GpuInfo

GB = 1e9
# nf4 with double quantization: 4 bits a weight, one 8-bit absmax per block of 64 weights, and one
# fp32 scale per 256 of those absmax values.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# CUDA context, cuBLAS workspaces and allocator slack: measured 0.4-0.6 GB on A100/H100 with torch 2.x.
CUDA_CONTEXT_GB = 0.5
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPU_ONLY_OPTIMIZERS = ("paged_adamw_8bit", "adamw_bnb_8bit")


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory, read from a Llama-style config.json (Llama, Mistral, Qwen2, DeepSeek-LLM)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q_dim), "k_proj": (self.hidden, kv_dim), "v_proj": (self.hidden, kv_dim),
            "o_proj": (q_dim, self.hidden), "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden),
        }

    def parameter_counts(self) -> tuple[int, int]:
        """(decoder linear weights, everything else: embeddings, lm_head unless tied, norms); biases ignored."""
        linear_params = self.layers * sum(fan_in * fan_out for fan_in, fan_out in self.linear_shapes().values())
        embedding_params = self.vocab * self.hidden
        return linear_params, (1 if self.tied_embeddings else 2) * embedding_params + (2 * self.layers + 1) * self.hidden


def read_model_config(cfg: RunConfig) -> dict[str, Any] | None:
    """The base model's config.json, or None where the model is not on this machine (yet)."""
    from tasks import hub

    try:
        path = hub.base_model(cfg).path / "config.json"
    except hub.ModelNotFoundError:
        return None
    return json.loads(path.read_text()) if path.is_file() else None


def estimate_peak_memory(
    cfg: RunConfig, model_config: dict[str, Any], processes: int = 1, zero_stage: int | None = None
) -> dict[str, float]:
    """Peak GPU memory of one of `processes` training processes for `cfg`, by part, in GB.
    `processes` counts every machine's (the world size): sharding spreads across all of them.

    - `weights`: the base model. LoRA holds every weight in the compute dtype (bf16 with `bf16`,
      else fp32). QLoRA holds the decoder's linear layers in nf4 (double quant) and the rest
      (embeddings, norms, lm_head) in fp32, as peft's `prepare_model_for_kbit_training` casts them.
    - `trainable`: LoRA A/B matrices (fp32, peft's default) plus full copies of
      `lora_modules_to_save` (in the base weights' dtype); `gradients` the same again.
    - `optimizer`: AdamW's two moments per trainable weight, in its dtype (1 byte each for 8-bit).
    - `activations_without_checkpointing` / `activations_with_checkpointing`: per token and layer,
      the tensors saved for backward with a memory-efficient attention kernel (no seq x seq scores):
      two norm inputs and two projection inputs (4 x hidden), q after RoPE and the attention
      output (2 x q_dim), k and v (2 x kv_dim), and the MLP's gate, up, activation and product
      (4 x intermediate), in the compute dtype. LoRA keeps its own fp32 copy of each targeted
      module's input when it casts it (bf16) or drops it out (`lora_dropout` > 0). With
      checkpointing only each layer's input is kept, plus one layer's full set while it is recomputed.
    - `logits`: tokens x vocab in the compute dtype, their fp32 log-softmax and its gradient.
    - `cuda_context`: a fixed allowance.
    Sharding across processes divides the optimizer state (ZeRO-1), also the gradients (ZeRO-2),
    also the weights and trainable weights (ZeRO-3, FSDP, which gather one decoder layer's weights
    at a time: `gathered_layer`; QLoRA then keeps its unquantized weights in the compute dtype).
    Tokens per step are `micro_batch_size * sequence_len` (packed rows are full). Biases are
    ignored (under 0.01% of the weights).
    """
    shape = ModelShape.from_config(model_config)
    compute_bytes = 2 if cfg.bf16 else 4
    tokens = cfg.micro_batch_size * cfg.sequence_len
    linears = shape.linear_shapes()
    linear_params, other_params = shape.parameter_counts()
    embedding_params = shape.vocab * shape.hidden

    shards_weights = cfg.fsdp_config is not None or zero_stage == 3
    if cfg.load_in_4bit:
        unquantized_bytes = compute_bytes if shards_weights else 4
        weights = linear_params * NF4_BYTES_PER_PARAM + other_params * unquantized_bytes
    else:
        weights = (linear_params + other_params) * compute_bytes
        unquantized_bytes = compute_bytes

    targets = target_linear_modules(cfg.lora_target_modules)
    lora_params = shape.layers * sum(cfg.lora_r * sum(linears[name]) for name in targets)
    saved_copies = sum(embedding_params for name in cfg.lora_modules_to_save or [] if name in ("embed_tokens", "lm_head"))
    trainable = lora_params * 4 + saved_copies * unquantized_bytes
    # Two moments per trainable value: 1 byte each for the 8-bit optimizers, else the value's own dtype.
    optimizer = 2 * (lora_params + saved_copies) if cfg.optimizer in GPU_ONLY_OPTIMIZERS else 2 * trainable

    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    layer_elements = 4 * shape.hidden + 2 * q_dim + 2 * kv_dim + 4 * shape.intermediate
    layer_bytes = layer_elements * compute_bytes
    if cfg.lora_dropout > 0 or compute_bytes != 4:
        layer_bytes += 4 * sum(linears[name][0] for name in targets)
    activations_full = tokens * shape.layers * layer_bytes
    activations_checkpointed = tokens * (shape.layers * shape.hidden * compute_bytes + layer_bytes)
    logits = tokens * shape.vocab * (compute_bytes + 4 + 4)

    optimizer_shards = processes if shards_weights or (zero_stage or 0) >= 1 else 1
    gradient_shards = processes if shards_weights or (zero_stage or 0) >= 2 else 1
    weight_shards = processes if shards_weights else 1
    breakdown = {
        "weights": weights / weight_shards,
        "gathered_layer": (weights - other_params * unquantized_bytes) / shape.layers if shards_weights else 0.0,
        "trainable": trainable / weight_shards,
        "gradients": trainable / gradient_shards,
        "optimizer": optimizer / optimizer_shards,
        "activations_without_checkpointing": activations_full,
        "activations_with_checkpointing": activations_checkpointed,
        "logits": logits,
    }
    breakdown = {name: value / GB for name, value in breakdown.items()}
    breakdown["cuda_context"] = CUDA_CONTEXT_GB
    activations = "activations_with_checkpointing" if cfg.gradient_checkpointing else "activations_without_checkpointing"
    breakdown["peak"] = sum(breakdown[name] for name in (
        "weights", "gathered_layer", "trainable", "gradients", "optimizer", activations, "logits", "cuda_context"
    ))
    return breakdown


def target_linear_modules(targets: list[str] | str) -> list[str]:
    """The decoder's linear layers that LoRA wraps; `all-linear` is all of them (peft leaves lm_head out)."""
    if targets == "all-linear":
        return list(LINEAR_MODULES)
    names = [targets] if isinstance(targets, str) else targets
    return [name for name in LINEAR_MODULES if name in names]


def describe_estimate(cfg: RunConfig, breakdown: dict[str, float], gpus: list[GpuInfo], processes: int = 1) -> list[str]:
    """Lines for `loraflow validate`: the breakdown, and a warning when the peak exceeds the smallest visible GPU."""
    chosen = "with" if cfg.gradient_checkpointing else "without"  # what the peak counts
    machines = f" on {cfg.num_machines} machines" if cfg.num_machines > 1 else ""
    per_process = f" per process, {processes} processes{machines}" if processes > 1 else ""
    gathered = f", one gathered layer {breakdown['gathered_layer']:.2f} GB" if breakdown["gathered_layer"] else ""
    lines = [
        f"estimated peak GPU memory: {breakdown['peak']:.1f} GB "
        f"({cfg.adapter}{per_process}, micro_batch_size {cfg.micro_batch_size} x sequence_len {cfg.sequence_len}, "
        f"gradient_checkpointing {'on' if cfg.gradient_checkpointing else 'off'})",
        f"  weights {breakdown['weights']:.2f} GB{gathered}, trainable {breakdown['trainable']:.2f} GB, "
        f"gradients {breakdown['gradients']:.2f} GB, optimizer {breakdown['optimizer']:.2f} GB",
        f"  activations {breakdown['activations_without_checkpointing']:.2f} GB without checkpointing, "
        f"{breakdown['activations_with_checkpointing']:.2f} GB with (the peak counts {chosen}); "
        f"logits {breakdown['logits']:.2f} GB; CUDA context {breakdown['cuda_context']:.1f} GB",
    ]
    if gpus:
        smallest = min(gpus, key=lambda gpu: gpu.memory_gb)
        if breakdown["peak"] > smallest.memory_gb:
            lines.append(
                f"warning: the estimate exceeds GPU {smallest.index} ({smallest.name}, {smallest.memory_gb:.1f} GB); "
                + memory_knobs(cfg)
            )
    else:
        lines.append("  no GPU is visible here, so the estimate was not compared with one")
    return lines


def memory_knobs(cfg: RunConfig) -> str:
    """The settings that lower peak memory, most effective first, with values for this config."""
    knobs = []
    if cfg.micro_batch_size > 1:
        smaller = cfg.micro_batch_size // 2
        knobs.append(
            f"micro_batch_size: {smaller} (and gradient_accumulation_steps: {cfg.gradient_accumulation_steps * 2} "
            "to keep the effective batch)"
        )
    if not cfg.gradient_checkpointing:
        knobs.append("gradient_checkpointing: true")
    if not cfg.load_in_4bit:
        knobs.append("adapter: qlora (4-bit base weights)")
    if cfg.sequence_len > 128:
        knobs.append(f"sequence_len: {cfg.sequence_len // 2} (prep quarantines longer samples)")
    if cfg.optimizer not in GPU_ONLY_OPTIMIZERS:
        knobs.append("optimizer: paged_adamw_8bit")
    return "lower memory with " + "; ".join(knobs) if knobs else "every memory setting is already at its lowest"


def out_of_memory_advice(
    cfg: RunConfig, model_config: dict[str, Any] | None, processes: int = 1, zero_stage: int | None = None
) -> str:
    estimate = ""
    if model_config is not None:
        estimate = f" (estimated peak {estimate_peak_memory(cfg, model_config, processes, zero_stage)['peak']:.1f} GB)"
    return f"training ran out of memory{estimate}: {memory_knobs(cfg)}"


def hardware_problems(cfg: RunConfig, gpus: list[GpuInfo]) -> list[str]:
    """Settings the given GPUs (none: a CPU-only machine) cannot honour, each with its fix."""
    problems = []
    if not gpus:
        if cfg.bf16:
            problems.append("`bf16: true` needs a GPU and none is visible; set `bf16: false` (on a CPU, LoRA and QLoRA compute in fp32)")
        if cfg.tf32:
            problems.append("`tf32: true` needs an NVIDIA GPU and none is visible; set `tf32: false`")
        if cfg.flash_attention or cfg.attn_implementation == "flash_attention_2":
            problems.append(
                "flash-attn needs a GPU and none is visible; set `flash_attention: false` and "
                "`attn_implementation: auto` (SDPA on a CPU)"
            )
        if cfg.optimizer in GPU_ONLY_OPTIMIZERS:
            problems.append(f"`optimizer: {cfg.optimizer}` needs a CUDA GPU and none is visible; use `optimizer: adamw_torch`")
        if cfg.deepspeed:
            problems.append(
                "`deepspeed` needs CUDA GPUs and none is visible; remove it (on a CPU, `num_processes: 2` trains with DDP over gloo)"
            )
        if cfg.fsdp_config is not None:
            problems.append(
                "`fsdp` needs CUDA GPUs and none is visible (the Trainer would silently fall back to DDP); "
                "remove `fsdp` and `fsdp_config`"
            )
        return problems
    per_machine = (cfg.num_processes or 0) // cfg.num_machines
    if per_machine > len(gpus):
        machines = f" ({per_machine} on each of {cfg.num_machines} machines)" if cfg.num_machines > 1 else ""
        each = " on each machine" if cfg.num_machines > 1 else ""
        problems.append(
            f"`num_processes` {cfg.num_processes}{machines} but {len(gpus)} GPU(s) are visible; set num_processes: "
            f"{len(gpus) * cfg.num_machines} or leave it unset (one process per visible GPU{each})"
        )
    old = [gpu for gpu in gpus if gpu.compute_capability < 8.0]
    if old:
        names = ", ".join(f"{gpu.name} (compute capability {gpu.compute_capability})" for gpu in old)
        if cfg.bf16:
            problems.append(f"`bf16: true` needs compute capability 8.0+ (Ampere or newer), but {names}; set `bf16: false`")
        if cfg.tf32:
            problems.append(f"`tf32: true` needs compute capability 8.0+ (Ampere or newer), but {names}; set `tf32: false`")
        if cfg.flash_attention or cfg.attn_implementation == "flash_attention_2":
            problems.append(f"flash-attn 2 needs compute capability 8.0+, but {names}; set `flash_attention: false`")
    return problems
