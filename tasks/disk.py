"""Disk space: what a run will write under `state_dir`, and what a stage says when the disk fills.

Checkpoints fill disks. `estimate_disk_usage` sizes, from the config and the model's config.json
alone (the shapes and trainable-parameter arithmetic of `tasks/memory.py`), what each stage
writes; `disk_problem` compares the run's peak with the free space of the filesystem that holds
`state_dir`, so preflight refuses a run that cannot fit before it tokenizes a row. A disk that
fills anyway (another writer, a wrong estimate) surfaces as `DiskFullError` from the stage runner
(`tasks/stage.py`), which publishes nothing; training keeps its `.partial` directory, and the next
run, with space freed, resumes from the newest complete checkpoint.

What the estimate counts (decimal units, as `df -H` prints them):
- prep: the sources' bytes x `PREP_BYTES_PER_SOURCE_BYTE` (shards, val items), plus Data Docs per
  contract. The shards hold input_ids, labels and position_ids as 4-byte integers: 12 bytes a
  token, which the quickstart's 847,193 source bytes turned into 1,606,744 bytes of shards (1.90x;
  133,499 tokens) and 85,155 bytes of val items; a larger-vocabulary tokenizer makes fewer tokens
  of the same bytes, so the factor errs on the large side.
- train: while it runs, `save_total_limit` complete checkpoints plus the one being written (each
  the trainable weights and AdamW's two moments: LoRA parameters x (4 + 8) bytes), then the adapter.
- eval (`endpoint: local`): a float32 merged copy of the model for `transformers serve`, deleted
  when eval ends.
- export: the merged model (every base weight in `export.merge_dtype`), or the adapter with
  `export.adapter_only`, plus a copy per `export.quantize` format.
Stages run one after another and checkpoints and eval's copy are deleted when their stage ends,
so the peak is prep + adapter + the largest of (checkpoints, eval's copy, the export).
"""

from __future__ import annotations

import errno
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import RunConfig
from tasks.errors import ConfigFamilyError, DataFamilyError, LoraflowError, StageFailedError
from tasks.memory import GB, ModelShape, estimate_peak_memory, read_model_config

# Prep output per source byte: 1.90 measured on the quickstart (see the module docstring).
PREP_BYTES_PER_SOURCE_BYTE = 2.0
# Great Expectations' Data Docs site per validated contract: 4.18 MB measured (mostly its static assets).
DATA_DOCS_BYTES = 5_000_000
# Tokenizer files, configs, model card, scheduler/RNG/trainer state: a fixed allowance per saved model or checkpoint.
SMALL_FILES_BYTES = 1_000_000
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes per parameter of each `export.quantize` format (4-bit: packed weights plus group scales).
FORMAT_BYTES_PER_PARAM = {"gguf_f32": 4, "gguf_f16": 2, "gguf_bf16": 2, "gguf_q8_0": 34 / 32, "nf4": 0.55,
                          "gptq_w4a16": 0.56, "awq_w4a16": 0.56}
# A write that failed while fewer bytes than this were free failed for want of space. torch.save
# reports a full disk as "unexpected pos" or "iostream error", without an errno.
NEARLY_FULL_BYTES = 1_000_000
DISK_FULL_MESSAGES = ("no space left on device", "os error 28", "disk quota exceeded")


class DiskFullError(StageFailedError):
    """A stage ran out of disk space; the message names the path, the space free and needed, and
    what to change. Nothing was published; a re-run with space freed resumes."""

    # A retry would find the same full disk: the stage fails at once and says what to free.
    retryable = False


@dataclass(frozen=True)
class DiskEstimate:
    """Bytes each part of a run writes, and the peak the run holds at once."""

    prep: int
    checkpoints: int
    checkpoints_in_flight: int
    adapter: int
    eval_copy: int
    export: int
    notes: tuple[str, ...] = ()

    @property
    def peak(self) -> int:
        return self.prep + self.adapter + max(self.checkpoints, self.eval_copy, self.export)

    def stage_bytes(self, stage: str) -> int:
        """What one stage writes at most (`train`: its checkpoints, then the adapter)."""
        return {"prep": self.prep, "train": self.checkpoints + self.adapter, "eval": self.eval_copy, "export": self.export}.get(stage, 0)


