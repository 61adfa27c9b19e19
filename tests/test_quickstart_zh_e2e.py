"""End-to-end: the Chinese quickstart through the real Prefect flow on a CPU (issue 18).

- sentiment (`configs/quickstart-zh.yaml`): the tiny model, its tokenizer trained on the Chinese
  rows, learns 正面 / 负面 / 中性: tuned accuracy >= 0.9 on the held-out headlines, base near 0;
- analysis (`configs/quickstart-zh-analysis.yaml`, shortened here): the long-answer task is scored
  by character-level ROUGE-L, far above the base model's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.test_pipeline_e2e import write_config

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "examples" / "quickstart-zh"
SENTIMENT = DATA_DIR / "finance_sentiment_zh.jsonl"
ANALYSIS = DATA_DIR / "finance_analysis_zh.jsonl"


@pytest.fixture(scope="module")
def zh_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-zh") / "model", seed=0, corpus_files=[SENTIMENT, ANALYSIS])



def test_chinese_sentiment_quickstart_learns(prefect_harness, zh_model_dir, tmp_path):
    from flows.pipeline import pipeline

    started = time.monotonic()
    summary = pipeline(str(write_config(tmp_path, zh_model_dir, name="quickstart-zh", template="quickstart-zh.yaml")))
    wall_s = time.monotonic() - started
    tuned, base = summary["eval"]["tuned"], summary["eval"]["base"]
    print(f"\nquickstart-zh: tuned accuracy {tuned['accuracy']}, base accuracy {base['accuracy']}, pipeline {wall_s:.1f} s")
    assert {stage: outcome["state"] for stage, outcome in summary["stages"].items()} == {
        "prep": "ran", "train": "ran", "eval": "ran", "export": "ran"}
    assert tuned["accuracy"] >= 0.9, tuned
    assert base["accuracy"] <= 0.1, base
    assert tuned["samples"] == base["samples"] == 150
    assert summary["prep"]["rows_in"] == summary["prep"]["rows_accepted"] == 3000

    # The answers are Chinese labels, scored as such (not empty strings matching empty references).
    eval_dir = tmp_path / "state" / "eval" / summary["stages"]["eval"]["fingerprint"]
    samples = [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {sample["reference"] for sample in samples} == {"正面", "负面", "中性"}


def test_chinese_analysis_task_scores_rouge_l_over_characters(prefect_harness, zh_model_dir, tmp_path):
    from flows.pipeline import pipeline

    config = write_config(
        tmp_path, zh_model_dir, name="quickstart-zh-analysis", template="quickstart-zh-analysis.yaml",
        eval={"max_samples": 20}, export={"promote_if": []},
    )
    summary = pipeline(str(config))
    tuned, base = summary["eval"]["tuned"], summary["eval"]["base"]
    print(f"\nquickstart-zh-analysis: tuned rouge_l {tuned['rouge_l']}, base rouge_l {base['rouge_l']}")
    assert "accuracy" not in tuned  # no label set: a free-text task
    # Measured: tuned 0.62 (right form and conclusion, the company or the reason often wrong), base 0.03.
    assert tuned["rouge_l"] >= 0.5, tuned
    assert base["rouge_l"] <= 0.1, base
