"""Three nights of retraining on the tiny model, through the real flow, with a pinned test set and
a gate that requires a significant improvement (exact McNemar at 95 %):

- night 1 trains and is promoted (no production yet);
- night 2, with more rows, gives a model within noise of production on the test set: NOT
  promoted, and the decision shows both scores on the same items with the interval;
- night 3, trained longer, is clearly better: promoted;
- with a gate that only bounds a regression (at 95 %), night 2 is promoted; with production's
  stored scores gone, production is re-scored through a local server and scores the same;
- a webhook receiver on 127.0.0.1 gets the promoted / not_promoted messages;
- test-set rows found in the training data are counted, quarantined and never trained on.
"""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
LINES = QUICKSTART_DATA.read_bytes().splitlines(keepends=True)
SIGNIFICANT_IMPROVEMENT = [{"metric": "accuracy", "min_improvement": 0.0, "confidence": 0.95}]
BOUNDED_REGRESSION = [{"metric": "accuracy", "max_regression": 0.05, "confidence": 0.95}]
OVERLAP = 10  # test-set rows that also sit in every night's training data
NIGHT_STEPS = {1: 14, 2: 14, 3: 60}


class Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        received = self.messages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def night_config(tmp_path: Path, model: Path, night: int, rows: int, promote_if: list, webhook: str, registry: Path) -> Path:
    data = tmp_path / f"night{night}.jsonl"
    data.write_bytes(b"".join(LINES[:rows]))
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    raw.update(
        name="nightly", base_model=str(model), state_dir=str(tmp_path / "state"), output_dir=str(tmp_path / f"out{night}"),
        max_steps=NIGHT_STEPS[night], save_steps=NIGHT_STEPS[night], contract={"dir": str(REPO / "data_contracts")},
    )
    raw["datasets"][0]["path"] = str(data)
    raw["eval"].update(max_samples=4, compare_base=False, concurrency=2,
                       test_set={"path": str(tmp_path / "test_set.jsonl"), "type": "chat_template", "contract": "quickstart_sentiment"})
    raw["export"].update(promote_if=promote_if, registry_dir=str(registry), verify_prompts=2)
    raw["notify"] = {"events": ["promoted", "not_promoted", "failed"], "webhook": {"url": webhook}}
    path = tmp_path / f"night{night}{'-bounded' if 'max_regression' in promote_if[0] else ''}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_three_nights_with_a_significance_gate(prefect_harness, tiny_model_dir, tmp_path):
    from flows.pipeline import pipeline
    from tasks import registry

    # The pinned test set: 90 rows never in any night's data, and 10 that are in all of them.
    (tmp_path / "test_set.jsonl").write_bytes(b"".join(LINES[:OVERLAP] + LINES[-90:]))
    receiver = Receiver()
    registry_dir = tmp_path / "registry"
    try:
        nights = {}
        for night, rows in ((1, 300), (2, 420), (3, 420)):
            config = night_config(tmp_path, tiny_model_dir, night, rows, SIGNIFICANT_IMPROVEMENT, receiver.url, registry_dir)
            nights[night] = pipeline(str(config))
    finally:
        receiver.close()

    # Test-set rows in the training data: counted, quarantined with the reason, never trained on.
    prep_summary = json.loads(next((tmp_path / "state" / "prep").glob("*/manifest.json")).read_text())
    assert prep_summary["rows_overlapping_test_set"] == OVERLAP and prep_summary["test_set"]["rows"] == OVERLAP + 90
    quarantine = [json.loads(line) for line in (next((tmp_path / "state" / "prep").glob("*/quarantine.jsonl"))).open()]
    assert sum("also in the test set" in record["reason"] for record in quarantine) == OVERLAP

    one, two, three = (nights[n]["promotion"] for n in (1, 2, 3))
    assert one["promoted"] and one["version"] == "v0001", one["reason"]
    assert not two["promoted"] and two["version"] == "v0002", two["reason"]
    assert three["promoted"] and three["version"] == "v0003" and three["production"] == "v0003", three["reason"]

    # Night 2's decision: both scores on the same 100 test-set items, the difference and its interval.
    check = two["checks"][0]
    assert check["items"] == 100 and check["items_kind"] == "test_set" and check["method"] == "mcnemar"
    assert check["low"] <= 0 <= check["high"] or check["high"] < 0, check
    assert check["difference"] == pytest.approx(check["value"] - check["production_value"], abs=1e-6)
    assert "v0001" in two["reason"] and "interval" in two["reason"]
    # Night 3 against v0001 (still production), on the same items: significantly better.
    assert three["checks"][0]["low"] > 0 and three["checks"][0]["production_value"] == check["production_value"]

    events = [(message["event"], message["metrics"].get("version")) for message in receiver.messages]
    assert events == [("promoted", "v0001"), ("not_promoted", "v0002"), ("promoted", "v0003")], receiver.messages
    message = receiver.messages[1]
    assert message["config"] == "nightly" and message["stage"] == "promote" and message["run"].startswith("night2")
    assert message["metrics"]["checks"]["accuracy"]["interval"] == check["interval"]

    # The same night 2 under a gate that only bounds a regression: promoted. The registry as it was
    # after night 1, without production's stored scores: production is re-scored on the same items.
    bounded = tmp_path / "registry-bounded"
    shutil.copytree(registry_dir, bounded, symlinks=True, ignore=shutil.ignore_patterns("v0002", "v0003"))
    for path in bounded.glob("versions/*"):
        if path.name != "v0001":
            shutil.rmtree(path)
    stored = json.loads(next((bounded / "versions" / "v0001" / "scores").glob("*.json")).read_text())["scores"]
    shutil.rmtree(bounded / "versions" / "v0001" / "scores")
    (bounded / "production").unlink()
    (bounded / "production").symlink_to(Path("versions") / "v0001")
    receiver = Receiver()
    try:
        config = night_config(tmp_path, tiny_model_dir, 2, 420, BOUNDED_REGRESSION, receiver.url, bounded)
        lenient = pipeline(str(config))
    finally:
        receiver.close()
    assert set(outcome["state"] for outcome in lenient["stages"].values()) == {"cached"}
    decision = lenient["promotion"]
    assert decision["promoted"] and decision["production"] == "v0002", decision["reason"]
    assert decision["checks"][0]["production_scores"] == "re-scored"
    rescored = json.loads(next((bounded / "versions" / "v0001" / "scores").glob("*.json")).read_text())["scores"]
    assert rescored == stored  # served from the registry, production answers exactly as it did in its own eval
    assert [m["event"] for m in receiver.messages] == ["promoted"]
    assert registry.production(bounded) == "v0002"
