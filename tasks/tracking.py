"""Experiment tracking: one MLflow run and one W&B run per pipeline run (`report_to: [mlflow, wandb]`).

What each run holds, whatever stages ran or came back cached (a cached stage's manifest is logged
again, so every pipeline run is complete on its own in the tracker):
- params: the config, flattened (`eval.max_samples`, ...), values of secret-looking names masked;
- the training curves, step by step, from the train stage's `metrics.jsonl` (train loss, learning
  rate, grad norm, tokens/s, eval loss); the Trainer's own MLflow/W&B callbacks are not used, so a
  pipeline run is one tracked run, not one per stage or per Trainer;
- eval metrics per model (`eval/tuned/accuracy`, latency p50/p95, tokens), cost, the test set's;
- the promotion decision (`promotion/promoted`, the version, the reason as a tag);
- the exported model: in MLflow a pyfunc model holding the export's files (`tasks/mlflow_model.py`:
  `mlflow.pyfunc.load_model(...).predict(prompts)`, `mlflow models serve`), in W&B a model
  artifact referencing the export directory;
- the loss curve and base-vs-tuned chart; tags with the Prefect flow run id and name.
A Prefect markdown artifact `<name>-tracking` links the runs.

Failures: an unreachable MLflow server or a missing package is a preflight error (the run fails in
seconds, naming MLFLOW_TRACKING_URI), see `preflight_problems`. If the tracker fails mid-run, the
pipeline goes on (the model matters more than its record): a warning names what was not logged,
and the run summary's `tracking` entry says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator
from importlib import util
from pathlib import Path
from typing import Any

from tasks import store
from tasks.config import RunConfig
from tasks.serving import reachable
from tasks.stages import library_versions

log = logging.getLogger("loraflow.tracking")

TRACKERS = ("mlflow", "wandb")
_SECRET_NAME = re.compile(r"key|token|secret|password|passwd|credential", re.IGNORECASE)
MASK = "***"


def trackers(cfg: RunConfig) -> list[str]:
    """The trackers this run logs to: `report_to`'s, plus MLflow when it keeps the registry."""
    names = [name for name in TRACKERS if name in cfg.report_to]
    if cfg.export.registry == "mlflow" and "mlflow" not in names:
        names.append("mlflow")
    return names


def setting(cfg: RunConfig, variable: str) -> str | None:
    """An environment variable the trackers read, from the config's `tracking_env` (Axolotl's
    `mlflow_*` / `wandb_*` keys) first, else the environment."""
    return cfg.tracking_env.get(variable) or os.environ.get(variable) or None


def preflight_problems(cfg: RunConfig) -> list[str]:
    """What stops tracking before any work: a package not installed, an MLflow server not answering,
    W&B online without credentials."""
    problems = []
    for name in trackers(cfg):
        module = "mlflow" if name == "mlflow" else "wandb"
        if util.find_spec(module) is None:
            why = "export.registry: mlflow" if name == "mlflow" and "mlflow" not in cfg.report_to else f"report_to: {name}"
            problems.append(f"`{why}` needs {name}: pip install 'loraflow[{name}]'")
    if "mlflow" in trackers(cfg):
        uri = setting(cfg, "MLFLOW_TRACKING_URI")
        if uri and urllib.parse.urlparse(uri).scheme in ("http", "https") and not reachable(uri):
            problems.append(
                f"MLFLOW_TRACKING_URI={uri} does not answer: start the tracking server (`mlflow server --host 127.0.0.1 "
                f"--port {urllib.parse.urlparse(uri).port or 5000} --backend-store-uri sqlite:///mlflow.db`) or fix "
                "MLFLOW_TRACKING_URI / `mlflow_tracking_uri`"
            )
    if "wandb" in trackers(cfg):
        mode = (setting(cfg, "WANDB_MODE") or "online").lower()
        if mode == "online" and not setting(cfg, "WANDB_API_KEY") and not (Path.home() / ".netrc").is_file():
            problems.append("`report_to: wandb` online needs WANDB_API_KEY (or `wandb login`); "
                            "WANDB_MODE=offline logs to local files that `wandb sync` uploads later")
    return problems


def run_params(cfg: RunConfig) -> dict[str, str]:
    """The config as flat `section.key` params; a value under a secret-looking name is masked
    (the config names environment variables, never holds keys, but `tracking_env` may)."""
    flat: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(inner, f"{prefix}.{key}" if prefix else str(key))
        elif value is not None:
            secret = _SECRET_NAME.search(prefix.rsplit(".", 1)[-1]) and not prefix.endswith(("_env", "_secret"))
            flat[prefix] = MASK if secret else (json.dumps(value) if isinstance(value, (list, dict)) else str(value))[:6000]

    walk(cfg.model_dump(mode="json"), "")
    return flat


