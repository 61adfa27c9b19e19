"""QLoRA on a CPU trains exactly: LoRA gradients under 4-bit (nf4, double quant) base weights equal
those of an fp32 model holding the same de-quantized weights, before and after an evaluation pass.

bitsandbytes on CPUs with avx512_bf16 repacks a 4-bit weight into an inference-only layout the
first time the layer runs in eval mode under no_grad; `load_model_for_training` switches that off.
The last test shows the switch is needed on such a CPU (it is skipped on others).

Tolerance: both models compute in fp32 and bitsandbytes' CPU training path multiplies by the
de-quantized weight, so the gradients agree to rounding: 1e-5 relative to each tensor's largest
entry leaves room for a different summation order, and a wrong gradient (a missing path through
a layer) is off by far more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.chat_tokens import tokenize_conversation
from tasks.config import RunConfig
from tasks.packing import PackedCollator, pack_samples
from tasks.train import load_model_for_training
from tasks.trainer import token_weighted_loss

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
RELATIVE_TOLERANCE = 1e-5


def qlora_config(base_model: Path, gradient_checkpointing: bool = False) -> RunConfig:
    return RunConfig(
        base_model=str(base_model), datasets=[{"path": str(QUICKSTART_DATA)}], adapter="qlora", lora_r=8,
        lora_alpha=16, lora_dropout=0.0, lora_target_modules="all-linear", gradient_checkpointing=gradient_checkpointing,
    )


@pytest.fixture(scope="module")
def rows(tiny_tokenizer) -> list[dict]:
    lines = QUICKSTART_DATA.read_text().splitlines()[:24]
    samples = []
    for line in lines:
        tokens = tokenize_conversation(tiny_tokenizer, json.loads(line)["messages"])
        samples.append({"input_ids": tokens.input_ids, "labels": tokens.labels})
    return pack_samples(samples, 256, seed=0)


def randomise_lora(model) -> None:
    """LoRA's B starts at zero, which makes A's gradient zero: give both seeded random values."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def fp32_twin(quantized, base_model: Path, cfg: RunConfig):
    """An fp32 model whose linear weights are the 4-bit model's weights de-quantized, with the same LoRA weights."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32, attn_implementation="sdpa")
    twin.config.use_cache = False
    quantized_layers = {
        name.removeprefix("base_model.model.").removesuffix(".base_layer"): module
        for name, module in quantized.named_modules() if isinstance(module, bnb.nn.Linear4bit)
    }
    assert len(quantized_layers) == 7 * twin.config.num_hidden_layers
    with torch.no_grad():
        for name, layer in quantized_layers.items():
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.float32)
            twin.get_submodule(name).weight.copy_(weight)
    twin = get_peft_model(twin, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM",
    ))
    quantized_lora = {name: parameter for name, parameter in quantized.named_parameters() if "lora_" in name}
    with torch.no_grad():
        for name, parameter in twin.named_parameters():
            if "lora_" in name:
                parameter.copy_(quantized_lora[name])
    return twin


def lora_gradients(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False).loss.backward()
    gradients = {name: parameter.grad for name, parameter in model.named_parameters() if "lora_" in name}
    missing = [name for name, gradient in gradients.items() if gradient is None]
    assert not missing, f"no gradient reached {missing[:3]}"
    return {name: gradient.clone() for name, gradient in gradients.items()}


def worst_relative_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert actual.keys() == expected.keys()
    return max(float((actual[name] - expected[name]).abs().max() / expected[name].abs().max()) for name in expected)


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "non-reentrant-checkpointing"])
def test_qlora_gradients_equal_fp32_gradients_before_and_after_evaluation(tiny_model_dir, tiny_tokenizer, rows, gradient_checkpointing):
    cfg = qlora_config(tiny_model_dir, gradient_checkpointing)
    quantized = load_model_for_training(cfg)
    assert quantized.is_gradient_checkpointing == gradient_checkpointing
    randomise_lora(quantized)
    twin = fp32_twin(quantized, tiny_model_dir, cfg)
    batch = PackedCollator(pad_token_id=tiny_tokenizer.pad_token_id)(rows[:2])

    expected = lora_gradients(twin, batch)
    assert all(float(gradient.abs().max()) > 0 for gradient in expected.values())
    before = lora_gradients(quantized, batch)
    assert worst_relative_error(before, expected) < RELATIVE_TOLERANCE

    # train -> evaluate -> train: the evaluation runs in eval mode under no_grad, as the Trainer's does.
    token_weighted_loss(quantized, rows[2:], tiny_tokenizer.pad_token_id, batch_size=2)
    after = lora_gradients(quantized, batch)
    assert worst_relative_error(after, expected) < RELATIVE_TOLERANCE
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_without_the_switch_an_evaluation_breaks_qlora_gradients_on_avx512_bf16_cpus(tiny_model_dir, tiny_tokenizer, rows):
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no avx512_bf16: bitsandbytes never repacks 4-bit weights here")
    cfg = qlora_config(tiny_model_dir)
    quantized = load_model_for_training(cfg)
    randomise_lora(quantized)
    twin = fp32_twin(quantized, tiny_model_dir, cfg)
    batch = PackedCollator(pad_token_id=tiny_tokenizer.pad_token_id)(rows[:2])
    expected = lora_gradients(twin, batch)
    for module in quantized.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU

    token_weighted_loss(quantized, rows[2:], tiny_tokenizer.pad_token_id, batch_size=2)

    try:
        broken = worst_relative_error(lora_gradients(quantized, batch), expected) > 1e-2
    except (AssertionError, RuntimeError):
        broken = True  # gradients missing, or the repacked layout cannot run backward at all
    assert broken
