"""The entry point of each launched training process: `python -m tasks.train_worker WORK_DIR`.

`accelerate launch` (started by `tasks.launch`) runs this in every process. Each trains with
`train.train_in_process`; the main process (rank 0) also writes `progress.json` for the task to
replay and, at the end, the manifest fields to `train_result.json`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from tasks import atomic
from tasks.config import RunConfig
from tasks.launch import LAUNCH_INPUTS, RUN_CONFIG_ENV, TRAIN_RESULT, die_with_parent


def main(work_dir: Path) -> None:
    die_with_parent()
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s", stream=sys.stderr)
    from tasks.progress import PROGRESS_FILE, ProgressFile
    from tasks.train import train_in_process

    cfg = RunConfig.model_validate_json(os.environ[RUN_CONFIG_ENV])
    prep_manifest = json.loads((work_dir / LAUNCH_INPUTS).read_text())["prep"]
    callbacks = [ProgressFile(work_dir / PROGRESS_FILE)] if rank == "0" else []
    result = train_in_process(cfg, work_dir, prep_manifest, callbacks)
    if result is not None:
        atomic.write_json(work_dir / TRAIN_RESULT, result)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
