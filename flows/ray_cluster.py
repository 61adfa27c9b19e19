"""The stages on a Ray cluster: `loraflow run A.yaml B.yaml --ray ADDRESS` (or a `ray:` section).

Each pipeline stays one Prefect flow run, driven from the machine that runs `loraflow run`; its
stages are submitted to prefect-ray's `RayTaskRunner`, so each stage runs as one Ray task on
whichever node has its resources (`stage_options`): prep asks for CPUs, train for as many GPUs as it
plans processes (`tasks.launch.plan_processes`: `num_processes`, or one), and Ray sets
CUDA_VISIBLE_DEVICES to the GPUs it gives. The stage contract is unchanged: the task runs
`tasks.stage.run_stage` on the worker, which reuses, builds under the key's lock and publishes
in `state_dir`.

What a user can rely on:
- `state_dir` must be on storage every node mounts at the same path (NFS, a cluster filesystem):
  it is made absolute and checked from every node before any pipeline starts; a node that cannot
  see it fails the run at once (`RayClusterError`), not a stage hours later.
- Retries: an error inside a stage gets Prefect's retries (`retries.<stage>`, `retry_unless_final`)
  on the worker; a worker or node that dies gets as many Ray re-runs (`max_retries`), on any node
  with the resources. Train resumes inside its key directory from the last complete checkpoint,
  so a re-run elsewhere continues where the lost one stopped.
- The workers import this checkout's `tasks` and `flows` (shipped with the job as `py_modules`:
  the code that keyed a stage is the code that runs it); the libraries must be installed on every
  node (the same image or virtualenv).
- The workers report to the same Prefect API as `loraflow run`: PREFECT_API_URL when set, else the
  temporary server `loraflow run` starts, which listens on 127.0.0.1 and so serves only a cluster
  whose nodes all run on this machine; otherwise the run stops before starting with the fix.
- Environment the workers get: `FORWARDED_ENV` and the names in `ray.env`, when set here.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tasks.config import RunConfig
from tasks.config_sections import RaySettings
from tasks.errors import ConfigFamilyError, ServiceError
from tasks.stage import Stage

log = logging.getLogger("loraflow.ray")

PACKAGES = [Path(__file__).resolve().parents[1] / name for name in ("tasks", "flows")]
# What a stage reads from the environment, never a secret: the model cache, offline switches, the
# Prefect API and logging. Secrets (HF_TOKEN, eval API keys) are best set on the nodes.
FORWARDED_ENV = (
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
    "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_LOGGING_EXTRA_LOGGERS", "PREFECT_LOGGING_LEVEL",
    "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM",
)
# The workers start in this directory when their node has it, so relative input paths mean there
# what they mean to `loraflow run` (on a shared filesystem).
DRIVER_CWD_ENV = "LORAFLOW_DRIVER_CWD"


class RaySettingsError(ConfigFamilyError):
    """The configs of one `loraflow run` name different Ray clusters."""


class RayClusterError(ServiceError):
    """The Ray cluster cannot run these pipelines as set up (unreachable API, state_dir not shared)."""


def on_ray(cfg: RunConfig, address: str | None = None) -> RunConfig:
    """The config as it runs on Ray: `--ray ADDRESS` over `ray.address`, `state_dir` and
    `output_dir` absolute (neither is part of any key)."""
    settings = cfg.ray or RaySettings()
    if address:
        settings = settings.model_copy(update={"address": address})
    return cfg.model_copy(update={
        "ray": settings, "state_dir": str(Path(cfg.state_dir).resolve()), "output_dir": str(Path(cfg.output_dir).resolve()),
    })


def cluster_address(cfgs: list[RunConfig]) -> str | None:
    """The one cluster every config runs on (one `ray.init` per process)."""
    addresses = {cfg.ray.address for cfg in cfgs if cfg.ray is not None}
    if len(addresses) > 1:
        raise RaySettingsError(
            f"the configs name different Ray clusters ({', '.join(sorted(map(str, addresses)))}); "
            "run them in separate `loraflow run` commands or give one `--ray ADDRESS`"
        )
    return next(iter(addresses), None)


@contextlib.contextmanager
def connected(cfgs: list[RunConfig]) -> Iterator[None]:
    """Connects this process to the cluster for the duration of the runs, with the runtime
    environment every stage needs, after checking the cluster can run them."""
    import ray

    api_url = prefect_api_url()
    extra_env = sorted({name for cfg in cfgs if cfg.ray is not None for name in cfg.ray.env})
    ray.init(address=cluster_address(cfgs), namespace="loraflow", runtime_env=runtime_env(api_url, extra_env),
             log_to_driver=True, configure_logging=False)
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        check_api_reachable(api_url, [node["NodeManagerAddress"] for node in nodes])
        check_state_dirs_shared([Path(cfg.state_dir) for cfg in cfgs], nodes)
        yield
    finally:
        ray.shutdown()


def task_runner() -> Any:
    """The flow's task runner: it finds this process connected (`connected`) and leaves the
    connection to it."""
    from prefect_ray import RayTaskRunner

    return RayTaskRunner()


def prefect_api_url() -> str:
    """The API the workers report to: PREFECT_API_URL, else this process's temporary server."""
    from prefect.settings import PREFECT_API_URL

    if url := PREFECT_API_URL.value():
        return url
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()  # started already by `loraflow run`: returns at once
    return server.api_url


