"""Tracking's fast parts: preflight of the tracking server, params without secrets, the pictures.
The pipeline against a real MLflow server and W&B offline is `tests/test_tracking_e2e.py`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tasks import pictures, tracking
from tasks.config import ConfigError
from tasks.config_load import load_config
from tasks.preflight import preflight
from tasks.progress import save_loss_curve
from tasks.serving import free_port


def write_config(tmp_path: Path, tiny_model_dir: Path, **extra) -> Path:
    import yaml

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    raw = {"base_model": str(tiny_model_dir), "datasets": [{"path": str(data), "type": "chat_template"}],
           "state_dir": str(tmp_path / "state"), "output_dir": str(tmp_path / "out"), **extra}
    path = tmp_path / "tracked.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_an_unreachable_mlflow_server_fails_preflight_naming_the_variable(tmp_path, tiny_model_dir):
    closed = f"http://127.0.0.1:{free_port()}"
    path = write_config(tmp_path, tiny_model_dir, mlflow_tracking_uri=closed)
    cfg = load_config(path)
    assert cfg.report_to == ["mlflow"] and cfg.tracking_env["MLFLOW_TRACKING_URI"] == closed
    with pytest.raises(ConfigError, match=rf"MLFLOW_TRACKING_URI={closed} does not answer"):
        preflight(cfg, path)
    # The MLflow registry implies MLflow tracking, so it is checked the same way.
    registry_only = write_config(tmp_path, tiny_model_dir, export={"registry": "mlflow"}, tracking_env={"MLFLOW_TRACKING_URI": closed})
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        preflight(load_config(registry_only), registry_only)


def test_wandb_online_without_credentials_fails_preflight(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    path = write_config(tmp_path, tiny_model_dir, wandb_project="p")
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        preflight(load_config(path), path)
    offline = write_config(tmp_path, tiny_model_dir, wandb_project="p", wandb_mode="offline")
    preflight(load_config(offline), offline)


def test_params_are_flat_and_keep_secrets_out(tmp_path, tiny_model_dir):
    path = write_config(tmp_path, tiny_model_dir, report_to=["mlflow"],
                        tracking_env={"MLFLOW_TRACKING_TOKEN": "s3cr3t", "MLFLOW_EXPERIMENT_NAME": "x"})
    params = tracking.run_params(load_config(path))
    assert params["learning_rate"] == str(load_config(path).learning_rate)
    assert params["export.hub_token_env"] == "HF_TOKEN"  # the variable's name, not a token
    assert params["tracking_env.MLFLOW_TRACKING_TOKEN"] == tracking.MASK
    assert params["tracking_env.MLFLOW_EXPERIMENT_NAME"] == "x"
    assert "s3cr3t" not in json.dumps(params)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_loss_curve_with_learning_rate_and_the_comparison_chart(tmp_path):
    records = [{"step": step, "loss": 2.0 / step, "learning_rate": 1e-3 * (1 - step / 10)} for step in range(1, 10)]
    records.append({"step": 9, "eval_loss": 0.4})
    save_loss_curve(records, tmp_path / "loss.png", title="t")
    assert png_size((tmp_path / "loss.png").read_bytes()) == (700, 400)

    chart = pictures.comparison_chart({"base": {"accuracy": 0.3, "samples": 10}, "tuned": {"accuracy": 0.9, "exact_match": 0.8}})
    assert chart is not None and png_size(chart) == (600, 350)
    assert pictures.comparison_chart({"tuned": {"samples": 3}}) is None
    assert pictures.data_uri(chart).startswith("data:image/png;base64,iVBORw0KGgo")
