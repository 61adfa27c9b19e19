"""The eval stage in the real pipeline flow (Prefect test harness, tiny model), against an external
OpenAI-compatible endpoint (tests/eval_fault_server.py) that needs API keys and is flaky.

The tuned model's key comes from an environment variable, the judge's from a Prefect Secret block;
both are canaries: the server must receive them, and neither may appear in any log line (ours,
Prefect's, the openai client's at debug level), artifact, report, manifest, sample file, the run
summary or anything else written under the run's directories.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path

import pytest
import yaml
from eval_fault_server import Faults, FaultServer, last_word_responder

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
LABELS = ["positive", "negative", "neutral"]
TUNED_KEY = "sk-canary-tuned-5f1e9c0d4b"
JUDGE_KEY = "sk-canary-judge-a7d3b0e21f"


def responder(model: str, messages: list[dict]) -> str:
    """`tuned-model` names a label found in the headline, `judge` prefers the answer equal to the
    reference (both orders agree), anything else answers like a base model."""
    if model == "judge":
        text = messages[-1]["content"]
        reference = text.split("Reference answer:\n")[1].split("\n\nAnswer A:")[0]
        answer_a = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
        answer_b = text.split("Answer B:\n")[1].split("\n\nWhich answer")[0]
        return "A" if answer_a == reference else "B" if answer_b == reference else "tie"
    if model == "tuned-model":
        headline = messages[-1]["content"].lower()
        return "positive" if any(word in headline for word in ("record", "beats", "upgrade", "raises")) else "neutral"
    return last_word_responder("base", messages)


def write_config(directory: Path, base_model: Path, base_url: str) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    data = directory / "data.jsonl"
    data.write_bytes(b"".join(QUICKSTART_DATA.read_bytes().splitlines(keepends=True)[:200]))
    raw.update(
        base_model=str(base_model), state_dir=str(directory / "state"), output_dir=str(directory / "outputs"),
        max_steps=2, save_steps=2, contract={"dir": str(REPO / "data_contracts")},
    )
    raw["datasets"][0]["path"] = str(data)
    raw["eval"] = {
        "endpoint": "external", "base_url": base_url, "model": "tuned-model", "base_model_name": "base-model",
        "api_key_env": "LORAFLOW_TEST_EVAL_KEY", "max_samples": 12, "labels": LABELS, "request_timeout": 1.0,
        "prices": {"tuned-model": {"input_per_million": 0.27, "output_per_million": 1.10}, "judge": {"input_per_million": 0.5}},
        "judge": {"base_url": base_url, "model": "judge", "api_key_secret": "loraflow-test-judge-key"},
    }
    path = directory / "canary.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_external_eval_with_judge_never_leaks_api_keys(prefect_harness, tiny_model_dir, tmp_path, monkeypatch, capfd):
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline

    monkeypatch.setenv("LORAFLOW_TEST_EVAL_KEY", TUNED_KEY)
    monkeypatch.setenv("OPENAI_LOG", "debug")
    Secret(value=JUDGE_KEY).save("loraflow-test-judge-key", overwrite=True)
    # Every record of these loggers, at debug level, whatever handlers Prefect sets up meanwhile.
    records = io.StringIO()
    handler = logging.StreamHandler(records)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    watched = [logging.getLogger(name) for name in ("openai", "httpx", "httpx2", "httpcore", "loraflow", "prefect")]
    for logger in watched:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)

    faults = Faults(rate_limit=0.2, drop=0.2, server_error=0.1)
    with FaultServer(responder=responder, faults=faults, api_keys={TUNED_KEY, JUDGE_KEY}) as server:
        try:
            summary = pipeline(str(write_config(tmp_path, tiny_model_dir, server.base_url)))
        finally:
            for logger in watched:
                logger.removeHandler(handler)
        assert server.authorizations == {f"Bearer {TUNED_KEY}", f"Bearer {JUDGE_KEY}"}  # the keys were really used
        assert sum(server.faults_sent.values()) > 0

    # The stage did its job through the eval stage: both models, judge, cost, report and samples.
    assert summary["eval"]["tuned"]["samples"] == summary["eval"]["base"]["samples"] == 12
    eval_dir = next(path for path in (tmp_path / "state" / "eval").iterdir() if (path / "manifest.json").is_file())
    report = json.loads((eval_dir / "eval_report.json").read_text())
    assert report["judge"]["comparisons"] == 12 and report["judge"]["losses"] == 0
    assert report["cost_usd"]["tuned"] > 0 and report["cost_usd"]["judge"] > 0 and report["cost_usd"]["base"] == 0
    assert report["eval_loss"] is not None
    assert len((eval_dir / "samples.jsonl").read_text().splitlines()) == 12

    async def prefect_records() -> str:
        async with get_client() as client:
            artifacts = await client.read_artifacts()
            logs = await client.read_logs()
        assert {"canary-eval-metrics", "canary-eval-comparison"} <= {artifact.key for artifact in artifacts}
        return json.dumps([a.model_dump(mode="json") for a in artifacts]) + "\n".join(log.message for log in logs)

    captured = capfd.readouterr()
    texts = {
        "our and library log records": records.getvalue(),
        "console": captured.out + captured.err,
        "Prefect artifacts and logs": asyncio.run(prefect_records()),
    }
    for path in tmp_path.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("utf-8", errors="replace")
    assert any("run_summary.json" in name for name in texts) and any("eval_report.json" in name for name in texts)
    # The records were captured, down to the openai client's debug lines.
    assert "openai._base_client DEBUG" in texts["our and library log records"]
    assert "Retrying request" in texts["our and library log records"]
    assert "loraflow.eval INFO eval tuned" in texts["our and library log records"]
    for where, text in texts.items():
        assert TUNED_KEY not in text and JUDGE_KEY not in text, f"an API key leaked into {where}"