def estimate_disk_usage(cfg: RunConfig, model_config: dict[str, Any]) -> DiskEstimate:
    """What a run of `cfg` writes under `state_dir`, by part, in bytes; see the module docstring."""
    notes: list[str] = []
    shape = ModelShape.from_config(model_config)
    linear_params, other_params = shape.parameter_counts()
    # One process: on disk, a checkpoint holds every shard of the optimizer state.
    memory = estimate_peak_memory(cfg, model_config)
    adapter_weights = memory["trainable"] * GB
    adapter = int(adapter_weights) + SMALL_FILES_BYTES
    checkpoint = int(adapter_weights + memory["optimizer"] * GB) + SMALL_FILES_BYTES
    in_flight = checkpoints_on_disk(cfg)
    if in_flight is None:
        notes.append(
            "disk estimate: `save_total_limit` is unset and the number of steps is not known before prep, so every "
            "checkpoint is kept and only one is counted; set save_total_limit (e.g. 2)"
        )
        in_flight = 1
    base_params = linear_params + other_params
    eval_copy = base_params * 4 + SMALL_FILES_BYTES if cfg.eval.endpoint == "local" else 0
    if cfg.export.adapter_only:
        export = adapter
    else:
        export = base_params * DTYPE_BYTES[cfg.export.merge_dtype] + SMALL_FILES_BYTES
        export += sum(math.ceil(base_params * FORMAT_BYTES_PER_PARAM[name]) for name in cfg.export.quantize)
    prep, unsized = prep_bytes(cfg)
    if unsized:
        notes.append(f"disk estimate: {', '.join(unsized)} not on this machine, so not counted in the prep estimate")
    return DiskEstimate(prep, in_flight * checkpoint, in_flight, adapter, eval_copy, export, tuple(notes))


def checkpoints_on_disk(cfg: RunConfig) -> int | None:
    """Checkpoints on disk at once: `save_total_limit` complete ones plus the one being written
    (the oldest is deleted only once the new one is complete); None when every one is kept and
    their number is not known yet."""
    if not cfg.save_steps:
        return 0
    if cfg.save_steps < 1:  # a fraction of the planned steps
        saves = math.ceil(1 / cfg.save_steps)
    elif cfg.max_steps:
        saves = math.ceil(cfg.max_steps / cfg.save_steps)
    else:
        saves = None
    if cfg.save_total_limit is None:
        return saves
    return min(cfg.save_total_limit + 1, saves) if saves is not None else cfg.save_total_limit + 1


def prep_bytes(cfg: RunConfig) -> tuple[int, list[str]]:
    """Prep's output from the bytes of the local sources (and the pinned test set); the sources
    that are not local files here (hub dataset ids) by setting name."""
    sources = [(f"datasets[{index}].path", dataset.path, dataset.contract) for index, dataset in enumerate(cfg.datasets)]
    if cfg.eval.test_set is not None:
        sources.append(("eval.test_set.path", cfg.eval.test_set.path, cfg.eval.test_set.contract))
    total, unsized = 0, []
    for setting, location, contract in sources:
        path = Path(location)
        if not path.exists():
            unsized.append(f"`{setting}`")
            continue
        size = _tree_bytes(path) if path.is_dir() else path.stat().st_size
        total += math.ceil(size * PREP_BYTES_PER_SOURCE_BYTE) + (DATA_DOCS_BYTES if contract else 0)
    return total, unsized


def free_bytes(path: Path) -> tuple[Path, int]:
    """The nearest existing directory at or above `path`, and the bytes free on its filesystem."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path, shutil.disk_usage(path).free


def describe_bytes(count: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def describe_disk(cfg: RunConfig, estimate: DiskEstimate) -> str:
    """`loraflow validate`'s line: the peak, its parts, and the free space where `state_dir` lives."""
    where, free = free_bytes(Path(cfg.state_dir))
    return (
        f"estimated disk use under state_dir: {describe_bytes(estimate.peak)} at the peak (prep {describe_bytes(estimate.prep)}, "
        f"adapter {describe_bytes(estimate.adapter)}, {estimate.checkpoints_in_flight} checkpoints {describe_bytes(estimate.checkpoints)}, "
        f"eval's merged copy {describe_bytes(estimate.eval_copy)}, export {describe_bytes(estimate.export)}); "
        f"{describe_bytes(free)} free at {where}"
    )


