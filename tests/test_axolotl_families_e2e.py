"""Configs in the shapes Axolotl users write them, run through the whole pipeline on a CPU.

Each config is written the way Axolotl's own examples write theirs (our own text, not a copy):
`base_model` a hub id (served here from a hub-layout cache, offline), blank placeholders,
`bf16: auto`, `lora_target_linear`, `saves_per_epoch`, ... and local data in the family's row
format. Each trains a few steps on the tiny model and goes through prep, train, eval and export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_hub_models import FIRST_COMMIT, HUB_ID, add_snapshot

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
ROWS = 48

COMMON = f"""
base_model: {HUB_ID}
model_type: LlamaForCausalLM
tokenizer_type: AutoTokenizer
dataset_prepared_path:
output_dir: {{out}}
state_dir: {{state}}
sequence_len: 256
sample_packing: true
wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
gradient_accumulation_steps: 1
micro_batch_size: 2
num_epochs: 1
max_steps: 3
optimizer: adamw_torch
lr_scheduler: cosine
learning_rate: 0.0002
bf16: auto
tf32: false
gradient_checkpointing: true
resume_from_checkpoint:
logging_steps: 1
warmup_steps: 1
evals_per_epoch: 1
saves_per_epoch: 1
weight_decay: 0.0
eval:
  max_samples: 2
  compare_base: false
  max_tokens: 4
export:
  verify_prompts: 1
  verify_max_new_tokens: 2
  registry_dir: {{registry}}
"""

FAMILIES = {
    "chat_template_property_mappings": ("""
datasets:
  - path: {data}
    type: chat_template
    field_messages: conversations
    message_property_mappings:
      role: from
      content: value
    roles_to_train: [assistant]
val_set_size: 0.1
adapter: lora
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
""", "sharegpt"),
    "alpaca": ("""
datasets:
  - path: {data}
    type: alpaca
val_set_size: 0.1
adapter: lora
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules: [q_proj, v_proj]
""", "alpaca"),
    "completion": ("""
datasets:
  - path: {data}
    type: completion
val_set_size: 0.1
adapter: lora
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
""", "completion"),
    "qlora_special_tokens": ("""
datasets:
  - path: {data}
    type: chat_template
val_set_size: 0.1
adapter: qlora
load_in_4bit: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
special_tokens:
  pad_token: "<|endoftext|>"
tokens: ["<|tool|>"]
""", "messages"),
    "chatml_template": ("""
datasets:
  - path: {data}
    type: chat_template
chat_template: chatml
val_set_size: 0.1
adapter: lora
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
""", "messages"),
    "val_set_size_zero": ("""
datasets:
  - path: {data}
    type: chat_template
val_set_size: 0
adapter: lora
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
""", "messages"),
}


def write_rows(path: Path, shape: str) -> Path:
    """The first quickstart rows in a family's row format."""
    rows = []
    for line in QUICKSTART_DATA.read_text().splitlines()[:ROWS]:
        messages = json.loads(line)["messages"]
        user = next(m["content"] for m in messages if m["role"] == "user")
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
        rows.append({
            "messages": {"messages": messages},
            "sharegpt": {"conversations": [{"from": m["role"], "value": m["content"]} for m in messages]},
            "alpaca": {"instruction": "Classify the sentiment of this headline.", "input": user, "output": answer},
            "completion": {"text": f"Headline: {user}\nSentiment: {answer}"},
        }[shape])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_axolotl_shaped_config_runs_through_the_pipeline(family, prefect_harness, tiny_model_dir, tmp_path, monkeypatch):
    from flows.pipeline import pipeline

    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_snapshot(hf_home, HUB_ID, tiny_model_dir, FIRST_COMMIT)
    body, shape = FAMILIES[family]
    data = write_rows(tmp_path / "rows.jsonl", shape)
    config = tmp_path / f"{family}.yaml"
    config.write_text(
        COMMON.format(out=tmp_path / "out", state=tmp_path / "state", registry=tmp_path / "registry") + body.format(data=data)
    )

    summary = pipeline(str(config))

    assert {stage: outcome["state"] for stage, outcome in summary["stages"].items()} == {
        "prep": "ran", "train": "ran", "eval": "ran", "export": "ran"
    }
    assert summary["train"]["global_step"] == 3
    assert (Path(summary["export_path"]) / "model.safetensors").is_file()
    card = (Path(summary["export_path"]) / "README.md").read_text()
    assert f"at revision `{FIRST_COMMIT}`" in card
    if family in ("val_set_size_zero", "completion"):  # nothing to score: no val split / no answer turns
        assert summary["eval"] == {} and "nothing to compare" in summary["promotion"]["reason"]
    else:
        assert summary["eval"]["tuned"]["samples"] >= 1
