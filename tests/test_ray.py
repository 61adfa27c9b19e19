"""End-to-end on a local Ray cluster (CPU only): a head and a second worker node on 127.0.0.1, each
a `ray start --block` process of its own, and `loraflow run ... --ray ADDRESS` as users run it.

- two quickstart-style pipelines run at once on the cluster, every stage as a Ray task, and both
  finish; a second invocation comes back cached without training;
- the Ray worker that trains is SIGKILLed after its first complete checkpoint: Ray re-runs the
  task, training resumes from that checkpoint, and the adapter is tensor for tensor the one an
  uninterrupted run of the same config (beside it, at the same time) trains.

The timings (cluster start, each invocation) are printed: `pytest -s` shows them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.serving import free_port
from tests.test_pipeline_e2e import states, write_config

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"
RAY = Path(sys.executable).parent / "ray"
LORAFLOW = Path(sys.executable).parent / "loraflow"
# Bit-equality of training holds for one number of threads; the nodes' workers inherit this.
ENVIRONMENT = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
SMALL = {"sequence_len": 256, "micro_batch_size": 2, "max_steps": 12, "save_steps": 4, "save_total_limit": 2,
         "eval_steps": None, "logging_steps": 2, "eval": {"max_samples": 4}}


@dataclass
class Cluster:
    address: str
    nodes: list[subprocess.Popen]
    directory: Path

    def sessions(self) -> set[int]:
        return {node.pid for node in self.nodes}  # each node was started as the leader of its own session


def _environment() -> dict[str, str]:
    environment = {**os.environ, **ENVIRONMENT}
    environment.pop("PREFECT_API_URL", None)  # `loraflow run` starts its own temporary server
    return environment


def _start_node(arguments: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                                                   "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    return subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1", *ports, *arguments],
                            cwd=cwd, env=_environment(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop_node(node: subprocess.Popen) -> None:
    """The node's whole session (raylet, GCS, workers), by its leader's id; never other Ray processes."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _session_members(node.pid):
            time.sleep(0.2)
    node.wait(timeout=10)


