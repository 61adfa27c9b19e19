"""The fair gate's decisions on given per-item scores, the alert messages on a real HTTP receiver,
and `eval.budget_usd` against a real OpenAI-compatible server (tests/openai_stub.py)."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
from openai_stub import StubServer
from pydantic import ValidationError

from tasks import gate, notify
from tasks.config import EvalConfig, RunConfig
from tasks.config_sections import NotifyConfig, PromoteCondition
from tasks.eval_client import BudgetExceededError, ModelTarget, ask_all, spending_limit
from tasks.stage import retry_unless_final


def items(accuracy: list[int], kind: str = "test_set") -> gate.GateItems:
    return gate.GateItems(kind, "i" * 64, "s" * 64, [{"prompt": [], "reference": "x"}] * len(accuracy),
                          [{"accuracy": float(a), "exact_match": float(a)} for a in accuracy])


# 20 items: the candidate alone right on 10, production alone on 2 (McNemar p = 0.0386).
CANDIDATE = [1] * 10 + [0] * 2 + [1] * 5 + [0] * 3
PRODUCTION = [0] * 10 + [1] * 2 + [1] * 5 + [0] * 3


def decide(condition: dict, candidate: list[int], production: list[int] | None) -> dict:
    paired = (items(production), "stored") if production is not None else None
    return gate.evaluate_gate([PromoteCondition(**condition)], {"tuned": {"accuracy": 0.0}}, {} if production else None,
                                  "v0001" if production else None, items(candidate), paired)


def test_significant_improvement_required():
    improved = decide({"metric": "accuracy", "min_improvement": 0, "confidence": 0.95}, CANDIDATE, PRODUCTION)
    check = improved["checks"][0]
    assert improved["promoted"], improved["reason"]
    assert (check["value"], check["production_value"], check["items"], check["discordant"]) == (0.75, 0.35, 20, [10, 2])
    assert check["difference"] == pytest.approx(0.4) and check["interval"][0] > 0
    assert "95% interval" in improved["reason"] and "McNemar p=0.0386" in improved["reason"]
    # 3 against 1 on 5 items is within noise: not promoted, though the mean is higher.
    noise = decide({"metric": "accuracy", "min_improvement": 0, "confidence": 0.95}, [1, 1, 1, 0, 1], [0, 0, 0, 1, 1])
    assert not noise["promoted"] and "not a significant improvement" in noise["reason"]
    # Without a confidence, the bare difference decides (the old, noise-prone behaviour).
    assert decide({"metric": "accuracy", "min_improvement": 0}, [1, 1, 1, 0, 1], [0, 0, 0, 1, 1])["promoted"]


def test_bounded_regression_blocks_only_a_significant_one():
    # Production better by 0.4 on 20 items: the 95 % interval of the difference is [-0.575, -0.019],
    # significantly worse than no regression at all, but not significantly beyond a 0.05 one.
    worse = decide({"metric": "accuracy", "max_regression": 0.0, "confidence": 0.95}, PRODUCTION, CANDIDATE)
    assert not worse["promoted"] and "significantly beyond max_regression 0" in worse["reason"]
    assert worse["checks"][0]["interval"][1] == pytest.approx(-0.0190, abs=1e-4)
    assert decide({"metric": "accuracy", "max_regression": 0.05, "confidence": 0.95}, PRODUCTION, CANDIDATE)["promoted"]
    # Worse by one item in five: noise, promoted.
    noisy = decide({"metric": "accuracy", "max_regression": 0.05, "confidence": 0.95}, [1, 1, 0, 1, 0], [1, 1, 1, 1, 0])
    assert noisy["promoted"] and "not significantly beyond max_regression 0.05" in noisy["reason"]
    # No production yet: the comparison is skipped, absolute bounds still apply on the gate's items.
    first = decide({"metric": "accuracy", "min": 0.7, "min_improvement": 0, "confidence": 0.95}, CANDIDATE, None)
    assert first["promoted"] and "no production version yet" in first["reason"]


def test_config_of_the_gate_the_test_set_and_alerts():
    with pytest.raises(ValidationError, match="`confidence` applies to"):
        PromoteCondition(metric="accuracy", min=0.5, confidence=0.95)
    assert PromoteCondition(metric="accuracy", min_improvement=0.0).min_improvement == 0.0
    # `crashed` is sent by the Prefect server (tasks/zombies.py, tests/test_ops_crashed.py).
    assert NotifyConfig(events=["crashed"], webhook={"url": "http://127.0.0.1:1/"}).events == ["crashed"]
    with pytest.raises(ValidationError, match="unknown event 'crash'"):
        NotifyConfig(events=["crash"], webhook={"url": "http://127.0.0.1:1/"})
    with pytest.raises(ValidationError, match="one of `url` and `url_env`"):
        NotifyConfig(webhook={})
    cfg = RunConfig.model_validate({"base_model": "m", "datasets": [{"path": "d.jsonl"}],
                                    "eval": {"test_set": {"path": "/somewhere/test.jsonl", "contract": "c"}, "budget_usd": 1.5}})
    from tasks.stages import EVAL

    settings = EVAL.settings(cfg)
    # Moving the test set or changing the budget does not change an answer: neither keys eval.
    assert "path" not in settings["eval"]["test_set"] and "budget_usd" not in settings["eval"]


class Receiver:
    def __init__(self, status: int = 204) -> None:
        self.bodies: list[dict] = []
        bodies = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=s3cret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def alert_config(notify_section: dict) -> RunConfig:
    return RunConfig.model_validate({"name": "sentiment", "base_model": "m", "datasets": [{"path": "d.jsonl"}], "notify": notify_section})


def test_alerts_go_to_a_webhook_named_by_an_environment_variable(monkeypatch, caplog):
    with Receiver() as receiver:
        monkeypatch.setenv("LORAFLOW_TEST_HOOK", receiver.url)
        cfg = alert_config({"events": ["not_promoted"], "webhook": {"url_env": "LORAFLOW_TEST_HOOK"}})
        assert notify.send(cfg, "not_promoted", "promote", "not_promoted", "not promoted: ...", {"version": "v0002"}) == ["webhook"]
        assert notify.send(cfg, "promoted", "promote", "promoted", "promoted") == []  # not picked
    [body] = receiver.bodies
    assert {k: body[k] for k in ("event", "config", "stage", "state", "reason", "metrics")} == {
        "event": "not_promoted", "config": "sentiment", "stage": "promote", "state": "not_promoted",
        "reason": "not promoted: ...", "metrics": {"version": "v0002"},
    }
    assert body["run"] is None and "ui_url" in body and "sent_at" in body
    # An unreachable webhook is logged without its URL (it may hold a token) and never raises.
    with Receiver() as gone:
        dead_url = gone.url
    monkeypatch.setenv("LORAFLOW_TEST_HOOK", dead_url)
    assert notify.send(cfg, "not_promoted", "promote", "not_promoted", "x") == []
    assert "s3cret" not in caplog.text and "not delivered to the webhook" in caplog.text


def test_budget_stops_requests_before_spending_more(tmp_path):
    # The stub answers one completion token per request; 1 USD per completion token -> 1 USD a request.
    settings = EvalConfig(concurrency=1, budget_usd=3.5, prices={"stub": {"output_per_million": 1_000_000}})
    prompts = [[{"role": "user", "content": f"headline {i} beats"}] for i in range(6)]
    with StubServer() as server:
        target = ModelTarget("tuned", "stub", "fingerprint-1", server.base_url)
        with spending_limit(settings.budget_usd, settings.prices) as ledger:
            with pytest.raises(BudgetExceededError, match=r"eval.budget_usd=3.5 reached: 3.000000 USD spent on 3 requests"):
                ask_all(target, prompts, {"max_tokens": 4, "temperature": 0.0}, settings, tmp_path)
        assert server.requests == 3 and ledger.spent_usd == 3.0
        # The answers that arrived are cached: a larger budget pays only for the other three.
        with spending_limit(10.0, settings.prices) as ledger:
            answers = ask_all(target, prompts, {"max_tokens": 4, "temperature": 0.0}, settings, tmp_path)
        assert server.requests == 6 and ledger.spent_usd == 3.0 and sum(a.cached for a in answers) == 3
    # A spent budget is never retried by Prefect (a retry would spend again).
    from prefect.states import Failed

    assert not retry_unless_final(None, None, Failed(data=BudgetExceededError("spent")))
    assert retry_unless_final(None, None, Failed(data=RuntimeError("flaky")))


def test_gate_scores_are_stored_per_items_and_settings(tmp_path):
    version = tmp_path / "v0001"
    candidate = items([1, 0, 1])
    assert gate.stored_scores(version, candidate) is None
    gate.store_scores(version, candidate, candidate.scores)
    assert gate.stored_scores(version, candidate) == candidate.scores
    other_settings = gate.GateItems("test_set", "i" * 64, "t" * 64, candidate.items, candidate.scores)
    assert gate.stored_scores(version, other_settings) is None  # other eval settings: production must be re-scored
    assert candidate.values("tuned.accuracy") == [1.0, 0.0, 1.0] and candidate.values("eval_loss") is None
    assert Path(version / "scores").is_dir()


@pytest.mark.e2e
def test_the_flow_alerts_on_a_failed_stage_and_a_spent_budget(prefect_harness, tiny_model_dir, tmp_path):
    """Through the real flow: a prep failure sends `failed`; an eval that would pass
    `eval.budget_usd` stops after 3 paid requests, is not retried, and sends `budget_exceeded`."""
    import yaml

    from flows.pipeline import pipeline

    repo = Path(__file__).resolve().parents[1]
    lines = (repo / "examples" / "quickstart" / "finance_sentiment.jsonl").read_bytes().splitlines(keepends=True)
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"".join(lines[:120]))
    with Receiver() as receiver, StubServer() as stub:
        raw = yaml.safe_load((repo / "configs" / "quickstart.yaml").read_text())
        raw.update(name="alerts", base_model=str(tiny_model_dir), state_dir=str(tmp_path / "state"), output_dir=str(tmp_path / "out"),
                   max_steps=2, save_steps=2, contract={"dir": str(repo / "data_contracts")})
        raw["datasets"][0]["path"] = str(data)
        raw["eval"] = {"endpoint": "external", "base_url": stub.base_url, "model": "stub", "compare_base": False, "max_samples": 8,
                       "concurrency": 1, "labels": ["positive", "negative", "neutral"], "budget_usd": 3.5,
                       "prices": {"stub": {"output_per_million": 1_000_000}}}
        raw["notify"] = {"events": ["failed", "budget_exceeded"], "webhook": {"url": receiver.url}}
        config = tmp_path / "alerts.yaml"
        config.write_text(yaml.safe_dump(raw))

        # A row that is not JSON: quarantined, above contract.max_rejected_fraction = 0, prep fails.
        (tmp_path / "broken.jsonl").write_bytes(b"".join(lines[:40]) + b"{not json\n")
        broken = tmp_path / "broken.yaml"
        broken.write_text(yaml.safe_dump({**raw, "datasets": [{**raw["datasets"][0], "path": str(tmp_path / "broken.jsonl")}]}))
        with pytest.raises(Exception, match="max_rejected_fraction"):
            pipeline(str(broken))
        with pytest.raises(BudgetExceededError, match="eval.budget_usd=3.5 reached"):
            pipeline(str(config))
        assert stub.requests == 3  # stopped before a 4th paid request, and not retried
    assert [(body["event"], body["stage"]) for body in receiver.bodies] == [("failed", "prep"), ("budget_exceeded", "eval")]
    assert "DatasetError" in receiver.bodies[0]["reason"] and receiver.bodies[1]["run"].startswith("alerts-")
    assert receiver.bodies[1]["ui_url"].endswith(f"/runs/flow-run/{receiver.bodies[1]['flow_run_id']}")
