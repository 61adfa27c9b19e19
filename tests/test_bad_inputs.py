"""The bad-input corpus of examples/bad/: every case, run through the real code, must give the reason
that examples/bad/EXPECTED.yaml lists for it, and every row must be accounted for."""

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks import store
from tasks.config import ConfigError, DatasetConfig, RunConfig
from tasks.formats import Conversation, DatasetError, Rejected, check_source, read_conversations
from tasks.preflight import preflight
from tasks.prep_chunks import tokenize_batch
from tasks.stage import run_stage, stage_key
from tasks.stages import PREP

REPO_ROOT = Path(__file__).resolve().parents[1]
BAD_DIR = REPO_ROOT / "examples" / "bad"
CASES: list[dict[str, Any]] = yaml.safe_load((BAD_DIR / "EXPECTED.yaml").read_text(encoding="utf-8"))["cases"]
ROW_CASES = [case for case in CASES if "dataset_error_contains" not in case]
DATASET_CASES = [case for case in CASES if "dataset_error_contains" in case]


def as_params(cases: list[dict[str, Any]]) -> list[Any]:
    return [
        pytest.param(case, id=case["name"], marks=[pytest.mark.xfail(reason=case["bug"], strict=True)] if "bug" in case else [])
        for case in cases
    ]


