"""Disk space on a real size-limited filesystem (a tmpfs this test mounts; CI runs as root):

- preflight refuses a run that cannot fit where `state_dir` lives, with the numbers and the
  settings to change, and lets it through on a larger disk;
- the estimate's parts are the sizes a run really writes (checkpoint, adapter, merged model);
- a disk that fills during train fails the stage with `DiskFullError` (the path, the space),
  publishes nothing, and, once the space is freed, the next run resumes from the last complete
  checkpoint to the adapter bytes and loss curve of an uninterrupted run;
- a disk that fills during prep publishes nothing and leaves no partial output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from tasks import store
from tasks.checkpoints import COMPLETE_MARKER, is_complete
from tasks.config import ConfigError
from tasks.config_load import load_config
from tasks.disk import SMALL_FILES_BYTES, DiskFullError, describe_bytes, estimate_disk_usage, free_bytes
from tasks.preflight import preflight, run_checks, validate_config
from tasks.stage import run_stage
from tasks.stages import PREP
from tasks.train import ADAPTER
from tests.train_stage import Template, assert_same_result, build_template, new_stage, one_thread  # noqa: F401 (a fixture)

# Every training run here in one torch thread (set before the module's reference run).
pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `directory` for the block; skips the test where mounting is not permitted."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no `mount` command here: the disk-full tests need a size-limited tmpfs")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the disk-full tests need root, as in CI")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=False)


def fill_disk(ballast: Path, leave: int) -> None:
    """Writes `ballast` until only `leave` bytes are free on its filesystem."""
    size = free_bytes(ballast.parent)[1] - leave
    with ballast.open("wb") as handle:
        while size > 0:
            written = handle.write(b"\0" * min(size, 1 << 20))
            size -= written


class FillDiskAfterSave(TrainerCallback):
    """Fills the disk, all but `leave` bytes, right after the checkpoint of `step` is complete (this
    callback runs after the checkpoint keeper has written its marker)."""

    def __init__(self, step: int, ballast: Path, leave: int) -> None:
        self.step, self.ballast, self.leave = step, ballast, leave

    def on_save(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.step:
            fill_disk(self.ballast, self.leave)


@pytest.fixture(scope="module")
def template(tiny_model_dir, tmp_path_factory) -> Template:
    # 8 steps, a checkpoint every 4: the disk fills after the first.
    return build_template(tmp_path_factory.mktemp("disk-template"), tiny_model_dir, max_steps=8)


@pytest.fixture(scope="module")
def reference(template, tmp_path_factory):
    stage = new_stage(template, tmp_path_factory.mktemp("disk-reference"))
    return stage, stage.run()


def config_in(template: Template, state_dir: Path, **settings) -> Path:
    raw = yaml.safe_load(template.config_path.read_text())
    raw.update(state_dir=str(state_dir), **settings)
    path = state_dir.parent / f"run-{len(list(state_dir.parent.glob('run-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_preflight_refuses_a_run_that_cannot_fit_and_names_the_settings(template, tmp_path):
    with tmpfs(tmp_path / "small", "2M") as disk:
        # The tiny model merged in float32 alone is 4.0 MB.
        cfg = load_config(config_in(template, disk / "state"))
        with pytest.raises(ConfigError) as refused:
            preflight(cfg, "run.yaml")
        message = str(refused.value)
        _, free = free_bytes(disk)
        estimate = estimate_disk_usage(cfg, json.loads((Path(cfg.base_model) / "config.json").read_text()))
        assert f"writes about {describe_bytes(estimate.peak)} at its peak" in message
        assert f"{describe_bytes(free)} free" in message and str(disk) in message
        assert f"export {describe_bytes(estimate.export)} -> {describe_bytes(estimate.adapter)}" in message
        for setting in ("`export.adapter_only: true`", "`export.merge_dtype: bfloat16`", "`state_dir` on a disk with more than"):
            assert setting in message
        assert not (disk / "state").exists()  # refused before anything was written

        # More checkpoints kept than the disk holds: save_total_limit is named, with what it would save.
        many = load_config(config_in(template, disk / "state", save_total_limit=5, max_steps=40, export={"adapter_only": True}))
        with pytest.raises(ConfigError, match=r"`save_total_limit: 1` \(checkpoints"):
            preflight(many, "run.yaml")

    with tmpfs(tmp_path / "large", "64M") as disk:
        path = config_in(template, disk / "state")
        assert not any("state_dir" in note for note in preflight(load_config(path), "run.yaml"))
        # `loraflow validate` shows the estimate with the free space.
        validation = validate_config(path)
        assert validation.ok
        assert f"{describe_bytes(free_bytes(disk)[1])} free at {disk}" in validation.estimate_lines[-1]


def test_without_the_model_the_disk_check_is_a_note(template, tmp_path):
    cfg = load_config(config_in(template, tmp_path / "state", base_model=str(tmp_path / "no-model")))
    checks = run_checks(cfg, for_run=False)
    assert any(note.startswith("disk check skipped") for note in checks.notes)
    assert not any("state_dir" in problem for problem in checks.problems)


# A checkpoint of the tiny model is about 1.6 MB: 0.53 MB of LoRA weights (safetensors), then 1.05 MB
# of AdamW state (torch.save). With 256 kB left the weights fail (safetensors names the errno);
# with 800 kB the optimizer state does (torch.save fails with no errno: "unexpected pos").
@pytest.mark.parametrize(("leave", "raised"), [(256_000, "SafetensorError"), (800_000, "RuntimeError")],
                         ids=["weights-fail", "optimizer-state-fails"])
def test_disk_full_during_train_fails_cleanly_and_resumes_to_the_same_adapter(template, reference, tmp_path, leave, raised):
    reference_stage, reference_manifest = reference
    with tmpfs(tmp_path / "disk", "32M") as disk:
        stage = new_stage(template, disk)
        ballast = disk / "ballast.bin"
        with pytest.raises(DiskFullError) as failed:
            stage.run(callbacks=[FillDiskAfterSave(4, ballast, leave)])
        message = str(failed.value)
        assert type(failed.value.__cause__).__name__ == raised  # the write that found the disk full
        assert f"`train` ran out of disk space writing {stage.checkpoints / 'checkpoint-8'}" in message
        cfg = stage.cfg
        estimate = estimate_disk_usage(cfg, json.loads((Path(cfg.base_model) / "config.json").read_text()))
        assert f"{describe_bytes(free_bytes(disk)[1])} left on that filesystem" in message
        assert f"the `train` stage needs about {describe_bytes(estimate.stage_bytes('train'))} in all" in message
        assert "is kept: the next run, with space freed, resumes from it" in message
        assert store.read_manifest(stage.final_dir) is None and not stage.final_dir.exists()
        assert is_complete(stage.checkpoints / "checkpoint-4")
        assert not (stage.checkpoints / "checkpoint-8" / COMPLETE_MARKER).exists()

        # The estimate's checkpoint is the real one plus the allowance for its small files.
        written = sum(path.stat().st_size for path in (stage.checkpoints / "checkpoint-4").rglob("*") if path.is_file())
        assert written <= estimate.checkpoints / estimate.checkpoints_in_flight <= written + SMALL_FILES_BYTES

        ballast.unlink()  # space freed
        manifest = stage.run()

        assert manifest["resumed_from_step"] == 4 and reference_manifest["resumed_from_step"] is None
        assert_same_result(stage, reference_stage)
    # The adapter's weights are what the estimate counts for them (the rest is the allowance).
    adapter_weights = (reference_stage.final_dir / ADAPTER / "adapter_model.safetensors").stat().st_size
    assert 0.98 * adapter_weights <= estimate.adapter - SMALL_FILES_BYTES <= adapter_weights


def test_merged_export_estimate_is_the_base_model_in_the_merge_dtype(template, tiny_model_dir):
    cfg = load_config(template.config_path)
    estimate = estimate_disk_usage(cfg, json.loads((tiny_model_dir / "config.json").read_text()))
    stored = (tiny_model_dir / "model.safetensors").stat().st_size  # float32, as export.merge_dtype
    assert 0.99 * stored <= estimate.export - SMALL_FILES_BYTES <= stored  # the file adds its header


def test_disk_full_during_prep_publishes_nothing_and_leaves_no_partial(template, tmp_path):
    with tmpfs(tmp_path / "disk", "2M") as disk:
        cfg = load_config(config_in(template, disk / "state"))
        fill_disk(disk / "ballast.bin", 16_000)
        with pytest.raises(DiskFullError) as failed:
            run_stage(PREP, cfg)
        assert f"`prep` ran out of disk space writing {disk / 'state' / 'prep'}" in str(failed.value)
        assert "Nothing was published and the partial output was removed" in str(failed.value)
        prep_dir = disk / "state" / "prep"
        assert not prep_dir.exists() or not list(prep_dir.iterdir())

        os.unlink(disk / "ballast.bin")
        manifest = run_stage(PREP, cfg)
        assert store.read_manifest(store.output_dir(cfg, manifest)) is not None
        shutil.rmtree(disk / "state")


def test_what_counts_as_a_full_disk(tmp_path):
    import errno

    from tasks.disk import is_disk_full
    from tasks.errors import StageFailedError
    from tasks.launch import LaunchError

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    # A launched training process's output, quoted by the error the stage sees.
    assert is_disk_full(LaunchError("the 2 training processes failed ... OSError: [Errno 28] No space left on device"), tmp_path)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise RuntimeError("saving failed") from cause
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped, tmp_path)
    # Other failures on a disk with room are what they say they are.
    assert not is_disk_full(RuntimeError("unexpected pos 576 vs 534"), tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    assert not is_disk_full(StageFailedError("training stopped on SIGTERM"), tmp_path)
    assert not is_disk_full(ConfigError("`sequence_len`: no space left on device is not a number"), tmp_path)
