"""The Chinese quickstart's inputs: the seeded generator, its contracts, and a tiny-model tokenizer
trained on the Chinese rows (one token per character, lossless on text it never saw)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from examples import make_quickstart_zh_data as generator
from tasks.config import DatasetConfig
from tasks.prep import check_contract
from tasks.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "examples" / "quickstart-zh"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generator_is_byte_identical_per_seed_and_matches_the_shipped_files(tmp_path):
    first = generator.main(["--out-dir", str(tmp_path / "a")])
    second = generator.main(["--out-dir", str(tmp_path / "b")])
    assert [_sha256(p) for p in first] == [_sha256(p) for p in second]
    assert [_sha256(p) for p in first] == [_sha256(SHIPPED / p.name) for p in first]
    other_seed = generator.main(["--out-dir", str(tmp_path / "c"), "--seed", "1"])
    assert _sha256(other_seed[0]) != _sha256(first[0])


def test_sentiment_rows_are_balanced_unique_and_in_chinese():
    rows = [json.loads(line) for line in (SHIPPED / generator.SENTIMENT_FILE).read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3000
    assert Counter(row["messages"][-1]["content"] for row in rows) == {"正面": 1000, "负面": 1000, "中性": 1000}
    assert len({row["messages"][1]["content"] for row in rows}) == 3000
    assert {row["messages"][0]["content"] for row in rows} == {generator.SYSTEM_PROMPT}


def test_analysis_answers_name_the_company_and_conclude_with_the_label():
    rows = [json.loads(line) for line in (SHIPPED / generator.ANALYSIS_FILE).read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 600
    conclusions = Counter(row["messages"][-1]["content"][-3:-1] for row in rows)
    assert conclusions == {"正面": 200, "负面": 200, "中性": 200}
    assert all(len(row["messages"][-1]["content"]) >= 25 for row in rows)
    assert all(row["messages"][-1]["content"].startswith("对") for row in rows)


@pytest.mark.parametrize(("data_file", "contract"), [
    (generator.SENTIMENT_FILE, "quickstart_zh_sentiment"), (generator.ANALYSIS_FILE, "quickstart_zh_analysis"),
])
def test_shipped_data_passes_its_contract(data_file, contract, tiny_tokenizer):
    dataset = DatasetConfig(path=str(SHIPPED / data_file), type="chat_template", field_messages="messages", contract=contract)
    summary = check_contract(dataset, REPO / "data_contracts", tiny_tokenizer)
    assert summary["passed"], summary
    assert summary["rows_rejected"] == 0


def test_the_sentiment_contract_refuses_an_english_label(tmp_path, tiny_tokenizer):
    rows = (SHIPPED / generator.SENTIMENT_FILE).read_text(encoding="utf-8").splitlines()[:20]
    rows[7] = rows[7].replace('"content": "正面"}', '"content": "positive"}').replace('"content": "负面"}', '"content": "negative"}')
    rows[7] = rows[7].replace('"content": "中性"}', '"content": "neutral"}')
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    dataset = DatasetConfig(path=str(data), type="chat_template", field_messages="messages", contract="quickstart_zh_sentiment")
    assert not check_contract(dataset, REPO / "data_contracts", tiny_tokenizer)["passed"]


@pytest.fixture(scope="module")
def zh_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    model_dir = build_tiny_model(
        tmp_path_factory.mktemp("tiny-zh") / "model",
        corpus_files=[SHIPPED / generator.SENTIMENT_FILE, SHIPPED / generator.ANALYSIS_FILE],
    )
    return AutoTokenizer.from_pretrained(model_dir)


def test_chinese_tokenizer_gives_one_token_per_character(zh_tokenizer):
    for text in ("正面", "负面", "中性", "此消息影响偏正面", "东篱酒业业绩超出预期，说明公司盈利能力持续增强。"):
        ids = zh_tokenizer(text)["input_ids"]
        assert [zh_tokenizer.decode([i]) for i in ids] == list(text), text
    # Every character of the corpus is in the vocab as a token of its own, and English still merges.
    assert len(zh_tokenizer("positive")["input_ids"]) <= 2


def test_chinese_tokenizer_is_lossless_on_unseen_text(zh_tokenizer):
    unseen = "𠀀龘 (ＡＢＣ) 该债券信用风险 – ok"
    assert zh_tokenizer.decode(zh_tokenizer(unseen)["input_ids"]) == unseen
    assert len(zh_tokenizer("该")["input_ids"]) > 1  # not in the corpus: spelled by its UTF-8 bytes


def test_chinese_rows_cost_about_as_many_tokens_as_the_english_ones(zh_tokenizer, tiny_tokenizer):
    def mean_tokens(tokenizer, path: Path) -> float:
        rows = [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()[:300]]
        encoded = [tokenizer.apply_chat_template(row, tokenize=True) for row in rows]
        return sum(len(item["input_ids"] if hasattr(item, "keys") else item) for item in encoded) / len(rows)

    chinese = mean_tokens(zh_tokenizer, SHIPPED / generator.SENTIMENT_FILE)
    english = mean_tokens(tiny_tokenizer, REPO / "examples" / "quickstart" / "finance_sentiment.jsonl")
    # Training time follows tokens: the Chinese quickstart must run in about the English one's time.
    assert chinese <= 1.1 * english, (chinese, english)
