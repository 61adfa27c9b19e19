"""Safety defaults: trust_remote_code is off unless the config says so (and the run summary says
which); YAML is loaded safely; checkpoints and results are loaded with weights_only=True or
safetensors; the local Prefect server binds to 127.0.0.1 only."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from tests.faults import harness

SOURCE_DIRS = ("tasks", "flows")


def test_trust_remote_code_defaults_to_false_and_can_be_switched_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tasks.config import RunConfig

    settings = {"base_model": str(tiny_model_dir), "datasets": [{"path": "x.jsonl"}]}
    assert RunConfig.model_validate(settings).trust_remote_code is False
    assert RunConfig.model_validate({**settings, "trust_remote_code": True}).trust_remote_code is True


@pytest.mark.e2e
def test_run_summary_records_trust_remote_code(reference_run: Path) -> None:
    summary = json.loads((reference_run / "outputs" / "run_summary.json").read_text())
    assert summary["trust_remote_code"] is False


def test_yaml_python_tags_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.config import ConfigError
    from tasks.config_load import load_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load("!!python/object/apply:os.system ['touch PWNED']")
    config = tmp_path / "evil.yaml"
    config.write_text("base_model: !!python/object/apply:os.system ['touch PWNED']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config)
    assert not (tmp_path / "PWNED").exists()


def _calls(source_dirs: tuple[str, ...]) -> list[tuple[Path, ast.Call]]:
    found = []
    for directory in source_dirs:
        for path in sorted((harness.REPO / directory).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
                    found.append((path, node))
    return found


def test_no_unsafe_deserialisation_in_the_source() -> None:
    unsafe = []
    for path, call in _calls(SOURCE_DIRS):
        module, function = call.func.value.id, call.func.attr
        where = f"{path.relative_to(harness.REPO)}:{call.lineno} {module}.{function}"
        if module == "torch" and function == "load":
            weights_only = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                unsafe.append(where)
        if module == "yaml" and function in ("load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"):
            unsafe.append(where)
        if module in ("pickle", "dill", "cloudpickle") and function in ("load", "loads"):
            unsafe.append(where)
    assert unsafe == []


def test_local_prefect_server_binds_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:

    from flows import ops_cli

    command, env = ops_cli.server_command(4321)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "0.0.0.0" not in command and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_UI_API_URL"].startswith("http://127.0.0.1:4321/")
