"""The tiny local model and the quickstart data: every offline test and the quickstart rest on them."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tasks.tiny_model import TinyModelError, build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]

# 4 layers x (q, k, v, o, gate/up/down, two norms) + the final norm; embeddings come on top.
NON_EMBEDDING_PARAMETERS = 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256 + 2 * 128) + 128


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _file_hashes(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = _file_hashes(build_tiny_model(tmp_path / "first", seed=3))
    second = _file_hashes(build_tiny_model(tmp_path / "elsewhere" / "second", seed=3))

    assert first == second
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(first)


def test_seed_changes_weights_not_tokenizer(tmp_path: Path) -> None:
    seed_0 = _file_hashes(build_tiny_model(tmp_path / "seed0", seed=0))
    seed_1 = _file_hashes(build_tiny_model(tmp_path / "seed1", seed=1))

    assert seed_0["model.safetensors"] != seed_1["model.safetensors"]
    assert seed_0["tokenizer.json"] == seed_1["tokenizer.json"]


def test_leftover_temp_dirs_of_dead_runs_are_removed(tmp_path: Path) -> None:
    # A pid above the kernel's pid_max cannot be alive: it stands for a killed earlier run.
    for pid in (99_999_999, os.getpid()):
        leftover = tmp_path / f".model.tmp-{pid}"
        leftover.mkdir()
        (leftover / "config.json").write_text("{half written")

    model_dir = build_tiny_model(tmp_path / "model")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]
    AutoModelForCausalLM.from_pretrained(model_dir)


def test_complete_dir_is_returned_without_rewriting(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "model")
    mtimes = {path.name: path.stat().st_mtime_ns for path in model_dir.iterdir()}

    assert build_tiny_model(model_dir, seed=7) == model_dir
    assert {path.name: path.stat().st_mtime_ns for path in model_dir.iterdir()} == mtimes


def test_incomplete_existing_dir_is_an_error(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "notes.txt").write_text("not a model")

    with pytest.raises(TinyModelError, match="not a complete tiny model"):
        build_tiny_model(model_dir)
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_loads_back_with_auto_classes(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert not model.config.tie_word_embeddings
    weights = load_file(tiny_model_dir / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert model.num_parameters() == NON_EMBEDDING_PARAMETERS + 2 * 128 * len(tokenizer)


def test_chat_template_renders_chatml(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "hi"}]

    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    token_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]

    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(token_ids) == "<|im_start|>user\nhi<|im_end|>\n"
    assert token_ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 1


def test_special_token_ids_agree_everywhere(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    generation_config = GenerationConfig.from_pretrained(tiny_model_dir)

    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert config["eos_token_id"] == generation_config.eos_token_id == tokenizer.eos_token_id
    assert config["pad_token_id"] == generation_config.pad_token_id == tokenizer.pad_token_id
    assert config["bos_token_id"] is None
    assert tokenizer.eos_token_id != tokenizer.pad_token_id


def test_corpus_files_strings_are_tokenizer_training_text(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    row = {"messages": [{"role": "user", "content": "zorblax zorblax"}], "meta": {"note": "zorblax"}}
    corpus.write_text("\n".join(json.dumps(row) for _ in range(20)) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "model", corpus_files=[corpus]))

    assert tokenizer.tokenize(" zorblax") == ["Ġzorblax"]
    assert "zorblax" not in AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "plain")).get_vocab()


def _quickstart_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_quickstart_data", REPO_ROOT / "examples" / "make_quickstart_data.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_data_is_deterministic_and_balanced(tmp_path: Path) -> None:
    script = _quickstart_script()
    first = script.main(["--rows", "300", "--out", str(tmp_path / "first.jsonl")])
    second = script.main(["--rows", "300", "--out", str(tmp_path / "second.jsonl")])

    assert first.read_bytes() == second.read_bytes()
    rows = [json.loads(line)["messages"] for line in first.read_text().splitlines()]
    assert len(rows) == 300
    assert {tuple(message["role"] for message in row) for row in rows} == {("system", "user", "assistant")}
    assert Counter(row[2]["content"] for row in rows) == {"positive": 100, "negative": 100, "neutral": 100}
    assert len({row[1]["content"] for row in rows}) == 300


def test_checked_in_quickstart_data_matches_the_script(tmp_path: Path) -> None:
    regenerated = _quickstart_script().main(["--out", str(tmp_path / "regenerated.jsonl")])

    checked_in = REPO_ROOT / "examples" / "quickstart" / "finance_sentiment.jsonl"
    assert checked_in.read_bytes() == regenerated.read_bytes()


def test_quickstart_data_seed_changes_rows(tmp_path: Path) -> None:
    script = _quickstart_script()
    seed_0 = script.main(["--rows", "30", "--seed", "0", "--out", str(tmp_path / "seed0.jsonl")])
    seed_1 = script.main(["--rows", "30", "--seed", "1", "--out", str(tmp_path / "seed1.jsonl")])

    assert seed_0.read_bytes() != seed_1.read_bytes()
