"""The export stage on real adapters trained by the real train stage on the tiny model.

- a merged export reloads with AutoModelForCausalLM, is served by `transformers serve`, and
  answers the val prompts exactly as the adapter model does (greedy);
- bf16 / fp16 / sharded exports pass verification, with logit differences pinned to what was
  measured (printed: `pytest -s tests/test_export.py`);
- `adapter_only` writes a PEFT adapter that `PeftModel.from_pretrained` loads;
- a QLoRA adapter merges into the de-quantized nf4 base and reproduces the trained QLoRA model,
  which merging into the original weights would not;
- verification refuses a model that is not the adapter model, and an all-zero adapter;
- kill -9 mid-export leaves nothing partial where a reader looks, and the re-run succeeds;
- inference formats (`export.quantize`, GGUF among them): tests/test_export_formats.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tasks import registry, store
from tasks.config import ExportConfig, RunConfig
from tasks.export import (
    LOGIT_TOLERANCE,
    MergeVerificationError,
    verify,
)
from tasks.fingerprint import FileHasher, hash_json
from tasks.merge import (
    end_of_turn_token_ids,
    load_adapter_model,
    load_base,
    load_merged,
    max_logit_difference,
    model_outputs,
)
from tasks.stage import run_stage, stage_key
from tasks.stages import EXPORT, PREP, TRAIN

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
EVAL_METRICS = {"tuned": {"accuracy": 0.95, "exact_match": 0.95}, "base": {"accuracy": 0.3, "exact_match": 0.0}}
VERIFY = {"verify_prompts": 4, "verify_max_new_tokens": 8}


@dataclass
class Trained:
    """A real prep + train run, and an eval manifest standing in for the (slow) eval stage."""

    raw: dict[str, Any]
    upstream: dict[str, dict[str, Any]]  # the prep, train and (stand-in) eval manifests

    def config(self, **export: Any) -> RunConfig:
        raw = json.loads(json.dumps(self.raw))
        raw["export"] = {**VERIFY, **export}
        return RunConfig.model_validate(raw)

    def export(self, cfg: RunConfig) -> tuple[dict[str, Any], Path]:
        manifest = run_stage(EXPORT, cfg, self.upstream)
        return manifest, store.output_dir(cfg, manifest)

    def adapter_dir(self) -> Path:
        return store.output_dir(self.config(), self.upstream["train"]) / "adapter"


def train_adapter(root: Path, base_model: Path, adapter: str) -> Trained:
    data = root / "data.jsonl"
    data.write_bytes(b"".join(QUICKSTART_DATA.read_bytes().splitlines(keepends=True)[:300]))
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    raw.update(
        name=f"export-{adapter}", base_model=str(base_model), state_dir=str(root / "state"), output_dir=str(root / "outputs"),
        adapter=adapter, max_steps=20, save_steps=None,
    )
    raw["datasets"][0]["path"] = str(data)
    raw["contract"] = {"dir": str(REPO / "data_contracts")}
    raw["export"] = {"registry_dir": str(root / "registry")}
    cfg = RunConfig.model_validate(raw)
    prep_manifest = run_stage(PREP, cfg)
    train_manifest = run_stage(TRAIN, cfg, {"prep": prep_manifest})
    return Trained(cfg.model_dump(mode="json"), {"prep": prep_manifest, "train": train_manifest,
                                                  "eval": stand_in_eval(cfg, train_manifest)})


def stand_in_eval(cfg: RunConfig, train_manifest: dict[str, Any]) -> dict[str, Any]:
    """A published eval output with fixed metrics, standing in for the (slow) eval stage."""
    eval_key = hash_json({"stands in for eval of": train_manifest["fingerprint"]})
    eval_dir = store.stage_dir(cfg, "eval", eval_key)
    if store.read_manifest(eval_dir) is None:
        eval_manifest = {"stage": "eval", "fingerprint": eval_key, "metrics": EVAL_METRICS, "eval_loss": 0.8,
                         "output_digest": hash_json(EVAL_METRICS)}
        store.publish(store.fresh_partial_dir(eval_dir), eval_dir, eval_manifest)
    return store.require_manifest(cfg, "eval", eval_key)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_model_dir) -> Trained:
    return train_adapter(tmp_path_factory.mktemp("lora"), tiny_model_dir, "lora")


@pytest.fixture(scope="module")
def qlora(tmp_path_factory, tiny_model_dir) -> Trained:
    return train_adapter(tmp_path_factory.mktemp("qlora"), tiny_model_dir, "qlora")


@pytest.fixture(scope="module")
def float32_export(lora) -> tuple[dict[str, Any], Path]:
    return lora.export(lora.config())


def val_prompts(trained: Trained, tokenizer: Any, count: int) -> list[dict[str, Any]]:
    from tasks.eval import load_eval_items

    items = load_eval_items(store.output_dir(trained.config(), trained.upstream["prep"]), count)
    for item in items:
        item["ids"] = tokenizer.apply_chat_template(item["prompt"], add_generation_prompt=True, return_tensors="pt")["input_ids"]
    return items


def test_merged_export_reloads_serves_and_answers_like_the_adapter_model(lora, float32_export, tiny_model_dir, tmp_path):
    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.serving import transformers_serve

    manifest, export_dir = float32_export
    model_dir = export_dir / manifest["model_dir"]
    names = {path.name for path in model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json", "README.md"} <= names

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == end_of_turn
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template

    card = (model_dir / "README.md").read_text()
    lineage = manifest["lineage"]
    assert lineage["base_model"]["identity"] == {"sha256": FileHasher().tree(tiny_model_dir)}
    assert lineage["data_digest"] == lora.upstream["prep"]["output_digest"]
    assert lineage["libraries"]["torch"] and lineage["libraries"]["peft"]
    for value in (lineage["base_model"]["identity"]["sha256"], lineage["data_digest"], lineage["code_version"], lineage["exported_at"],
                  '"accuracy": 0.95'):
        assert value in card
    assert '"lora_r": 16' in card  # the config

    verification = manifest["verification"]
    print(f"\nfloat32 merge: {json.dumps(verification)}")
    assert verification["generations_match"] == verification["prompts"] == VERIFY["verify_prompts"]
    assert verification["weights_changed"] == verification["adapted_weights"] == 4 * 7  # all-linear, 4 layers
    assert 0 < verification["relative_logit_diff"] < 1e-5  # measured 5.7e-7

    # Independently of the stage's own check: reload, and answer like the adapter model.
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    adapter_model = load_adapter_model(str(tiny_model_dir), lora.adapter_dir(), "float32")
    items = val_prompts(lora, tokenizer, 6)
    expected = []
    for item in items:
        options = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(item["ids"])}
        from_adapter = adapter_model.generate(input_ids=item["ids"], **options)[0, item["ids"].shape[1]:]
        from_merged = merged.generate(input_ids=item["ids"], **options)[0, item["ids"].shape[1]:]
        assert from_merged.tolist() == from_adapter.tolist()
        expected.append(tokenizer.decode(from_adapter, skip_special_tokens=True))
    assert set(expected) <= {"positive", "negative", "neutral"}, expected  # it learned the task's answers

    started = time.monotonic()
    with transformers_serve(tmp_path / "serve.log", startup_timeout=120) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="loraflow-test")
        served = [
            client.chat.completions.create(model=str(model_dir.resolve()), messages=item["prompt"], max_tokens=8, temperature=0)
            .choices[0].message.content
            for item in items
        ]
    print(f"transformers serve: {len(items)} answers in {time.monotonic() - started:.1f} s")
    assert [answer.strip() for answer in served] == expected


@pytest.mark.parametrize(
    ("dtype", "measured_bound"),
    [("bfloat16", 0.02), ("float16", 0.003)],  # measured 6.2e-3 and 7.8e-4 (relative)
)
def test_half_precision_exports_verify_within_measured_differences(lora, dtype, measured_bound):
    from safetensors import safe_open

    manifest, export_dir = lora.export(lora.config(merge_dtype=dtype, max_shard_size="1MB"))
    verification = manifest["verification"]
    print(f"\n{dtype} merge: {json.dumps(verification)}")
    assert 0 < verification["relative_logit_diff"] < measured_bound < LOGIT_TOLERANCE[dtype]
    assert verification["generations_match"] == verification["prompts"]
    model_dir = export_dir / "model"
    shards = sorted(model_dir.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (model_dir / "model.safetensors.index.json").is_file()
    with safe_open(str(shards[0]), "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == getattr(torch, dtype)


def test_adapter_only_export_is_a_peft_adapter(lora, tiny_model_dir):
    from peft import PeftModel
    from safetensors import safe_open

    manifest, export_dir = lora.export(lora.config(adapter_only=True))
    model_dir = export_dir / "model"
    assert manifest["kind"] == "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert not (model_dir / "model.safetensors").exists()
    adapter_config = json.loads((model_dir / "adapter_config.json").read_text())
    # What vLLM's --lora-modules reads: a LoRA adapter without full-weight modules, weights named
    # base_model.model.<module>.lora_A/B.weight.
    assert adapter_config["peft_type"] == "LORA" and not adapter_config["modules_to_save"] and not adapter_config["use_dora"]
    with safe_open(str(model_dir / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert "library_name: peft" in (model_dir / "README.md").read_text()

    loaded = PeftModel.from_pretrained(load_base(str(tiny_model_dir), "float32"), str(model_dir))
    trained = load_adapter_model(str(tiny_model_dir), lora.adapter_dir(), "float32")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    assert manifest["verification"]["max_logit_diff"] == 0.0


def test_qlora_adapter_merges_into_the_dequantized_nf4_base(qlora, tiny_model_dir):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.train import load_model_for_training

    cfg = qlora.config()
    # The merge quantizes the base exactly as training did (same nf4 codes and absmax blocks).
    training_model = load_model_for_training(cfg)
    ours = load_base(str(tiny_model_dir), "float32", load_in_4bit=True)
    ours_layers = {name: m for name, m in ours.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    compared = 0
    for name, module in training_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            mine = ours_layers[name.removeprefix("base_model.model.").replace(".base_layer", "")]
            theirs = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(bnb.functional.dequantize_4bit(mine.weight.data, mine.weight.quant_state), theirs), name
            compared += 1
    assert compared == len(ours_layers) == 28
    del training_model, ours

    manifest, export_dir = qlora.export(cfg)
    verification = manifest["verification"]
    print(f"\nQLoRA float32 merge: {json.dumps(verification)}")
    assert "nf4" in verification["reference"] and verification["generations_match"] == verification["prompts"]
    assert verification["relative_logit_diff"] < 1e-5
    config = json.loads((export_dir / "model" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain full-precision model

    # The trained model is the adapter on the nf4 base; merging into the original weights instead
    # would publish something else.
    tokenizer = AutoTokenizer.from_pretrained(export_dir / "model")
    prompts = [item["ids"] for item in val_prompts(qlora, tokenizer, 4)]
    stop = end_of_turn_token_ids(tokenizer)
    trained = model_outputs(load_adapter_model(str(tiny_model_dir), qlora.adapter_dir(), "float32", load_in_4bit=True), prompts, 8, stop, 0)
    exported = model_outputs(AutoModelForCausalLM.from_pretrained(export_dir / "model"), prompts, 8, stop, 0)
    into_original, _ = load_merged(str(tiny_model_dir), qlora.adapter_dir(), "float32")
    naive = model_outputs(into_original, prompts, 8, stop, 0)
    scale = max(float(logits.abs().max()) for logits in trained.logits)
    exported_diff, naive_diff = max_logit_difference(trained, exported) / scale, max_logit_difference(trained, naive) / scale
    print(f"relative logit difference to the trained QLoRA model: de-quantized merge {exported_diff:.2g}, original merge {naive_diff:.2g}")
    assert exported_diff < 1e-5 and naive_diff > 0.05


def test_verification_refuses_other_models_and_empty_adapters(lora, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [item["ids"] for item in val_prompts(lora, tokenizer, 3)]
    stop = end_of_turn_token_ids(tokenizer)
    adapter_outputs = model_outputs(load_adapter_model(str(tiny_model_dir), lora.adapter_dir()), prompts, 4, stop, 0)
    base_outputs = model_outputs(load_base(str(tiny_model_dir), "float32"), prompts, 4, stop, 0)
    with pytest.raises(MergeVerificationError, match="max logit difference"):
        verify(adapter_outputs, base_outputs, tokenizer, {"w": True}, [], ExportConfig(), "float32", 0.0, "adapter")
    with pytest.raises(MergeVerificationError, match="left 1 weight.* unchanged"):
        verify(adapter_outputs, adapter_outputs, tokenizer, {"w": True}, ["w"], ExportConfig(), "float32", 0.0, "adapter")

    # A train stage output whose adapter was never trained (LoRA B starts at zero).
    cfg = lora.config()
    untrained_fp = hash_json("untrained adapter")
    train_dir = store.stage_dir(cfg, "train", untrained_fp)
    work = store.fresh_partial_dir(train_dir)
    get_peft_model(load_base(str(tiny_model_dir), "float32"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(work / "adapter")
    tokenizer.save_pretrained(work / "adapter")
    untrained = store.publish(work, train_dir, {"stage": "train", "fingerprint": untrained_fp, "adapter_dir": "adapter", "adapter": "lora",
                                                "output_digest": untrained_fp})
    upstream = {**lora.upstream, "train": untrained}
    with pytest.raises(MergeVerificationError, match="LoRA layers is zero"):
        run_stage(EXPORT, cfg, upstream)
    assert store.read_manifest(store.stage_dir(cfg, "export", stage_key(EXPORT, cfg, upstream))) is None  # nothing published


EXPORT_SCRIPT = """
import json, sys
from pathlib import Path
from tasks import registry, store
from tasks.config import RunConfig
from tasks.stage import run_stage
from tasks.stages import EXPORT
cfg = RunConfig.model_validate_json(Path(sys.argv[1]).read_text())
manifest = run_stage(EXPORT, cfg, json.loads(Path(sys.argv[2]).read_text()))
registry.register_and_gate(cfg, store.output_dir(cfg, manifest), manifest)
"""


def test_kill_9_mid_export_leaves_nothing_partial_visible(lora, tmp_path):
    cfg = lora.config(verify_prompts=3, registry_dir=str(tmp_path / "registry"))
    final_dir = store.stage_dir(cfg, "export", stage_key(EXPORT, cfg, lora.upstream))
    config_file = tmp_path / "cfg.json"
    config_file.write_text(cfg.model_dump_json())
    upstream_file = tmp_path / "upstream.json"
    upstream_file.write_text(json.dumps(lora.upstream))
    process = subprocess.Popen([sys.executable, "-c", EXPORT_SCRIPT, str(config_file), str(upstream_file)], cwd=REPO)
    written = store.partial_dir(final_dir) / "model"
    deadline = time.monotonic() + 180
    while process.poll() is None and not list(written.glob("*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the export finished (or failed) before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    # Where readers look: the stage output, the registry's versions and its production pointer.
    assert not final_dir.exists() and store.read_manifest(final_dir) is None
    root = registry.registry_dir(cfg)
    assert registry.list_versions(root) == [] and registry.production(root) is None

    manifest = run_stage(EXPORT, cfg, lora.upstream)
    decision = registry.register_and_gate(cfg, final_dir, manifest)
    assert decision["promoted"] and decision["production"] == "v0001"
    assert not store.partial_dir(final_dir).exists()
    assert (root / "production" / "model" / "model.safetensors").is_file()


def test_end_of_turn_ids_follow_the_chat_template(tiny_tokenizer):
    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_token_ids(tiny_tokenizer) == [end_of_turn]
    # A tokenizer whose EOS is not the end-of-turn token (like Llama 3's): stop at both, turn first.
    tiny_tokenizer_copy = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path, eos_token="<|endoftext|>")
    assert end_of_turn_token_ids(tiny_tokenizer_copy) == [end_of_turn, tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")]
