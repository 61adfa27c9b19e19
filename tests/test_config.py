"""The run config: did-you-mean errors, Axolotl compatibility, stage fields, and the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import STAGE_FIELDS, ConfigError, RunConfig, stage_settings
from tasks.config_load import load_config

LORAFLOW = Path(sys.executable).with_name("loraflow")
MINIMAL = "base_model: models/tiny\ndatasets:\n  - path: data/rows.jsonl\n"


def write_config(tmp_path: Path, extra: str = "", body: str = MINIMAL) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(body + extra)
    return path


def config_error(tmp_path: Path, extra: str = "", body: str = MINIMAL) -> str:
    with pytest.raises(ConfigError) as raised:
        load_config(write_config(tmp_path, extra, body))
    return str(raised.value)


def test_minimal_config_loads_with_defaults_and_file_name(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))

    assert cfg.name == "run"
    assert cfg.datasets[0].path == "data/rows.jsonl"
    assert cfg.datasets[0].field_messages == "messages"
    assert cfg.learning_rate == 2e-4


def test_misspelled_key_suggests_the_right_one(tmp_path: Path) -> None:
    message = config_error(tmp_path, "learning_rat: 2e-4\n")

    assert "`learning_rat`" in message
    assert "did you mean `learning_rate`" in message


def test_misspelled_nested_key_suggests_from_its_section(tmp_path: Path) -> None:
    message = config_error(tmp_path, "eval: {max_sample: 3}\n")

    assert "eval.max_sample" in message
    assert "did you mean `max_samples`" in message


def test_misspelled_key_in_a_dataset_entry_suggests_from_dataset_fields(tmp_path: Path) -> None:
    body = "base_model: models/tiny\ndatasets:\n  - path: data/rows.jsonl\n    feild_messages: conversation\n"

    message = config_error(tmp_path, body=body)

    assert "feild_messages" in message
    assert "did you mean `field_messages`" in message


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    message = config_error(tmp_path, "learning_rat: 2e-4\nmicro_batch_size: 0\neval: {max_sample: 3}\n")

    assert "3 problem(s)" in message
    assert all(name in message for name in ("learning_rat", "micro_batch_size", "max_sample"))


def test_unsupported_axolotl_key_is_named_as_known_but_unsupported(tmp_path: Path) -> None:
    message = config_error(tmp_path, "rl: dpo\n")

    assert "`rl` is a known Axolotl setting but" in message
    assert "not supported" in message
    assert "unknown key" not in message


def test_unsupported_key_that_is_switched_off_is_accepted(tmp_path: Path) -> None:
    # Axolotl example configs carry these disabled; they must not block running them as is.
    cfg = load_config(write_config(tmp_path, "load_in_8bit: false\nwandb_project:\n"))

    assert not cfg.load_in_4bit


def test_unsupported_key_does_not_hide_other_problems(tmp_path: Path) -> None:
    message = config_error(tmp_path, "rl: dpo\nlearning_rat: 2e-4\n")

    assert "`rl`" in message
    assert "learning_rat" in message


def test_value_of_wrong_type_names_the_setting(tmp_path: Path) -> None:
    message = config_error(tmp_path, 'learning_rate: "fast"\n')

    assert "`learning_rate`" in message
    assert "'fast'" in message


def test_zero_micro_batch_size_is_rejected(tmp_path: Path) -> None:
    message = config_error(tmp_path, "micro_batch_size: 0\n")

    assert "`micro_batch_size`" in message
    assert "greater than or equal to 1" in message


def test_missing_file_and_non_mapping_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write_config(tmp_path, body="- just\n- a list\n"))


def test_nested_lora_config_block_sets_the_flat_keys(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, "lora_config: {r: 4, target_modules: [q_proj]}\n"))

    assert cfg.lora_r == 4
    assert cfg.lora_target_modules == ["q_proj"]
    assert cfg.lora_alpha == 16  # not in the block: the flat default stays
    assert cfg.lora_config is None


def test_qlora_implies_4bit_loading(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, "adapter: qlora\n")).load_in_4bit
    assert not load_config(write_config(tmp_path, "adapter: lora\n")).load_in_4bit


def test_every_setting_belongs_to_exactly_one_stage() -> None:
    listed = [name for names in STAGE_FIELDS.values() for name in names]

    assert sorted(listed) == sorted(RunConfig.model_fields)
    assert len(listed) == len(set(listed))


def test_prep_settings_leave_out_data_and_contract_locations(tmp_path: Path) -> None:
    body = (
        "base_model: models/tiny\n"
        "datasets:\n  - {path: /data/somewhere/rows.jsonl, contract: quickstart_sentiment}\n"
        "contract: {dir: /contracts/here, max_rejected_fraction: 0.2}\n"
    )
    settings = stage_settings(load_config(write_config(tmp_path, body=body)), "prep")
    moved = stage_settings(load_config(write_config(tmp_path, body=body.replace("/data/somewhere", "/elsewhere"))), "prep")

    assert settings == moved
    assert "path" not in settings["datasets"][0]
    assert settings["datasets"][0]["contract"] == "quickstart_sentiment"
    assert settings["contract"] == {"max_rejected_fraction": 0.2}
    assert "/data/somewhere" not in json.dumps(settings)


def test_cli_validate_reports_a_misspelled_key_with_exit_code_2(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, "learning_rat: 2e-4\n")

    completed = subprocess.run([str(LORAFLOW), "validate", str(config_path)], capture_output=True, text=True, timeout=5)

    assert completed.returncode == 2
    assert "learning_rat" in completed.stderr
    assert "learning_rate" in completed.stderr


def test_cli_config_schema_prints_the_json_schema() -> None:
    completed = subprocess.run([str(LORAFLOW), "config", "schema"], capture_output=True, text=True, timeout=10)

    assert completed.returncode == 0
    schema = json.loads(completed.stdout)
    assert schema["properties"]["learning_rate"]["default"] == 2e-4
    assert "base_model" in schema["required"]