def curves(cfg: RunConfig, train_manifest: dict | None) -> list[dict[str, Any]]:
    """The train stage's logged rows (step, loss, learning_rate, ..., eval_loss)."""
    if not train_manifest or not train_manifest.get("metrics_file"):
        return []
    path = store.output_dir(cfg, train_manifest) / train_manifest["metrics_file"]
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_metrics(train: dict | None, evaluation: dict | None, export: dict | None, promotion: dict | None) -> dict[str, float]:
    """The run's final numbers, flat: `train/train_loss`, `eval/tuned/accuracy`, `eval/cost_usd/total`,
    `test/tuned/accuracy`, `export/max_logit_diff`, `promotion/promoted`."""
    metrics: dict[str, float] = {}

    def add(prefix: str, values: Any) -> None:
        if isinstance(values, dict):
            for name, value in values.items():
                add(f"{prefix}/{name}", value)
        elif isinstance(values, (int, float)) and not isinstance(values, bool):
            metrics[prefix] = float(values)

    if train:
        add("train", {name: train.get(name) for name in ("train_loss", "eval_loss", "eval_perplexity", "global_step", "tokens_seen")})
    if evaluation:
        add("eval", evaluation.get("metrics", {}))
        add("eval/cost_usd", evaluation.get("cost_usd", {}))
        add("eval", {"eval_loss": evaluation.get("eval_loss"), "eval_perplexity": evaluation.get("eval_perplexity")})
        add("test", (evaluation.get("test_set") or {}).get("metrics", {}))
    if export:
        add("export", {name: export.get(name) for name in ("max_logit_diff",)})
    if promotion:
        metrics["promotion/promoted"] = float(bool(promotion["promoted"]))
    return metrics


