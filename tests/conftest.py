"""Shared fixtures: the tiny model and its tokenizer, built once per test session."""

from pathlib import Path
from typing import Any

import pytest

from tasks.tiny_model import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_DATA = REPO_ROOT / "examples" / "quickstart" / "finance_sentiment.jsonl"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, corpus_files=[QUICKSTART_DATA])


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def prefect_harness() -> Any:
    """One temporary Prefect server (SQLite) for every test that runs flows: starting one costs
    about 13 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
