"""Training progress in Prefect: the train task, run in a flow, leaves a progress artifact at 100%,
a table artifact with the whole loss curve, and log lines at `logging_steps`."""

from __future__ import annotations

import logging
from pathlib import Path

# Imported before caplog attaches its handler: Prefect configures logging when it is first imported.
import prefect  # noqa: F401
import yaml

from tasks.config_load import load_config
from tasks.stage import artifact_key, prefect_task, run_stage, stage_key
from tasks.stages import PREP, TRAIN

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"


def test_train_task_reports_progress_loss_table_and_log_lines(prefect_harness, tiny_model_dir, tmp_path, caplog):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    data = tmp_path / "data.jsonl"
    data.write_bytes(b"".join(QUICKSTART_DATA.read_bytes().splitlines(keepends=True)[:120]))
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    raw.update(
        name="Progress Check", base_model=str(tiny_model_dir), state_dir=str(tmp_path / "state"), output_dir=str(tmp_path / "out"),
        sequence_len=256, micro_batch_size=2, max_steps=12, save_steps=6, eval_steps=6, logging_steps=3,
    )
    raw["datasets"][0] = {"path": str(data), "type": "chat_template"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "run.yaml")
    prep_manifest = run_stage(PREP, cfg)
    train_key = stage_key(TRAIN, cfg, {"prep": prep_manifest})

    @flow
    def train_only() -> dict:
        # As the pipeline does for an output that is not there: a result persisted by an earlier
        # test session under the same content key must not stand in for this run.
        return prefect_task(TRAIN).with_options(refresh_cache=True)(cfg, train_key, {"prep": prep_manifest})

    with caplog.at_level(logging.INFO, logger="loraflow.train"):
        manifest = train_only()

    assert manifest["global_step"] == 12
    with get_client(sync_client=True) as client:
        def latest(what: str):
            key = artifact_key("Progress Check", what)
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            assert found, key
            return found[-1]

        assert latest("train-progress").type == "progress"
        assert float(latest("train-progress").data) == 100.0
        table = latest("loss-curve")
    assert table.type == "table"
    assert [row["step"] for row in yaml.safe_load(table.data)] == [3, 6, 9, 12]
    step_lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("step ")]
    assert [line.split()[1] for line in step_lines if "eval loss" not in line] == ["3/12", "6/12", "9/12", "12/12"]
    assert all("tokens/s" in line for line in step_lines if "eval loss" not in line)
    assert [line.split()[1] for line in step_lines if "eval loss" in line] == ["6/12", "12/12"]