class PipelineRun:
    """The pipeline run's record in each tracker. Every call is guarded: a tracker that fails is
    warned about once, dropped for the rest of the run, and named in `status`."""

    def __init__(self, cfg: RunConfig, flow_run_id: str, flow_run_name: str) -> None:
        self.cfg = cfg
        self.sinks: dict[str, Any] = {}
        self.status: dict[str, str] = {}
        os.environ.update(cfg.tracking_env)  # MLFLOW_TRACKING_URI, WANDB_PROJECT, ... from Axolotl's keys
        tags = {"prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": flow_run_name, "loraflow.config": cfg.name}
        for name in trackers(cfg):
            opener = _MlflowSink if name == "mlflow" else _WandbSink
            self._guard(name, "the run", lambda opener=opener, name=name: self.sinks.__setitem__(name, opener(cfg, flow_run_name, tags)))
        self.each("params", lambda sink: sink.params(run_params(cfg)))

    def _guard(self, name: str, what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except Exception as error:  # tracking never stops the pipeline; it says what is missing
            log.warning("tracking: %s could not log %s (%s: %s); the pipeline goes on without it", name, what,
                        type(error).__name__, error)
            self.sinks.pop(name, None)
            self.status[name] = f"failed logging {what}: {type(error).__name__}: {error}"
            return None

    def each(self, what: str, action: Callable[[Any], Any]) -> None:
        for name, sink in list(self.sinks.items()):
            self._guard(name, what, lambda sink=sink: action(sink))

    def log_outputs(self, train: dict | None, evaluation: dict | None, export: dict | None, promotion: dict | None,
                    pictures: dict[str, Path], stages: dict[str, dict]) -> None:
        self.each("the training curves", lambda sink: sink.curves(curves(self.cfg, train)))
        self.each("the metrics", lambda sink: sink.metrics(run_metrics(train, evaluation, export, promotion)))
        stage_tags = {f"stage.{stage}": f"{outcome['state']}: {outcome['reason']}" for stage, outcome in stages.items()}
        decision = {"promotion.version": promotion.get("version"), "promotion.reason": promotion.get("reason"),
                    "promotion.production": promotion.get("production")} if promotion else {}
        self.each("the tags", lambda sink: sink.tags({**stage_tags, **{k: str(v) for k, v in decision.items() if v is not None}}))
        self.each("the pictures", lambda sink: sink.pictures(pictures))

    def log_model(self, export_dir: Path, manifest: dict) -> str | None:
        """The export as a model in each tracker; returns MLflow's model URI (what the MLflow registry registers)."""
        self.each("the model", lambda sink: sink.model(export_dir / manifest["model_dir"], manifest.get("kind", "merged")))
        sink = self.sinks.get("mlflow")
        return sink.model_uri if sink else None

    def finish(self, failed: bool) -> dict[str, str]:
        for name, sink in list(self.sinks.items()):
            self._guard(name, "the end of the run", lambda sink=sink: sink.finish(failed))
            self.status.setdefault(name, sink.where)
        return self.status

    def links_markdown(self) -> str:
        lines = [f"# {self.cfg.name}: tracking", ""]
        lines += [f"- **{name}**: {where}" for name, where in self.status.items()]
        return "\n".join(lines) + "\n"


@contextlib.contextmanager
def pipeline_run(cfg: RunConfig, flow_run_id: str, flow_run_name: str) -> Iterator[PipelineRun | None]:
    """The tracked run around a pipeline run (None when `report_to` names no tracker); ended as
    failed if the pipeline raises. Its links become the `<name>-tracking` Prefect artifact."""
    if not trackers(cfg):
        yield None
        return
    run = PipelineRun(cfg, flow_run_id, flow_run_name)
    failed = True
    try:
        yield run
        failed = False
    finally:
        run.finish(failed)
        _links_artifact(cfg, run)


def _links_artifact(cfg: RunConfig, run: PipelineRun) -> None:
    from prefect.artifacts import create_markdown_artifact

    from tasks.stage import artifact_key

    with contextlib.suppress(Exception):  # outside a flow run (a plain function call) there is nowhere to put it
        create_markdown_artifact(markdown=run.links_markdown(), key=artifact_key(cfg.name, "tracking"),
                                 description="Where this run is tracked (MLflow, W&B)")


class _MlflowSink:
    """One MLflow run, written through the client with an explicit run id (no global active run)."""

    def __init__(self, cfg: RunConfig, run_name: str, tags: dict[str, str]) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        experiment_name = setting(cfg, "MLFLOW_EXPERIMENT_NAME") or cfg.name
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        run = self.client.create_run(experiment_id, run_name=setting(cfg, "MLFLOW_RUN_NAME") or run_name, tags=tags)
        self.run_id, self.model_uri = run.info.run_id, None
        uri = mlflow.get_tracking_uri()
        base = uri.rstrip("/") if uri.startswith("http") else uri
        self.where = (f"[MLflow run {self.run_id}]({base}/#/experiments/{experiment_id}/runs/{self.run_id})"
                      if uri.startswith("http") else f"MLflow run `{self.run_id}` in `{uri}`")

    def params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(name, value) for name, value in params.items()]
        for start in range(0, len(items), 100):  # the server takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def curves(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        stamp = _now_ms()
        points = [Metric(f"train/{name}", float(value), stamp, int(row["step"]))
                  for row in rows for name, value in row.items() if name != "step" and isinstance(value, (int, float))]
        for start in range(0, len(points), 1000):
            self.client.log_batch(self.run_id, metrics=points[start:start + 1000])

    def metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(name, value, stamp, 0) for name, value in metrics.items()])

    def tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(name, value[:5000]) for name, value in tags.items()])

    def pictures(self, pictures: dict[str, Path]) -> None:
        for path in pictures.values():
            self.client.log_artifact(self.run_id, str(path), "pictures")

    def model(self, model_dir: Path, kind: str) -> None:
        import mlflow

        if kind == "adapter":  # a PEFT adapter alone is no transformers pipeline: kept as files
            self.client.log_artifacts(self.run_id, str(model_dir), "model")
            self.model_uri = f"runs:/{self.run_id}/model"
            return
        signature = mlflow.models.infer_signature(["a prompt"], ["an answer"], params={"max_new_tokens": 64})
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(Path(__file__).with_name("mlflow_model.py")), artifacts={"model": str(model_dir)},
                signature=signature,
                pip_requirements=[f"{name}=={version}" for name, version in library_versions(("torch", "transformers")).items()
                                  if version],
            )
        self.model_uri = info.model_uri

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class _WandbSink:
    """One W&B run (online, or offline files under WANDB_DIR, default the run's output directory)."""

    def __init__(self, cfg: RunConfig, run_name: str, tags: dict[str, str]) -> None:
        import wandb

        directory = Path(os.environ.get("WANDB_DIR") or cfg.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=setting(cfg, "WANDB_PROJECT") or cfg.name, entity=setting(cfg, "WANDB_ENTITY"),
                              name=setting(cfg, "WANDB_NAME") or run_name, dir=str(directory), config=tags,
                              tags=[f"config:{cfg.name}"], notes=f"Prefect flow run {tags['prefect.flow_run_id']}",
                              reinit="create_new")
        self.where = f"[W&B run {self.run.id}]({self.run.url})" if self.run.url else f"W&B offline run in `{self.run.dir}`"

    def params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def curves(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.run.log({f"train/{name}": value for name, value in row.items() if name != "step"}, step=int(row["step"]))

    def metrics(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def tags(self, tags: dict[str, str]) -> None:
        self.run.summary.update(tags)

    def pictures(self, pictures: dict[str, Path]) -> None:
        import wandb

        if pictures:
            self.run.log({f"pictures/{name}": wandb.Image(str(path)) for name, path in pictures.items()})

    def model(self, model_dir: Path, kind: str) -> None:
        import wandb

        artifact = wandb.Artifact(f"{self.run.project}-model", type="model", metadata={"kind": kind})
        artifact.add_reference(model_dir.resolve().as_uri())  # checksums, not a copy of the weights
        self.run.log_artifact(artifact)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