def disk_problem(cfg: RunConfig, estimate: DiskEstimate) -> str | None:
    """A preflight problem when the run's peak exceeds the free space where `state_dir` lives,
    with the parts, the numbers, and the settings that would make it fit."""
    where, free = free_bytes(Path(cfg.state_dir))
    if estimate.peak <= free:
        return None
    fixes = []
    if estimate.checkpoints_in_flight > 2:
        one = estimate.checkpoints // estimate.checkpoints_in_flight
        fixes.append(f"`save_total_limit: 1` (checkpoints {describe_bytes(estimate.checkpoints)} -> {describe_bytes(2 * one)})")
    if not cfg.export.adapter_only:
        fixes.append(f"`export.adapter_only: true` (export {describe_bytes(estimate.export)} -> {describe_bytes(estimate.adapter)})")
        if cfg.export.merge_dtype == "float32":
            fixes.append("`export.merge_dtype: bfloat16` (halves the merged model)")
        if cfg.export.quantize:
            fixes.append("fewer `export.quantize` formats")
    fixes.append(f"`state_dir` on a disk with more than {describe_bytes(estimate.peak)} free")
    return (
        f"`state_dir`: the run writes about {describe_bytes(estimate.peak)} at its peak but {where} has "
        f"{describe_bytes(free)} free (prep {describe_bytes(estimate.prep)}, adapter {describe_bytes(estimate.adapter)}, "
        f"then the largest of: {estimate.checkpoints_in_flight} checkpoints {describe_bytes(estimate.checkpoints)} "
        f"(save_total_limit {cfg.save_total_limit} + the one being written), eval's merged copy "
        f"{describe_bytes(estimate.eval_copy)}, export {describe_bytes(estimate.export)}); free space, or set "
        + "; ".join(fixes)
    )


def is_disk_full(error: BaseException, path: Path) -> bool:
    """Whether `error` (or an error it was raised from) came from a full disk: ENOSPC / EDQUOT, a
    library's wording of them (also in a launched process's output that `LaunchError` quotes), or a
    library's failure while the filesystem of `path` is all but full (torch.save's errors carry no
    errno). Our own errors otherwise explain themselves (bad input, SIGTERM) and are left alone."""
    if isinstance(error, (ConfigFamilyError, DataFamilyError, DiskFullError)):
        return False
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(cause).lower() for words in DISK_FULL_MESSAGES):
            return True
        cause = cause.__cause__ or cause.__context__
    return not isinstance(error, LoraflowError) and free_bytes(path)[1] < NEARLY_FULL_BYTES


def disk_full_error(cfg: RunConfig, stage: str, work_dir: Path, error: BaseException, kept: bool) -> DiskFullError:
    """The error a stage fails with when its disk fills: the file being written (the error's, else
    the directory of the newest file in the stage's directory: library errors rarely name the
    file), the space free and needed, what to change, and what the next run does. Called before a
    non-resumable stage's directory is removed."""
    newest = _newest_file(work_dir)
    written = _failed_path(error) or (newest.parent if newest else work_dir)
    _, free = free_bytes(work_dir)
    needed = ""
    model_config = read_model_config(cfg)
    if model_config is not None:
        try:
            stage_bytes = estimate_disk_usage(cfg, model_config).stage_bytes(stage)
            needed = (f"; the `{stage}` stage needs about {describe_bytes(stage_bytes)} in all "
                      f"({describe_bytes(_tree_bytes(work_dir))} in its directory now)")
        except KeyError:
            pass  # not a Llama-style config.json: no shape to estimate from
    after = (
        f"{work_dir} is kept: the next run, with space freed, resumes from it (training from its newest complete checkpoint)"
        if kept else "Nothing was published and the partial output was removed"
    )
    return DiskFullError(
        f"`{stage}` ran out of disk space writing {written}: {describe_bytes(free)} left on that filesystem{needed}. {after}. "
        f"Free space, or move `state_dir` to a larger disk; `loraflow validate` shows what the run needs (lower it with "
        f"`save_total_limit`, `export.adapter_only`). ({type(error).__name__}: {str(error)[:200]})"
    )


def _tree_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file()) if root.is_dir() else 0


def _newest_file(root: Path) -> Path | None:
    files = [path for path in root.rglob("*") if path.is_file()] if root.is_dir() else []
    return max(files, key=lambda path: path.stat().st_mtime_ns, default=None)


def _failed_path(error: BaseException) -> Path | None:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.filename:
            return Path(cause.filename)
        cause = cause.__cause__ or cause.__context__
    return None
