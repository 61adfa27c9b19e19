"""Machinery shared by the fault suite (tests/faults/) and `benchmarks/faults.py`.

- kills: a small quickstart-sized pipeline run as `loraflow run` subprocesses, SIGKILLed when a
  watched condition on its state directory becomes true, then run again; the final outputs are
  compared with an uninterrupted run's, and after every kill the visible outputs must be whole;
- bad configs: cases as data, each run through `load_config` + `preflight`;
- secrets: canary values in every secret setting, then every byte the runs left behind is searched.

Nothing is mocked: real subprocesses, real Prefect (ephemeral mode, SQLite in a temporary
PREFECT_HOME), a real OpenAI-compatible server on 127.0.0.1 (tests/eval_fault_server.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # eval_fault_server / openai_stub, as the other tests import them

from eval_fault_server import FaultServer  # noqa: E402
from openai_stub import label_for  # noqa: E402

QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
BIN = Path(sys.executable).parent
LABELS = ["positive", "negative", "neutral"]
CONFIG_NAME = "faults"


# --- the small pipeline ---------------------------------------------------------------------------


def label_responder(model: str, messages: list[dict[str, str]]) -> str:
    """The label the last user turn's headline names (right, deterministic); the base model always
    says `neutral` (so answers differ and the judge is asked); a judge says `A`."""
    if model.startswith("judge"):
        return "A"
    if model.startswith("base"):
        return "neutral"
    user_turns = [m["content"] for m in messages if m["role"] == "user"]
    return label_for(user_turns[-1]) if user_turns else ""


def eval_server(delay_s: float = 0.05, api_keys: set[str] | None = None) -> FaultServer:
    """The external eval endpoint: slow enough per request that a kill can land between answers.
    One server (one base_url) must serve the reference and the killed runs: the URL is part of
    eval's fingerprint."""
    return FaultServer(responder=label_responder, delay_s=delay_s, api_keys=api_keys)


def write_small_config(directory: Path, base_model: Path, eval_url: str, rows: int = 300, config_file: str = f"{CONFIG_NAME}.yaml",
                       **overrides: Any) -> Path:
    """The quickstart config cut down (300 rows, 12 steps, checkpoints every 3, 10 eval samples
    against an external endpoint), with state/outputs/registry under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data.jsonl"
    data.write_bytes(b"".join(QUICKSTART_DATA.read_bytes().splitlines(keepends=True)[:rows]))
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    raw.update(
        base_model=str(base_model), state_dir=str(directory / "state"), output_dir=str(directory / "outputs"),
        sequence_len=128, micro_batch_size=2, max_steps=12, save_steps=3, save_total_limit=2, logging_steps=1,
        contract={"dir": str(REPO / "data_contracts")}, retries={"eval": 0, "delay_seconds": 0},
    )
    raw["datasets"][0]["path"] = str(data)
    raw["eval"] = {
        "endpoint": "external", "base_url": eval_url, "model": "tuned", "base_model_name": "base", "max_samples": 10,
        "max_tokens": 4, "concurrency": 1, "max_retries": 1, "request_timeout": 10, "labels": LABELS,
    }
    raw["export"] = {"merge_dtype": "float32", "verify_prompts": 2, "verify_max_new_tokens": 4}
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    path = directory / config_file
    path.write_text(yaml.safe_dump(raw))
    return path


def subprocess_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("PREFECT_API_URL", None)
    return env


@contextlib.contextmanager
def prefect_server(home: Path, timeout: float = 120) -> Iterator[dict[str, str]]:
    """A Prefect server on 127.0.0.1 (SQLite under `home`); yields the environment pointing runs at
    it. One server for many runs saves each run the ephemeral server's start (seconds apiece)."""
    from tasks.serving import free_port

    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = subprocess_env(home, PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    with (home / "server.log").open("ab") as log:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api_url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"Prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}") from None
                time.sleep(0.3)
        yield {**env, "PREFECT_API_URL": api_url}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_group(server)