def runtime_env(api_url: str, extra_env: list[str]) -> dict[str, Any]:
    environment = {name: os.environ[name] for name in (*FORWARDED_ENV, *extra_env) if name in os.environ}
    environment.update({"PREFECT_API_URL": api_url, DRIVER_CWD_ENV: os.getcwd()})
    return {"py_modules": [str(path) for path in PACKAGES], "env_vars": environment,
            "worker_process_setup_hook": "flows.ray_cluster.set_up_worker"}


def set_up_worker() -> None:
    """Runs in every Ray worker before its first stage (runtime_env's `worker_process_setup_hook`)."""
    if (driver_cwd := os.environ.get(DRIVER_CWD_ENV)) and Path(driver_cwd).is_dir():
        os.chdir(driver_cwd)
    # As flows/pipeline.py does in `loraflow run`: the stages' INFO lines reach the Prefect UI.
    logging.getLogger("loraflow").setLevel(logging.INFO)


def check_api_reachable(api_url: str, node_addresses: list[str]) -> None:
    host = urlparse(api_url).hostname or ""
    remote = [address for address in node_addresses if not _is_this_machine(address)]
    if _is_loopback(host) and remote:
        raise RayClusterError(
            f"the Prefect API the stages report to ({api_url}) listens on this machine only, but the Ray cluster has nodes "
            f"on {', '.join(sorted(set(remote)))}; start a server every node can reach (`prefect server start --host 0.0.0.0`) "
            "and `export PREFECT_API_URL=http://THIS_HOST:4200/api` before `loraflow run --ray`"
        )


def check_state_dirs_shared(state_dirs: list[Path], nodes: list[dict[str, Any]]) -> None:
    """Writes a marker into each state_dir and asks every node to read it back."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    markers = []
    for state_dir in dict.fromkeys(state_dirs):
        state_dir.mkdir(parents=True, exist_ok=True)
        marker = state_dir / f".ray-probe-{uuid.uuid4().hex}"
        marker.write_text("written by loraflow run, read by every Ray node\n")
        markers.append(marker)
    probe = ray.remote(num_cpus=0, max_retries=0)(_missing_markers)
    try:
        answers = ray.get([
            probe.options(name="state_dir probe", scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote([str(marker) for marker in markers])
            for node in nodes
        ])
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
    problems = [f"{Path(missing).parent} on node {node['NodeManagerAddress']}"
                for node, missing_list in zip(nodes, answers) for missing in missing_list]
    if problems:
        raise RayClusterError(
            f"state_dir is not visible from every Ray node ({'; '.join(problems)}): put `state_dir` on storage every node "
            "mounts at the same absolute path (NFS or a cluster filesystem), so a stage can resume or be reused on any node"
        )


def _missing_markers(markers: list[str]) -> list[str]:
    return [marker for marker in markers if not Path(marker).is_file()]


def stage_options(cfg: RunConfig, stage: Stage) -> dict[str, Any]:
    """The Ray resources and re-runs of a stage's task: train asks for one GPU per planned process
    (CPUs when the cluster trains on CPUs), the other stages for their CPUs and one GPU when they
    use an accelerator; a lost worker is re-run `retries.<stage>` times."""
    from tasks.launch import plan_processes

    assert cfg.ray is not None
    gpus = stage.uses_gpu and cluster_has_gpus(cfg.ray)
    cpus = getattr(cfg.ray.cpus, stage.name)
    options: dict[str, Any] = {"max_retries": getattr(cfg.retries, stage.name), "num_cpus": cpus, "num_gpus": 1 if gpus else 0}
    if stage.name == "train":
        processes = plan_processes(cfg).processes
        options.update(num_cpus=cpus * processes, num_gpus=processes if gpus else 0)
        if cfg.ray.resources:
            options["resources"] = {name: amount * processes for name, amount in cfg.ray.resources.items()}
    return options


def cluster_has_gpus(settings: RaySettings) -> bool:
    return settings.gpus if settings.gpus is not None else _cluster_gpus() > 0


@functools.lru_cache(maxsize=1)
def _cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0)


def run_on_cluster(task: Any, cfg: RunConfig, stage: Stage, key: str, upstream: dict[str, Any]) -> Any:
    """The stage's Prefect task submitted to the flow's RayTaskRunner; its final state."""
    from prefect.context import FlowRunContext
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options

    context = FlowRunContext.get()
    if context is None or not isinstance(context.task_runner, RayTaskRunner):
        raise RayClusterError(
            f"`{cfg.name}` has a `ray:` section but its flow was started without Ray's task runner; "
            "start it with `loraflow run CONFIG --ray ADDRESS` (or flows.batch.run_pipelines)"
        )
    options = stage_options(cfg, stage)
    log.info("%s: Ray task with %s", stage.name, ", ".join(f"{name}={value}" for name, value in options.items()))
    with remote_options(**options):
        future = task.submit(cfg, key, upstream)
    future.wait()
    return future.state


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_this_machine(address: str) -> bool:
    if _is_loopback(address):
        return True
    try:
        own = set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        own = set()
    import ray

    return address in own or address == ray.util.get_node_ip_address()
