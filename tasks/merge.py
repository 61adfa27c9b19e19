"""Folding a LoRA adapter into its base model, and the measurements that prove a merge right.
Shared by eval (to serve the tuned model) and export (to publish it).

What the merge folds into:
- LoRA: the original base weights, loaded in the merge dtype.
- QLoRA: the base weights the adapter was trained against, which are NOT the original ones but
  their nf4 quantization. The base is quantized exactly as training did (same
  `BitsAndBytesConfig`, same load dtype, so the same absmax blocks and nf4 codes), every 4-bit
  weight is de-quantized with `bitsandbytes.functional.dequantize_4bit`, cast to the merge dtype,
  and the adapter is merged into that. The merged model then computes what the trained QLoRA model
  computes, up to rounding. Merging into the original full-precision weights instead would publish
  a different model: on the tiny model its logits differ from the trained model's by about 2.4,
  against 1e-5 for the de-quantized merge. Merging into the 4-bit weights themselves (peft's
  default for bnb layers) would round the merged weights back to nf4 and is never done.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.errors import StageFailedError
from tasks.quantization import keep_cpu_4bit_layers_exact, nf4_config

log = logging.getLogger("loraflow.merge")

DTYPES = ("float32", "bfloat16", "float16")
# Marker rendered as an assistant turn to find what the chat template writes after an answer.
_END_OF_TURN_PROBE = "loraflow-end-of-turn-probe"


class MergeError(StageFailedError):
    """The adapter cannot be merged or the merged model cannot be saved as asked."""


@dataclass
class WeightChanges:
    """Per adapted weight: its hash before the merge and whether the adapter's delta is non-zero."""

    base_hashes: dict[str, str] = field(default_factory=dict)
    nonzero_delta: dict[str, bool] = field(default_factory=dict)


@dataclass
class ModelOutputs:
    """What the verification compares: logits on each prompt and the greedy continuation."""

    logits: list[Any]
    generations: list[list[int]]


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise MergeError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_base(base_model: str, dtype: str, trust_remote_code: bool = False, load_in_4bit: bool = False) -> Any:
    """The base model in `dtype`; with `load_in_4bit`, quantized to nf4 from weights in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if torch.cuda.is_available():
        options["device_map"] = {"": 0}
    if load_in_4bit:
        options["quantization_config"] = nf4_config(torch_dtype(dtype))
    model = AutoModelForCausalLM.from_pretrained(base_model, **options)
    if load_in_4bit:
        keep_cpu_4bit_layers_exact(model)
    model.eval()
    return model


def load_adapter_model(
    base_model: str, adapter_dir: Path, dtype: str = "float32", trust_remote_code: bool = False, load_in_4bit: bool = False
) -> Any:
    """The base model in `dtype` with the trained adapter attached (not merged). With
    `load_in_4bit` this is the QLoRA model exactly as it was trained."""
    from peft import PeftModel

    base = load_base(base_model, dtype, trust_remote_code, load_in_4bit)
    match_adapter_vocabulary(base, adapter_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model


def match_adapter_vocabulary(base: Any, adapter_dir: Path) -> None:
    """Training added tokens (`special_tokens`, `tokens`) and grew the embeddings; the adapter's
    saved tokenizer says by how much, and the base must grow the same before the adapter (which
    carries the trained embedding rows) fits onto it."""
    from transformers import AutoTokenizer

    vocabulary = len(AutoTokenizer.from_pretrained(adapter_dir))
    if vocabulary > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(vocabulary)


def load_merged(
    base_model: str, adapter_dir: Path, dtype: str = "float32", trust_remote_code: bool = False, qlora_dtype: str | None = None
) -> tuple[Any, WeightChanges]:
    """The adapter merged into the base, as a plain transformers model in `dtype`.

    `qlora_dtype`: for an adapter trained with QLoRA, the dtype the base was loaded in for training
    (float32, or bfloat16 with `bf16: true`); the merge then goes into the de-quantized nf4 weights.
    """
    base = load_base(base_model, dtype, trust_remote_code)
    if qlora_dtype is not None:
        quantized = load_base(base_model, qlora_dtype, trust_remote_code, load_in_4bit=True)
        dequantize_into(quantized, base)
        del quantized
    return merge_into(base, adapter_dir)


def merge_into(base: Any, adapter_dir: Path) -> tuple[Any, WeightChanges]:
    """Attaches the adapter to `base` (already holding the weights to merge into) and merges it."""
    from peft import PeftModel

    match_adapter_vocabulary(base, adapter_dir)
    adapter_model = PeftModel.from_pretrained(base, str(adapter_dir))
    adapter_model.eval()
    changes = record_adapter_deltas(adapter_model)
    return adapter_model.merge_and_unload(), changes


def dequantize_into(quantized: Any, full: Any) -> int:
    """Overwrites each weight of `full` that is 4-bit in `quantized` with its de-quantized value."""
    import bitsandbytes as bnb
    import torch

    replaced = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                target = full.get_submodule(name.removeprefix("base_model.model.").replace(".base_layer", "")).weight
                target.copy_(weight.to(device=target.device, dtype=target.dtype))
                replaced += 1
    if replaced == 0:
        raise MergeError("the QLoRA base has no 4-bit layers to de-quantize; was it loaded with load_in_4bit?")
    log.info("merge: %d nf4 weights de-quantized into %s", replaced, next(full.parameters()).dtype)
    return replaced


def record_adapter_deltas(adapter_model: Any) -> WeightChanges:
    """Before merging: each adapted weight's hash, and whether the adapter changes it at all."""
    from peft.tuners.lora import LoraLayer

    changes = WeightChanges()
    for name, module in adapter_model.named_modules():
        if not isinstance(module, LoraLayer) or not module.active_adapters:
            continue
        weight_name = name.removeprefix("base_model.model.") + ".weight"
        delta_max = max(float(module.get_delta_weight(adapter).abs().max()) for adapter in module.active_adapters)
        changes.nonzero_delta[weight_name] = delta_max > 0
        changes.base_hashes[weight_name] = tensor_hash(module.get_base_layer().weight)
    if not changes.nonzero_delta:
        raise MergeError("the adapter has no LoRA layers: nothing to merge")
    return changes


