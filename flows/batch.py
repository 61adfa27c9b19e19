"""Several fine-tunes at once: one pipeline flow run per config, at most `max_parallel` at a time.

One pipeline's failure is reported with the others' results instead of stopping them. Each job
holds its own GPUs while it trains or serves (`tasks/gpu_allocator.py`: one per training process,
waiting while other jobs hold them), so jobs on one machine never share a device. Stages that hold
an accelerator also carry the `gpu` tag, for a Prefect concurrency limit across workers. On a Ray
cluster (`ray_address`, or a config's `ray:` section), every pipeline runs at once and Ray queues
each stage until a node has its resources (flows/ray_cluster.py).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prefect import tags

from flows.pipeline import SUMMARY, checked_config, pipeline
from tasks.errors import LoraflowError


@dataclass
class PipelineOutcome:
    config: Path
    summary: dict | None
    summary_path: Path | None
    error: str | None
    # The CLI's exit code for this pipeline: the failing error's family (tasks/errors.py), 1 otherwise.
    exit_code: int = 0


def run_one(
    config: Path, only: str | None, start_from: str | None, refresh: list[str], smoke_rows: int | None = None,
    ray_address: str | None = None,
) -> PipelineOutcome:
    flow = pipeline
    if ray_address is not None or checked_config(config, on_ray=ray_address is not None).ray is not None:
        from flows.ray_cluster import task_runner

        flow = pipeline.with_options(task_runner=task_runner())
    with tags(f"config:{config.stem}", "loraflow"):
        state = flow(str(config), only=only, start_from=start_from, refresh=refresh, smoke_rows=smoke_rows, ray_address=ray_address,
                     return_state=True)
    if not state.is_completed():
        try:
            state.result()
        except LoraflowError as error:
            exit_code = error.exit_code
        except BaseException:  # noqa: BLE001 - any other failure is a failed stage
            exit_code = 1
        else:
            exit_code = 1
        return PipelineOutcome(config, None, None, f"{state.name}: {state.message}", exit_code)
    summary = state.result()
    output_dir = Path(checked_config(config, on_ray=ray_address is not None).output_dir) / ("smoke" if smoke_rows else "")
    return PipelineOutcome(config, summary, output_dir / SUMMARY, None)


def run_pipelines(
    configs: list[Path], only: str | None = None, start_from: str | None = None, refresh: list[str] | None = None, max_parallel: int = 1,
    smoke_rows: int | None = None, ray_address: str | None = None,
) -> list[PipelineOutcome]:
    refresh = refresh or []
    ray_run = ray_address is not None or any(checked_config(config).ray is not None for config in configs)
    with contextlib.ExitStack() as stack:
        if ray_run:
            from flows.ray_cluster import connected, on_ray

            cfgs = [on_ray(checked_config(config, on_ray=ray_address is not None), ray_address) for config in configs]
            stack.enter_context(connected(cfgs))
            max_parallel = len(configs)  # Ray queues the stages on the cluster's resources
        if len(configs) == 1:
            return [run_one(configs[0], only, start_from, refresh, smoke_rows, ray_address)]
        with ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="pipeline") as pool:
            futures = [pool.submit(run_one, config, only, start_from, refresh, smoke_rows, ray_address) for config in configs]
            return [future.result() for future in futures]
