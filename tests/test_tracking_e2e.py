"""Tracking end to end: a real MLflow tracking server (SQLite backend) and a real Prefect server,
both started here on 127.0.0.1, and W&B in offline mode.

Two quickstart-style pipeline runs (`report_to` through Axolotl's `mlflow_*` / `wandb_*` keys,
`export.registry: mlflow`): the first is logged as one MLflow run with params, the training
curve, eval metrics, cost, the decision and the model (a pyfunc that answers prompts), registered as version 1 (production); the
second trains other weights (fewer steps), becomes version 2, and `loraflow rollback` brings
version 1 back. W&B's offline run files hold the same numbers. Headless Chromium opens the
pictures artifact of the first flow run and finds the loss curve rendered.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from openai_stub import StubServer

from tasks.serving import free_port
from tests.faults.harness import prefect_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
SCREENSHOTS = REPO / "test-artifacts"
NAME = "tracked"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """`mlflow server` with a SQLite backend store and a local artifact store; stopped at the end."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    with (root / "server.log").open("ab") as log:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
             str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "MLFLOW_HOME": str(root)},
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # its uvicorn and job-consumer children too
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as env:
        yield {**env, "LORAFLOW_HOME": str(REPO)}


def write_config(directory: Path, base_model: Path, stub_url: str, mlflow_uri: str, max_steps: int) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    data = directory / "data.jsonl"
    data.write_bytes(b"".join(QUICKSTART_DATA.read_bytes().splitlines(keepends=True)[:200]))
    raw.update(
        base_model=str(base_model), state_dir=str(directory / "state"), output_dir=str(directory / "outputs" / NAME),
        max_steps=max_steps, save_steps=None, logging_steps=1, contract={"dir": str(REPO / "data_contracts")},
        # Axolotl's keys, translated to report_to + the variables the libraries read.
        mlflow_tracking_uri=mlflow_uri, mlflow_experiment_name="loraflow-e2e", wandb_project="loraflow-e2e", wandb_mode="offline",
    )
    raw.pop("schedule", None)
    raw["datasets"][0]["path"] = str(data)
    raw["eval"] = {"endpoint": "external", "base_url": stub_url, "model": "tuned", "max_samples": 10, "max_retries": 0,
                   "request_timeout": 5, "labels": ["positive", "negative", "neutral"]}
    raw["export"] = {"merge_dtype": "float32", "registry": "mlflow", "verify_prompts": 2}
    path = directory / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def loraflow(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "loraflow"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def flow_run_and_pictures(env: dict, flow_run_name_prefix: str) -> tuple[object, object]:
    """The newest flow run of the config, and its pictures artifact."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
        from prefect.client.schemas.sorting import FlowRunSort

        async with get_client() as client:
            runs = await client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=20)
            run = next(run for run in runs if run.name.startswith(flow_run_name_prefix))
            artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        return run, {artifact.key: artifact for artifact in artifacts if artifact.key}

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(read())


def test_mlflow_wandb_registry_and_pictures(mlflow_uri, prefect_env, tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    env = {**prefect_env, "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true"}
    with StubServer() as stub:
        config = write_config(tmp_path, tiny_model_dir, stub.base_url, mlflow_uri, max_steps=6)
        first = loraflow(env, "run", str(config))
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        flow_run, artifacts = flow_run_and_pictures(env, f"{NAME}-")

        # `loraflow run` says where the pictures and the tracked run are.
        summary = json.loads((tmp_path / "outputs" / NAME / "run_summary.json").read_text())
        assert f"loss curve: {summary['loss_curve']}" in first.stdout.replace("\n", "")
        assert Path(summary["pictures"]["loss_curve"]).is_file() and Path(summary["pictures"]["comparison"]).is_file()
        assert "MLflow run" in summary["tracking"]["mlflow"] and "W&B offline run" in summary["tracking"]["wandb"]

        # MLflow: one run for the pipeline run, tagged with the Prefect flow run.
        client = MlflowClient(tracking_uri=mlflow_uri)
        experiment = client.get_experiment_by_name("loraflow-e2e")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert run.data.tags["prefect.flow_run_id"] == str(flow_run.id)
        assert run.data.params["learning_rate"] == "0.002" and run.data.params["max_steps"] == "6"
        curve = client.get_metric_history(run.info.run_id, "train/loss")
        assert [point.step for point in sorted(curve, key=lambda p: p.step)] == [1, 2, 3, 4, 5, 6]
        assert len(client.get_metric_history(run.info.run_id, "train/learning_rate")) == 6
        metrics = run.data.metrics
        for name in ("eval/tuned/accuracy", "eval/cost_usd/total", "eval/tuned/latency_p50_s", "train/train_loss", "promotion/promoted"):
            assert name in metrics, sorted(metrics)
        assert metrics["promotion/promoted"] == 1.0
        assert run.data.tags["promotion.version"] == "v0001"
        assert {a.path for a in client.list_artifacts(run.info.run_id, "pictures")} == {"pictures/loss_curve.png",
                                                                                          "pictures/eval_comparison.png"}

        # The model, as a transformers model registered as version 1 (production).
        import mlflow

        mlflow.set_tracking_uri(mlflow_uri)
        assert client.get_registered_model(NAME).aliases == {"production": "1"}
        served = mlflow.pyfunc.load_model(f"models:/{NAME}@production")
        answers = served.predict(["Shares rose 5% after the earnings beat."], params={"max_new_tokens": 3})
        assert len(answers) == 1 and isinstance(answers[0], str)

        # W&B offline: the run's file holds the same numbers.
        offline = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(offline) == 1
        history, wandb_summary, wandb_config = read_wandb_run(offline[0])
        assert [row["_step"] for row in history if "train/loss" in row] == [1, 2, 3, 4, 5, 6]
        assert wandb_summary["eval/tuned/accuracy"] == metrics["eval/tuned/accuracy"]
        assert wandb_summary["promotion/promoted"] == 1.0 and wandb_summary["promotion.version"] == "v0001"
        assert wandb_config["prefect.flow_run_id"] == str(flow_run.id)
        assert wandb_config["max_steps"] == "6"

        # A second run with other weights: version 2 is promoted; rollback brings version 1 back.
        write_config(tmp_path, tiny_model_dir, stub.base_url, mlflow_uri, max_steps=4)
        second = loraflow(env, "run", str(config))
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert len(client.search_runs([experiment.experiment_id])) == 2
    assert client.get_registered_model(NAME).aliases == {"production": "2", "previous": "1"}
    models = loraflow(env, "models", "--config", str(config), "--json")
    assert models.returncode == 0, models.stderr
    listed = json.loads(models.stdout)
    assert [row["version"] for row in listed["versions"]] == ["v0001", "v0002"] and listed["production"] == "v0002"
    rolled = loraflow(env, "rollback", "--config", str(config))
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert "v0002 -> v0001" in rolled.stdout
    assert client.get_registered_model(NAME).aliases == {"production": "1"}
    assert json.loads(loraflow(env, "models", "--config", str(config), "--json").stdout)["production"] == "v0001"

    # The pictures in the Prefect UI: the artifact page shows the loss curve, rendered.
    pictures = artifacts[f"{NAME}-pictures"]
    assert "data:image/png;base64," in pictures.data
    check_picture_in_ui(prefect_env["PREFECT_API_URL"].removesuffix("/api") + f"/artifacts/artifact/{pictures.id}", tmp_path)


def read_wandb_run(path: Path) -> tuple[list[dict], dict, dict]:
    """History rows, summary and config of an offline run, read from its `.wandb` file: W&B's
    LevelDB-style log (a 7-byte `:W&B` header, 32 KiB blocks of checksum/length/type-framed chunks)
    of protobuf `Record`s. wandb 0.31 ships no Python reader for it (its core is in Go)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    history, summary, config = [], {}, {}
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind not in (1, 4):  # FIRST / MIDDLE chunks: the record goes on in the next one
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        which = record.WhichOneof("record_type")
        if which == "history":
            history.append({key(item): json.loads(item.value_json) for item in record.history.item})
        elif which == "summary":
            summary.update({key(item): json.loads(item.value_json) for item in record.summary.update})
        elif which in ("config", "run"):
            updates = record.config.update if which == "config" else record.run.config.update
            config.update({key(item): json.loads(item.value_json) for item in updates})
    return history, summary, config


def check_picture_in_ui(url: str, tmp_path: Path) -> None:
    """Headless Chromium through the DevTools protocol: loads the page, waits for the images, reads
    each <img>'s natural size, and keeps a screenshot under test-artifacts/."""
    import shutil

    from websockets.sync.client import connect

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (CI installs Debian's `chromium`); UI check skipped")
    port = free_port()
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1600",
         f"--remote-debugging-port={port}", "--remote-allow-origins=*", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                    pages = [page for page in json.load(response) if page["type"] == "page"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as socket:
            counter = iter(range(1, 10_000))

            def call(method: str, **params):
                message_id = next(counter)
                socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
                while True:
                    reply = json.loads(socket.recv(timeout=60))
                    if reply.get("id") == message_id:
                        return reply.get("result", {})

            call("Page.enable")
            call("Page.navigate", url=url)
            images = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                result = call("Runtime.evaluate", returnByValue=True, expression=(
                    "Array.from(document.images).map(i => ({src: i.src.slice(0, 40), width: i.naturalWidth, alt: i.alt}))"))
                images = result.get("result", {}).get("value") or []
                if any(image["alt"] == "loss_curve" and image["width"] > 0 for image in images):
                    break
                time.sleep(1)
            SCREENSHOTS.mkdir(exist_ok=True)
            shot = call("Page.captureScreenshot", format="png")
            (SCREENSHOTS / "pictures-artifact.png").write_bytes(base64.b64decode(shot["data"]))
    finally:
        os.killpg(browser.pid, signal.SIGTERM)
        browser.wait(timeout=30)
    loss_curve = [image for image in images if image["alt"] == "loss_curve"]
    assert loss_curve and loss_curve[0]["src"].startswith("data:image/png;base64,") and loss_curve[0]["width"] > 0, images
    assert (SCREENSHOTS / "pictures-artifact.png").stat().st_size > 10_000