def tensor_hash(tensor: Any) -> str:
    import torch

    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def unchanged_weights(model: Any, changes: WeightChanges) -> list[str]:
    """Adapted weights whose adapter delta is non-zero but whose merged value equals the base's."""
    parameters = dict(model.named_parameters())
    unchanged = []
    for name, nonzero in changes.nonzero_delta.items():
        if not nonzero:
            continue
        if name not in parameters:
            raise MergeError(f"merged model has no weight {name}; the adapter does not fit this base model")
        if tensor_hash(parameters[name]) == changes.base_hashes[name]:
            unchanged.append(name)
    return unchanged


def model_outputs(model: Any, prompts: list[Any], max_new_tokens: int, eos_token_ids: list[int], pad_token_id: int) -> ModelOutputs:
    """Logits of each prompt (no KV cache, float32 on the CPU) and its greedy continuation."""
    import torch

    device = next(model.parameters()).device
    logits, generations = [], []
    with torch.no_grad():
        for ids in prompts:
            ids = ids.to(device)
            logits.append(model(input_ids=ids, use_cache=False).logits.float().cpu())
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_token_ids,
                pad_token_id=pad_token_id,
            )
            generations.append(generated[0, ids.shape[1]:].tolist())
    return ModelOutputs(logits, generations)


def max_logit_difference(reference: ModelOutputs, candidate: ModelOutputs) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(reference.logits, candidate.logits))


def end_of_turn_token_ids(tokenizer: Any) -> list[int]:
    """The token the chat template ends an assistant turn with (first), then the tokenizer's EOS
    if it is another one: the ids a generation config must stop at."""
    special_ids = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    stop_ids: list[int] = []
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _END_OF_TURN_PROBE}], tokenize=False
        )
        after_answer = text[text.index(_END_OF_TURN_PROBE) + len(_END_OF_TURN_PROBE):]
        stop_ids += [i for i in tokenizer(after_answer, add_special_tokens=False)["input_ids"] if i in special_ids][:1]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
        stop_ids.append(tokenizer.eos_token_id)
    if not stop_ids:
        raise MergeError(
            "the tokenizer has no end-of-turn token (no special token after an assistant turn in its chat "
            "template) and no eos_token: generation would never stop; set an eos_token on the base tokenizer"
        )
    return stop_ids


def save_merged(model: Any, tokenizer: Any, out_dir: Path, max_shard_size: str = "2GB") -> None:
    """Saves a merged model with its tokenizer (and chat template); the generation config stops at
    the chat template's end-of-turn token, so the served model does not run on past its answer."""
    stop_ids = end_of_turn_token_ids(tokenizer)
    model.generation_config.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
