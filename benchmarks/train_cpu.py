"""Training throughput on CPU: the train stage on the tiny model, LoRA vs QLoRA (nf4, fp32 compute),
and LoRA in two processes (`accelerate launch`, DDP over gloo) against LoRA in one.

Run from the repository root: `.venv/bin/python -m benchmarks.train_cpu` (about two minutes on 2 idle
cores). Every run goes through the train stage (`tasks.stage.run_stage`) with the quickstart's settings (packed rows of
512 tokens, micro_batch_size 4 per process, LoRA r=16 on all linear layers), no evaluation and no checkpoints;
tokens/s is the stage's own figure from metrics.jsonl (input tokens per second of training, padding
included): the median over the logging intervals after the first (which carries the warm-up), so
that a burst of other work on a shared machine does not decide the figure. For two processes it
counts the tokens of both (twice the tokens per step); the stage's wall time includes starting them.
The last line printed is one JSON object with every figure.
"""

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from tasks import store
from tasks.config_load import load_config
from tasks.stage import run_stage
from tasks.stages import PREP, TRAIN
from tasks.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
ROWS = 1000
STEPS = 30
LOGGING_STEPS = 3


def measure(root: Path, base_model: Path, data: Path, adapter: str, processes: int = 1) -> dict:
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    raw.update(
        base_model=str(base_model), state_dir=str(root / "state"), output_dir=str(root / "out"), adapter=adapter,
        max_steps=STEPS, logging_steps=LOGGING_STEPS, save_steps=None, eval_steps=None, val_set_size=0.05,
        num_processes=processes,
    )
    raw["datasets"][0] = {"path": str(data), "type": "chat_template"}
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(config_path)
    prep_manifest = run_stage(PREP, cfg)
    started = time.perf_counter()
    manifest = run_stage(TRAIN, cfg, {"prep": prep_manifest})
    wall_s = time.perf_counter() - started
    records = [json.loads(line) for line in (store.output_dir(cfg, manifest) / "metrics.jsonl").read_text().splitlines()]
    train_records = [record for record in records if "loss" in record]
    speeds = [record["tokens_per_second"] for record in train_records[1:]]
    return {
        "tokens_per_s": round(statistics.median(speeds), 1),
        "stage_wall_s": round(wall_s, 1),
        "tokens": manifest["tokens_seen"],
        "last_loss": round(train_records[-1]["loss"], 4),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base_model = build_tiny_model(root / "tiny", seed=0, corpus_files=[DATA])
        data = root / "data.jsonl"
        data.write_bytes(b"".join(DATA.read_bytes().splitlines(keepends=True)[:ROWS]))
        results = {adapter: measure(root / adapter, base_model, data, adapter) for adapter in ("lora", "qlora")}
        results["lora_ddp2"] = measure(root / "lora_ddp2", base_model, data, "lora", processes=2)
    for name, figures in results.items():
        print(f"{name:9s} {figures['tokens_per_s']:9.1f} tokens/s  ({figures['tokens']} tokens, stage {figures['stage_wall_s']} s)")
    print(json.dumps({
        "benchmark": "train_cpu",
        "model": "tiny-llama (4 layers, hidden 128)",
        "sequence_len": 512, "micro_batch_size": 4, "steps": STEPS, "threads": torch.get_num_threads(),
        "lora_tokens_per_s": results["lora"]["tokens_per_s"],
        "qlora_tokens_per_s": results["qlora"]["tokens_per_s"],
        "qlora_vs_lora": round(results["qlora"]["tokens_per_s"] / results["lora"]["tokens_per_s"], 3),
        "lora_ddp2_tokens_per_s": results["lora_ddp2"]["tokens_per_s"],
        "ddp2_vs_lora": round(results["lora_ddp2"]["tokens_per_s"] / results["lora"]["tokens_per_s"], 3),
        "lora_stage_wall_s": results["lora"]["stage_wall_s"],
        "lora_ddp2_stage_wall_s": results["lora_ddp2"]["stage_wall_s"],
        "lora_last_loss": results["lora"]["last_loss"],
        "qlora_last_loss": results["qlora"]["last_loss"],
    }))


if __name__ == "__main__":
    main()