def _session_members(session: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                zombie = (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z"
                if os.getsid(int(entry.name)) == session and not zombie:
                    members.append(int(entry.name))
            except (OSError, IndexError):
                continue
    return members


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("ray")
    port = free_port()
    address = f"127.0.0.1:{port}"
    started = time.monotonic()
    head = _start_node(["--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
                        f"--ray-client-server-port={free_port()}"], directory / "head.log", directory)
    cluster = Cluster(address, [head], directory)
    try:
        _wait_for_nodes(address, 1, head, directory / "head.log")
        worker = _start_node(["--address", address, "--num-cpus", "1"], directory / "worker.log", directory)
        cluster.nodes.append(worker)
        _wait_for_nodes(address, 2, worker, directory / "worker.log")
        print(f"\nray cluster (head + worker node) up in {time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            _stop_node(node)
    assert not any(_session_members(node.pid) for node in cluster.nodes), "Ray processes outlived the test"


def _wait_for_nodes(address: str, count: int, node: subprocess.Popen, log: Path) -> None:
    probe = f"import ray; ray.init(address='{address}', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise AssertionError(f"`ray start` exited with {node.returncode}:\n{log.read_text()[-3000:]}")
        answer = subprocess.run([sys.executable, "-c", probe], env=_environment(), capture_output=True, text=True, timeout=60)
        if answer.returncode == 0 and answer.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise AssertionError(f"the Ray cluster at {address} never had {count} node(s) alive:\n{log.read_text()[-3000:]}")


def _loraflow_run(configs: list[Path], cluster: Cluster, during: threading.Thread | None = None) -> tuple[str, float]:
    started = time.monotonic()
    process = subprocess.Popen([str(LORAFLOW), "run", *map(str, configs), "--ray", cluster.address], cwd=cluster.directory,
                               env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if during is not None:
        during.start()
    try:
        output, _ = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output[-6000:]
    return output, time.monotonic() - started


def _summary(config: Path) -> dict:
    return json.loads((config.parent / "outputs" / "run_summary.json").read_text())


def _train_manifest(config: Path) -> dict:
    from tasks import store

    key = _summary(config)["stages"]["train"]["fingerprint"]
    return store.read_manifest(store.stage_dir(_cfg(config), "train", key))


def _config(directory: Path, *args, **settings) -> Path:
    directory.mkdir()
    return write_config(directory, *args, **settings)


def _data(directory: Path) -> Path:
    data = directory / "data.jsonl"
    data.write_bytes(b"".join(QUICKSTART_DATA.read_bytes().splitlines(keepends=True)[:120]))
    return data


def test_two_pipelines_run_at_once_on_ray_and_rerun_cached(ray_cluster, tiny_model_dir, tmp_path):
    data = _data(tmp_path)
    configs = [
        _config(tmp_path / name, tiny_model_dir, data, name=name, learning_rate=rate, **SMALL)
        for name, rate in (("alpha", 2e-3), ("beta", 1e-3))
    ]
    output, first_s = _loraflow_run(configs, ray_cluster)
    for config in configs:
        assert states(_summary(config)) == {"prep": "ran", "train": "ran", "eval": "ran", "export": "ran"}
        assert _summary(config)["train"]["global_step"] == 12
    # Every stage ran as a Ray task (Ray prefixes its workers' lines with the task's name) ...
    for stage in ("prep", "train", "eval", "export"):
        assert f"({stage} pid=" in output, stage
    # ... with its resources, and both pipelines were on the cluster before either's first stage finished.
    lines = output.splitlines()
    submitted = [index for index, line in enumerate(lines) if "prep: Ray task with" in line]
    finished = [index for index, line in enumerate(lines) if "loraflow.pipeline - prep: ran" in line]
    assert len(submitted) == 2 and len(finished) == 2 and max(submitted) < min(finished), "\n".join(lines[i] for i in submitted + finished)
    assert sum("train: Ray task with max_retries=0, num_cpus=1, num_gpus=0" in line for line in lines) == 2

    trained = {config: _train_manifest(config) for config in configs}
    again, cached_s = _loraflow_run(configs, ray_cluster)
    for config in configs:
        assert states(_summary(config)) == {"prep": "cached", "train": "cached", "eval": "cached", "export": "cached"}
        assert _train_manifest(config) == trained[config]  # the same published output, not trained again
    assert not re.search(r"\(train pid=\d+\).*step \d+/", again)  # no training step logged
    assert re.search(r"\(train pid=\d+\).*Finished in state Cached", again)
    print(f"\ntwo pipelines on Ray: {first_s:.1f} s; cached re-run: {cached_s:.1f} s")


def test_a_killed_ray_worker_resumes_training_to_the_same_adapter(ray_cluster, tiny_model_dir, tmp_path):
    from safetensors.numpy import load_file

    from tasks import store
    from tasks.checkpoints import COMPLETE_MARKER
    from tasks.train import ADAPTER, CHECKPOINTS

    data = _data(tmp_path)
    # No val split: eval has nothing to score and is skipped, which keeps the test short.
    settings = {**SMALL, "val_set_size": 0, "retries": {"train": 1}}
    killed, reference = (_config(tmp_path / name, tiny_model_dir, data, name=name, **settings) for name in ("killed", "reference"))
    killed_state = tmp_path / "killed" / "state" / "train"
    victims: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not victims:
            for marker in killed_state.glob(f"*.partial/{CHECKPOINTS}/checkpoint-4/{COMPLETE_MARKER}"):
                key = marker.parents[2].name.removesuffix(".partial")
                # The worker training `killed` (not `reference`, same key): it holds the build lock in killed's state_dir.
                lock = killed_state.parent / ".locks" / f"train-{key}.lock"
                for pid in _train_workers(ray_cluster):
                    if _holds_open(pid, lock):
                        os.kill(pid, signal.SIGKILL)
                        victims.append(pid)
                        break
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    output, seconds = _loraflow_run([killed, reference], ray_cluster, during=killer)
    killer.join(timeout=5)
    assert victims, "the training worker was never killed (no complete checkpoint-4 seen)"

    resumed, uninterrupted = _summary(killed), _summary(reference)
    assert states(resumed)["train"] == "ran" and resumed["train"]["global_step"] == 12
    assert resumed["train"]["resumed_from_step"] == 4, resumed["train"]
    assert uninterrupted["train"]["resumed_from_step"] in (None, 0), uninterrupted["train"]
    assert resumed["stages"]["train"]["fingerprint"] == uninterrupted["stages"]["train"]["fingerprint"]
    key = resumed["stages"]["train"]["fingerprint"]
    adapter = Path(ADAPTER) / "adapter_model.safetensors"
    tensors = load_file(store.stage_dir(_cfg(killed), "train", key) / adapter)
    expected = load_file(store.stage_dir(_cfg(reference), "train", key) / adapter)
    assert tensors.keys() == expected.keys() and tensors
    assert all((tensors[name] == expected[name]).all() for name in tensors)
    print(f"\nkill + resume on Ray (two pipelines, one killed in train): {seconds:.1f} s")


def _cfg(config: Path):
    from tasks.config_load import load_config

    return load_config(config)


def _train_workers(cluster: Cluster) -> list[int]:
    """Ray workers of this cluster running a task named `train` (Ray titles a busy worker `ray::<task>`)."""
    pids = []
    for session in cluster.sessions():
        for pid in _session_members(session):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if re.fullmatch(rb"ray::train", title):
                pids.append(pid)
    return pids


def _holds_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


# --- the pieces, without a cluster -----------------------------------------------------------------


def _ray_config(tmp_path: Path, text: str):
    from tasks.config_load import load_config

    (tmp_path / "rows.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    path = tmp_path / "run.yaml"
    path.write_text(f"base_model: models/tiny\ndatasets:\n  - path: {tmp_path / 'rows.jsonl'}\n" + text)
    return load_config(path)


def test_axolotl_ray_keys_become_the_ray_section(tmp_path):
    cfg = _ray_config(tmp_path, "use_ray: true\nray_num_workers: 4\nresources_per_worker:\n  GPU: 1\n  CPU: 2\n"
                                "  accelerator_type:A100: 0.001\nray_run_name: sft\n")
    assert cfg.ray is not None and cfg.ray.address is None and cfg.ray.gpus is True
    assert cfg.num_processes == 4 and cfg.ray.cpus.train == 2 and cfg.ray.resources == {"accelerator_type:A100": 0.001}
    assert any("`ray_num_workers`: -> num_processes: 4" in note for note in cfg.notes)
    # Off: the ray_* keys change nothing.
    off = _ray_config(tmp_path, "use_ray: false\nray_num_workers: 4\n")
    assert off.ray is None and off.num_processes is None
    from tasks.config import ConfigError

    with pytest.raises(ConfigError, match="one process per GPU"):
        _ray_config(tmp_path, "use_ray: true\nresources_per_worker:\n  GPU: 2\n")


def test_stage_resources_follow_the_process_plan(tmp_path):
    from flows.ray_cluster import on_ray, stage_options
    from tasks.gpus import GpuInfo
    from tasks.launch import plan_processes
    from tasks.stages import STAGES

    gpu_cfg = on_ray(_ray_config(tmp_path, "num_processes: 2\nretries:\n  train: 3\nray:\n  gpus: true\n  resources:\n    fast: 0.5\n"))
    # The machine that plans has 8 GPUs; the train task gets what it plans, from Ray.
    eight = [GpuInfo(index, "H100", 80.0, 9.0) for index in range(8)]
    assert plan_processes(gpu_cfg, eight).processes == 2
    assert stage_options(gpu_cfg, STAGES["train"]) == {"max_retries": 3, "num_cpus": 2, "num_gpus": 2, "resources": {"fast": 1.0}}
    assert stage_options(gpu_cfg, STAGES["prep"]) == {"max_retries": 0, "num_cpus": 1, "num_gpus": 0}
    assert stage_options(gpu_cfg, STAGES["eval"])["num_gpus"] == 1
    cpu_cfg = on_ray(_ray_config(tmp_path, "ray:\n  gpus: false\n  cpus:\n    train: 2\n"))
    assert plan_processes(cpu_cfg, eight).processes == 1
    assert stage_options(cpu_cfg, STAGES["train"]) == {"max_retries": 0, "num_cpus": 2, "num_gpus": 0}


def test_state_dir_is_made_absolute_and_one_cluster_per_run(tmp_path, monkeypatch):
    from flows.ray_cluster import RayClusterError, RaySettingsError, check_api_reachable, cluster_address, on_ray

    monkeypatch.chdir(tmp_path)
    cfg = on_ray(_ray_config(tmp_path, "state_dir: state\n"), "10.0.0.5:6379")
    assert cfg.state_dir == str(tmp_path / "state") and cfg.ray.address == "10.0.0.5:6379"
    other = on_ray(_ray_config(tmp_path, "ray:\n  address: 10.0.0.6:6379\n"))
    with pytest.raises(RaySettingsError, match="different Ray clusters"):
        cluster_address([cfg, other])
    check_api_reachable("http://127.0.0.1:4200/api", ["127.0.0.1"])  # a cluster on this machine: fine
    with pytest.raises(RayClusterError, match="PREFECT_API_URL"):
        check_api_reachable("http://127.0.0.1:4200/api", ["127.0.0.1", "10.0.0.7"])


def test_gpu_checks_wait_for_the_cluster_when_no_gpu_is_visible_here(tmp_path, tiny_model_dir):
    from tasks.config import ConfigError
    from tasks.gpus import visible_gpus
    from tasks.preflight import preflight

    if visible_gpus():
        pytest.skip("checks what a machine without a GPU says")
    cfg = _ray_config(tmp_path, "optimizer: adamw_bnb_8bit\n").model_copy(update={"base_model": str(tiny_model_dir)})
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        preflight(cfg)
    notes = preflight(cfg, gpus_elsewhere=True)
    assert any("the stages run on the Ray cluster" in note and "optimizer" in note for note in notes), notes
