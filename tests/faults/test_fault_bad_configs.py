"""Bad configs fail in preflight, in seconds, with a message naming the setting and the fix
(cases: tests/faults/bad_configs.py); a few go through `loraflow validate` as a user would."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.faults import harness
from tests.faults.bad_configs import CASES, check_case, write_case, write_valid_config

BY_NAME = {case.name: case for case in CASES}


def test_there_are_at_least_30_distinct_cases() -> None:
    assert len(CASES) >= 30 and len(BY_NAME) == len(CASES)


def test_the_base_config_itself_passes_preflight(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tasks.config_load import load_config
    from tasks.preflight import preflight

    path = write_valid_config(tmp_path, tiny_model_dir)
    preflight(load_config(path), path)


@pytest.mark.parametrize(
    "case", [pytest.param(case, id=case.name, marks=[pytest.mark.xfail(reason=case.bug, strict=True)] if case.bug else [])
             for case in CASES],
)
def test_bad_config_fails_in_preflight_naming_the_setting(case, tiny_model_dir: Path, tmp_path: Path) -> None:
    outcome = check_case(case, tmp_path, tiny_model_dir)
    assert outcome.caught, f"{outcome.why_not}\n{outcome.message}"


def test_python_object_tag_is_never_constructed(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert check_case(BY_NAME["yaml_python_object_tag"], tmp_path, tiny_model_dir).caught
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", ["flash_attention_with_fp32", "sequence_len_above_model_max", "lora_target_module_not_in_model",
                                  "unknown_top_level_key", "api_key_env_is_a_pasted_key"])
def test_loraflow_validate_exits_2_in_seconds(name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    case = BY_NAME[name]
    path = write_case(case, tmp_path, tiny_model_dir)
    started = time.monotonic()
    result = subprocess.run([str(harness.BIN / "loraflow"), "validate", str(path)], cwd=harness.REPO, capture_output=True,
                            text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stdout + result.stderr
    assert all(text in result.stderr for text in case.expect), result.stderr
    assert not any(text in result.stdout + result.stderr for text in case.must_not_contain)
    assert elapsed < 15, f"validate took {elapsed:.1f} s"  # ~2 s idle; generous for a loaded CI runner