@pytest.fixture(scope="session")
def generated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("make_bad_inputs", REPO_ROOT / "examples" / "make_bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_generated(tmp_path_factory.mktemp("bad-generated"))


def case_path(case: dict[str, Any], generated_dir: Path) -> Path:
    return (generated_dir if case.get("generated") else BAD_DIR) / case["file"]


def dataset_for(case: dict[str, Any], generated_dir: Path) -> DatasetConfig:
    return DatasetConfig(path=str(case_path(case, generated_dir)), **case.get("dataset", {}))


def run_config(tmp_path: Path, base_model: Path, datasets: list[DatasetConfig], **overrides: Any) -> RunConfig:
    return RunConfig.model_validate({
        "base_model": str(base_model),
        "datasets": [dataset.model_dump() for dataset in datasets],
        "contract": {"max_rejected_fraction": 1.0},
        "state_dir": str(tmp_path / "state"),
        "output_dir": str(tmp_path / "outputs"),
        "val_set_size": 0,
        "lora_target_modules": ["q_proj", "v_proj"],
        **overrides,
    })


def prep_with_quarantine(cfg: RunConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    prep_fingerprint = stage_key(PREP, cfg, {})
    manifest = run_stage(PREP, cfg)
    quarantine_file = store.stage_dir(cfg, "prep", prep_fingerprint) / "quarantine.jsonl"
    return manifest, [json.loads(line) for line in quarantine_file.read_text(encoding="utf-8").splitlines()]


def check_quarantined(case: dict[str, Any], rejected: list[tuple[int, str]], accepted: int) -> None:
    expected = case["quarantined"]
    assert [line for line, _ in rejected] == [item["line"] for item in expected], "quarantined lines differ"
    for (line, reason), item in zip(rejected, expected):
        assert item["reason_contains"] in reason, f"line {line}: {reason!r}"
    assert accepted == case["accepted"]
    assert accepted + len(rejected) == case["rows"], "rows were lost or invented"


def test_corpus_is_complete_and_well_formed() -> None:
    assert len(CASES) >= 25
    assert len({case["name"] for case in CASES}) == len(CASES)
    for case in CASES:
        path = BAD_DIR / case["file"]
        assert case.get("generated") or case["name"] == "missing_file" or path.exists(), case["name"]
        if "dataset_error_contains" not in case:
            assert case["accepted"] + len(case["quarantined"]) == case["rows"], case["name"]
    assert sum(path.stat().st_size for path in BAD_DIR.iterdir()) < 300_000


@pytest.mark.parametrize("case", as_params(ROW_CASES))
def test_row_level_case_gives_its_reasons(case: dict[str, Any], generated_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    dataset = dataset_for(case, generated_dir)
    if "prep" in case:
        cfg = run_config(tmp_path, tiny_model_dir, [dataset], **case["prep"])
        manifest, quarantine = prep_with_quarantine(cfg)
        assert manifest["rows_in"] == manifest["rows_accepted"] + manifest["rows_quarantined"] == case["rows"]
        assert all(record["source"] == dataset.path for record in quarantine)
        check_quarantined(case, [(record["line"], record["reason"]) for record in quarantine], manifest["rows_accepted"])
        return

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = run_config(tmp_path, tiny_model_dir, [dataset])
    check_source(dataset)  # a row-level problem must not sink the whole source
    items = list(read_conversations(dataset))
    rejected = [(item.line, item.reason) for item in items if isinstance(item, Rejected)]
    assert all(item.source == dataset.path for item in items)
    accepted = [item for item in items if isinstance(item, Conversation)]
    for item in accepted:
        tokens = tokenize_batch(cfg, dataset, tokenizer, [item])[0]
        assert 0 < tokens.trained_tokens and len(tokens.input_ids) <= cfg.sequence_len, f"line {item.line} would not train"
    check_quarantined(case, rejected, len(accepted))
    accepted_lines = [item.line for item in accepted]
    assert not set(accepted_lines) & {line for line, _ in rejected}
    if "accepted_lines" in case:
        assert accepted_lines == case["accepted_lines"]


@pytest.mark.parametrize("case", as_params(DATASET_CASES))
def test_dataset_level_case_is_one_error_naming_the_file(case: dict[str, Any], generated_dir: Path, tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    dataset = dataset_for(case, generated_dir)
    found_by_check_source = case.get("found_by", "check_source") == "check_source"

    with pytest.raises(DatasetError) as raised:
        check_source(dataset)
        assert not found_by_check_source, "check_source found nothing"
        list(read_conversations(dataset))

    message = str(raised.value)
    assert Path(dataset.path).name in message
    for expected in case["dataset_error_contains"]:
        assert expected in message
    if found_by_check_source:
        with pytest.raises(ConfigError) as reported:
            preflight(run_config(tmp_path, tiny_model_dir, [dataset], val_set_size=0.1), "bad.yaml")
        assert "bad.yaml: 1 problem(s)" in str(reported.value)
        assert "`datasets[0]" in str(reported.value)
        assert case["dataset_error_contains"][0] in str(reported.value)


def test_prep_quarantine_file_has_source_line_and_reason_for_every_rejected_row(
    generated_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """All row-level cases that need no special settings, as the datasets of one prep run."""
    cases = [case for case in ROW_CASES if "prep" not in case and "bug" not in case]
    datasets = [dataset_for(case, generated_dir) for case in cases]

    manifest, quarantine = prep_with_quarantine(run_config(tmp_path, tiny_model_dir, datasets))

    assert len(manifest["sources"]) == len(cases)
    for case, source in zip(cases, manifest["sources"]):
        assert (source["rows_in"], source["rows_accepted"], source["rows_quarantined"]) == (
            case["rows"], case["accepted"], len(case["quarantined"])
        ), case["name"]
    assert manifest["rows_in"] == sum(case["rows"] for case in cases)
    assert manifest["rows_in"] == manifest["rows_accepted"] + manifest["rows_quarantined"]
    assert manifest["train_samples"] == manifest["rows_accepted"]
    assert all(set(record) == {"source", "line", "reason", "raw"} for record in quarantine)
    assert all(record["reason"] and record["raw"] for record in quarantine)
    expected = [
        (dataset.path, item["line"], item["reason_contains"]) for case, dataset in zip(cases, datasets) for item in case["quarantined"]
    ]
    assert [(record["source"], record["line"]) for record in quarantine] == [(path, line) for path, line, _ in expected]
    for record, (_, _, reason) in zip(quarantine, expected):
        assert reason in record["reason"]
