"""Where stage outputs live, and how they appear there.

Each stage writes into `<state_dir>/<stage>/<key>.partial/` and, when everything else is in
place, writes `manifest.json` last and renames the directory to `<key>/` (`tasks.atomic`). A
reader only ever looks at directories that carry a manifest, so a stage killed at any moment
leaves either no output or a complete one. The partial directory keeps its name across runs,
which is what lets training resume from its checkpoints after a crash.

Two runs of the same config at once never share a partial directory: the builder holds an
exclusive lock on `<state_dir>/.locks/<stage>-<key>.lock`; the second waits, then finds the first's published output.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks import atomic
from tasks.config import RunConfig
from tasks.errors import StageFailedError

MANIFEST_NAME = "manifest.json"
STAGES = ("prep", "train", "eval", "export")


class MissingUpstreamError(StageFailedError):
    """A stage was asked to run on an upstream output that does not exist."""


def stage_dir(cfg: RunConfig, stage: str, key: str) -> Path:
    return Path(cfg.state_dir) / stage / key


def output_dir(cfg: RunConfig, manifest: dict[str, Any]) -> Path:
    """The directory of a published output, from its manifest."""
    return stage_dir(cfg, manifest["stage"], manifest["fingerprint"])


def partial_dir(final_dir: Path) -> Path:
    return final_dir.with_name(final_dir.name + ".partial")


def read_manifest(final_dir: Path) -> dict[str, Any] | None:
    """The manifest of a complete output, or None when the output is missing or incomplete."""
    try:
        return json.loads((final_dir / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return None


def require_manifest(cfg: RunConfig, stage: str, key: str) -> dict[str, Any]:
    manifest = read_manifest(stage_dir(cfg, stage, key))
    if manifest is None:
        raise MissingUpstreamError(
            f"no complete `{stage}` output for key {key[:12]} in {stage_dir(cfg, stage, key).parent}; "
            f"run `loraflow run CONFIG --from {stage}`"
        )
    return manifest


def fresh_partial_dir(final_dir: Path) -> Path:
    """An empty working directory for a stage that cannot resume (a leftover is discarded)."""
    work_dir = partial_dir(final_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    return work_dir


@contextlib.contextmanager
def build_lock(final_dir: Path) -> Iterator[None]:
    """Exclusive right to build `final_dir` (blocks while another process builds it)."""
    # Outside the stage directory, which holds outputs only: <state_dir>/.locks/<stage>-<key>.lock
    locks = final_dir.parent.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with (locks / f"{final_dir.parent.name}-{final_dir.name}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish(work_dir: Path, final_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Writes the manifest last, then renames the working directory into place."""
    manifest = {**manifest, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic.write_json(work_dir / MANIFEST_NAME, manifest)
    if not atomic.publish_dir(work_dir, final_dir):
        # Someone published the same key meanwhile: same inputs, same content.
        shutil.rmtree(work_dir)
        return read_manifest(final_dir) or manifest
    return manifest