def start_run(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [str(BIN / "loraflow"), "run", str(config)], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_to_completion(config: Path, env: dict[str, str], log: Path, timeout: float = 400) -> int:
    process = start_run(config, env, log)
    try:
        return process.wait(timeout=timeout)
    finally:
        kill_group(process)


def kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    else:
        try:  # children (a Prefect server, a DataLoader worker) may outlive the leader
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- kill points ------------------------------------------------------------------------------------
# Each is a condition on a run directory: a matching path written by THIS process (mtime at or after
# its start), so leftovers of a killed run never count. Listed in pipeline order.

Condition = Callable[[Path, int], bool]


def _fresh(paths: Iterator[Path], since_ns: int, check: Callable[[Path], bool] = lambda p: True) -> bool:
    for path in paths:
        try:
            if path.lstat().st_mtime_ns >= since_ns and check(path):
                return True
        except FileNotFoundError:
            continue
    return False


def _state(run_dir: Path) -> Path:
    return run_dir / "state"


def _registry(run_dir: Path) -> Path:
    return run_dir / "registry" / CONFIG_NAME


def in_partial(stage: str, pattern: str, check: Callable[[Path], bool] = lambda p: True) -> Condition:
    return lambda run_dir, since: _fresh((_state(run_dir) / stage).glob(f"*.partial/{pattern}"), since, check)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def metrics_lines(at_least: int) -> Condition:
    return in_partial("train", "metrics.jsonl", lambda p: _lines(p) >= at_least)


def checkpoint(step: int, complete: bool) -> Condition:
    def check(path: Path) -> bool:
        return (path / "checkpoint_complete.json").exists() == complete and (complete or any(path.iterdir()))
    return in_partial("train", f"checkpoints/checkpoint-{step}", check)


def cache_lines(at_least: int) -> Condition:
    return lambda run_dir, since: _fresh(
        (_state(run_dir) / "response_cache").glob("*.jsonl"), since,
        lambda _: sum(_lines(p) for p in (_state(run_dir) / "response_cache").glob("*.jsonl")) >= at_least,
    )


def stage_partial(stage: str) -> Condition:
    return lambda run_dir, since: _fresh((_state(run_dir) / stage).glob("*.partial"), since)


def in_registry(pattern: str) -> Condition:
    return lambda run_dir, since: _fresh(_registry(run_dir).glob(pattern), since)


@dataclass(frozen=True)
class KillPoint:
    name: str
    stage: str
    condition: Condition


KILL_POINTS: list[KillPoint] = [
    KillPoint("prep: reading sources (quarantine file open)", "prep", in_partial("prep", "quarantine.jsonl")),
    KillPoint("prep: writing the tokenized samples file", "prep", in_partial("prep", "samples.tmp.arrow", lambda p: p.stat().st_size > 0)),
    KillPoint("prep: writing a train shard (temp name)", "prep", in_partial("prep", ".train-*.arrow.tmp")),
    KillPoint("prep: a train shard in place, val to come", "prep", in_partial("prep", "train-00000.arrow")),
    KillPoint("prep: writing val messages", "prep", in_partial("prep", "val_messages.jsonl")),
    KillPoint("prep: writing the manifest", "prep", in_partial("prep", "*manifest.json*")),
    KillPoint("train: loading model and shards", "train", in_partial("train", "checkpoints")),
    KillPoint("train: between steps 1 and 2", "train", metrics_lines(1)),
    KillPoint("train: writing checkpoint-3", "train", checkpoint(3, complete=False)),
    KillPoint("train: checkpoint-3 complete", "train", checkpoint(3, complete=True)),
    KillPoint("train: between steps 4 and 6", "train", metrics_lines(4)),
    KillPoint("train: writing checkpoint-6", "train", checkpoint(6, complete=False)),
    KillPoint("train: checkpoint-6 complete", "train", checkpoint(6, complete=True)),
    KillPoint("train: writing checkpoint-9", "train", checkpoint(9, complete=False)),
    KillPoint("train: between steps 10 and 12", "train", metrics_lines(10)),
    KillPoint("train: writing checkpoint-12", "train", checkpoint(12, complete=False)),
    KillPoint("train: saving the final adapter", "train", in_partial("train", "adapter")),
    KillPoint("train: writing the loss curve / manifest", "train", in_partial("train", "*manifest.json*")),
    KillPoint("eval: before the first answer", "eval", stage_partial("eval")),
    KillPoint("eval: 3 answers cached", "eval", cache_lines(3)),
    KillPoint("eval: 9 answers cached", "eval", cache_lines(9)),
    KillPoint("eval: 15 answers cached", "eval", cache_lines(15)),
    KillPoint("eval: writing report and manifest", "eval", in_partial("eval", "*.json*")),
    KillPoint("export: merging and verifying", "export", stage_partial("export")),
    KillPoint("export: writing the merged model", "export", in_partial("export", "model/*")),
    KillPoint("export: writing the model card", "export", in_partial("export", "model/README.md")),
    KillPoint("export: writing the manifest", "export", in_partial("export", "*manifest.json*")),
    KillPoint("registry: assembling a version", "registry", in_registry("versions/.v*.partial")),
    KillPoint("registry: version in place, pointer not yet", "registry", in_registry("versions/v0*")),
    KillPoint("registry: swapping the production pointer", "registry", in_registry(".production.*")),
    KillPoint("outputs: linking the model / run summary", "outputs", lambda run_dir, since: _fresh((run_dir / "outputs").glob("*"), since)),
]


@dataclass
class KillRecord:
    point: str
    round: int
    hit: bool
    visible_problems: list[str] = field(default_factory=list)


def kill_round(config: Path, run_dir: Path, env: dict[str, str], points: list[KillPoint], round_index: int,
               log: Path, poll_s: float = 0.02, run_timeout: float = 400) -> tuple[list[KillRecord], int]:
    """Kills a sequence of runs, each at the first of the remaining points (in pipeline order) that
    its process reaches, then lets one run finish. Points passed unobserved are not tried.
    Returns the records and the final run's exit code."""
    records: list[KillRecord] = []
    remaining = list(points)
    while remaining:
        since = time.time_ns() - 1_000_000  # mtime granularity
        process = start_run(config, env, log)
        deadline = time.monotonic() + run_timeout
        hit_index = None
        while hit_index is None and process.poll() is None and time.monotonic() < deadline:
            for index, point in enumerate(remaining):
                if point.condition(run_dir, since):
                    hit_index = index
                    break
            else:
                time.sleep(poll_s)
        kill_group(process)
        if hit_index is None:  # the run ended (or timed out) before any remaining point
            records += [KillRecord(point.name, round_index, hit=False) for point in remaining]
            return records, process.returncode
        records += [KillRecord(point.name, round_index, hit=False) for point in remaining[:hit_index]]
        records.append(KillRecord(remaining[hit_index].name, round_index, hit=True, visible_problems=visible_output_problems(run_dir)))
        remaining = remaining[hit_index + 1:]
    return records, run_to_completion(config, env, log, run_timeout)


# --- what a reader sees -----------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_files(stage: str, manifest: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(relative path, sha256 or None) of every file a manifest points readers at."""
    if stage == "prep":
        return [(s["file"], s.get("sha256")) for s in manifest["train_shards"] + manifest["val_shards"]] + [("quarantine.jsonl", None)]
    if stage == "train":
        return [(f"{manifest['adapter_dir']}/adapter_config.json", None), (f"{manifest['adapter_dir']}/adapter_model.safetensors", None),
                (manifest["metrics_file"], None)]
    if stage == "eval":
        return [(manifest["report"], None), (manifest["samples_file"], None)]
    return [(f"{manifest['model_dir']}/config.json", None), (f"{manifest['model_dir']}/README.md", None)]


def visible_output_problems(run_dir: Path) -> list[str]:
    """Everything a reader could see that is not whole: a stage directory without a manifest, a
    manifest that does not parse, names a missing file or a temporary/partial one, a file whose
    hash differs; a registry version without version.json; a dangling production or model link."""
    problems: list[str] = []
    for stage in ("prep", "train", "eval", "export"):
        for directory in sorted((_state(run_dir) / stage).glob("*")):
            if directory.name.endswith(".partial") or ".discarded-" in directory.name:
                continue
            manifest_path = directory / "manifest.json"
            try:
                manifest = json.loads(manifest_path.read_text())
            except (FileNotFoundError, ValueError) as error:
                problems.append(f"{directory}: no readable manifest ({error})")
                continue
            if ".partial" in manifest_path.read_text() or ".tmp" in json.dumps(manifest.get(f"{stage}_shards", "")):
                problems.append(f"{manifest_path}: names a partial or temporary path")
            for relative, digest in _manifest_files(stage, manifest):
                path = directory / relative
                if not path.is_file():
                    problems.append(f"{manifest_path}: lists {relative}, which is missing")
                elif digest and sha256(path) != digest:
                    problems.append(f"{manifest_path}: {relative} does not match its sha256")
    registry = _registry(run_dir)
    for version in sorted((registry / "versions").glob("v*")):
        if not (version / "version.json").is_file():
            problems.append(f"{version}: a visible version without version.json")
    for link in (registry / "production", run_dir / "outputs" / "model"):
        if link.is_symlink() and not link.resolve().is_dir():
            problems.append(f"{link}: points at nothing")
    production = registry / "production"
    if production.is_symlink() and not (production.resolve() / "version.json").is_file():
        problems.append(f"{production}: points at an incomplete version")
    summary = run_dir / "outputs" / "run_summary.json"
    if summary.exists():
        try:
            json.loads(summary.read_text())
        except ValueError as error:
            problems.append(f"{summary}: does not parse ({error})")
    return problems


# --- comparing with the uninterrupted run -----------------------------------------------------------


def _only_dir(parent: Path) -> Path:
    complete = [p for p in parent.glob("*") if p.is_dir() and not p.name.endswith(".partial") and ".discarded-" not in p.name]
    assert len(complete) == 1, f"expected one complete output in {parent}, found {[p.name for p in complete]}"
    return complete[0]


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _without_timings(value: Any) -> Any:
    timing = ("latency", "duration", "_s", "this_run", "created_at", "per_second", "decided_at", "finished_at")
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not any(t in k for t in timing)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def output_differences(run_dir: Path, reference_dir: Path) -> list[str]:
    """How the final outputs of `run_dir` differ from the uninterrupted run's (empty: identical)."""
    import torch

    differences: list[str] = []
    prep, prep_ref = _only_dir(_state(run_dir) / "prep"), _only_dir(_state(reference_dir) / "prep")
    if prep.name != prep_ref.name:
        differences.append(f"prep fingerprint {prep.name} != {prep_ref.name}")
    for shard in sorted(prep_ref.glob("*.arrow")) + [prep_ref / "quarantine.jsonl", prep_ref / "val_messages.jsonl"]:
        other = prep / shard.name
        if not other.is_file() or other.read_bytes() != shard.read_bytes():
            differences.append(f"prep {shard.name} differs")
    for stage, subdir in (("train", "adapter"), ("export", "model")):
        mine, ref = _tensors(_only_dir(_state(run_dir) / stage) / subdir), _tensors(_only_dir(_state(reference_dir) / stage) / subdir)
        if mine.keys() != ref.keys():
            differences.append(f"{stage} tensors have different names")
        differences += [f"{stage} tensor {name} differs" for name in ref if name in mine and not torch.equal(mine[name], ref[name])]
    report = json.loads((_only_dir(_state(run_dir) / "eval") / "eval_report.json").read_text())
    report_ref = json.loads((_only_dir(_state(reference_dir) / "eval") / "eval_report.json").read_text())
    if _without_timings(report) != _without_timings(report_ref):
        differences.append("eval report differs (timings left out)")
    samples = _only_dir(_state(run_dir) / "eval") / "samples.jsonl"
    if _without_timings([json.loads(x) for x in samples.read_text().splitlines()]) != _without_timings(
        [json.loads(x) for x in (_only_dir(_state(reference_dir) / "eval") / "samples.jsonl").read_text().splitlines()]
    ):
        differences.append("eval samples differ")
    versions = sorted(p.name for p in (_registry(run_dir) / "versions").glob("*"))
    if versions != ["v0001"]:
        differences.append(f"registry versions {versions}, expected [v0001]")
    production = _registry(run_dir) / "production"
    if not production.is_symlink() or production.resolve().name != "v0001":
        differences.append("production does not point at v0001")
    summary = json.loads((run_dir / "outputs" / "run_summary.json").read_text())
    summary_ref = json.loads((reference_dir / "outputs" / "run_summary.json").read_text())
    for key in ("prep", "eval"):
        if _without_timings(summary[key]) != _without_timings(summary_ref[key]):
            differences.append(f"run summary `{key}` differs")
    differences += visible_output_problems(run_dir)
    return differences


def rows_lost(run_dir: Path) -> int:
    """Rows of the source that are neither accepted nor quarantined."""
    manifest = json.loads((_only_dir(_state(run_dir) / "prep") / "manifest.json").read_text())
    quarantined = _lines(_only_dir(_state(run_dir) / "prep") / "quarantine.jsonl")
    unaccounted = manifest["rows_in"] - manifest["rows_accepted"] - manifest["rows_quarantined"]
    return unaccounted + abs(quarantined - manifest["rows_quarantined"])
