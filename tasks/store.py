"""Where stage outputs live, and how they appear there atomically.

Each stage writes into `<state_dir>/<stage>/<fingerprint>.partial/` and, when everything else is
in place, writes `manifest.json` last and renames the directory to `<fingerprint>/`. A reader only
ever looks at directories that carry a manifest, so a stage killed at any moment leaves either no
output or a complete one. The partial directory keeps its name across runs, which is what lets
training resume from its checkpoints after a crash.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.config import RunConfig

MANIFEST_NAME = "manifest.json"
STAGES = ("prep", "train", "eval", "export")


class MissingUpstreamError(RuntimeError):
    """A stage was asked to run on an upstream output that does not exist."""


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key of a stage task: the stage's content fingerprint, nothing else."""
    return f"loraflow-{context.task.name}-{parameters['fingerprint']}"


def stage_dir(cfg: RunConfig, stage: str, fingerprint: str) -> Path:
    return Path(cfg.state_dir) / stage / fingerprint


def partial_dir(final_dir: Path) -> Path:
    return final_dir.with_name(final_dir.name + ".partial")


def read_manifest(final_dir: Path) -> dict[str, Any] | None:
    """The manifest of a complete output, or None when the output is missing or incomplete."""
    try:
        return json.loads((final_dir / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return None


def require_manifest(cfg: RunConfig, stage: str, fingerprint: str) -> dict[str, Any]:
    manifest = read_manifest(stage_dir(cfg, stage, fingerprint))
    if manifest is None:
        raise MissingUpstreamError(
            f"no complete `{stage}` output for fingerprint {fingerprint[:12]} in "
            f"{stage_dir(cfg, stage, fingerprint).parent}; run `loraflow run CONFIG --from {stage}`"
        )
    return manifest


def fresh_partial_dir(final_dir: Path) -> Path:
    """An empty working directory for a stage that cannot resume (a leftover is discarded)."""
    work_dir = partial_dir(final_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    return work_dir


def write_json_atomic(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def publish(work_dir: Path, final_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Writes the manifest last, then renames the working directory into place."""
    manifest = {**manifest, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _fsync_tree(work_dir)
    write_json_atomic(work_dir / MANIFEST_NAME, manifest)
    if final_dir.exists():
        # Someone published the same fingerprint meanwhile: same inputs, same content.
        shutil.rmtree(work_dir)
        return read_manifest(final_dir) or manifest
    os.rename(work_dir, final_dir)
    return manifest


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename, so a power cut cannot publish empty files."""
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
