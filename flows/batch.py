"""Several fine-tunes at once: one pipeline flow run per config, at most `max_parallel` at a time.

One pipeline's failure is reported with the others' results instead of stopping them. Each job
holds its own GPUs while it trains or serves (`tasks/gpu_allocator.py`: one per training process,
waiting while other jobs hold them), so jobs on one machine never share a device. Stages that hold
an accelerator also carry the `gpu` tag, for a Prefect concurrency limit across workers.
"""

from __future__ import annotations

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


def run_one(config: Path, only: str | None, start_from: str | None, refresh: list[str], smoke_rows: int | None = None) -> PipelineOutcome:
    with tags(f"config:{config.stem}", "loraflow"):
        state = pipeline(str(config), only=only, start_from=start_from, refresh=refresh, smoke_rows=smoke_rows, return_state=True)
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
    output_dir = Path(checked_config(config).output_dir) / ("smoke" if smoke_rows else "")
    return PipelineOutcome(config, summary, output_dir / SUMMARY, None)


def run_pipelines(
    configs: list[Path], only: str | None = None, start_from: str | None = None, refresh: list[str] | None = None, max_parallel: int = 1,
    smoke_rows: int | None = None,
) -> list[PipelineOutcome]:
    refresh = refresh or []
    if len(configs) == 1:
        return [run_one(configs[0], only, start_from, refresh, smoke_rows)]
    with ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="pipeline") as pool:
        futures = [pool.submit(run_one, config, only, start_from, refresh, smoke_rows) for config in configs]
        return [future.result() for future in futures]
