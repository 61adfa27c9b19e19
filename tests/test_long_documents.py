"""Long documents through real prep (issue 18): 50 documents of 3 to 20 times `sequence_len` are
split at paragraph boundaries, none is lost or quarantined, and every token of every document is
trained exactly once (the label tokens in the shards are counted); chats whose last answer is too
long repeat their prompt, masked, in every fragment."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset

from tasks.chat_tokens import IGNORE_INDEX, tokenize_conversation, tokenize_segments
from tasks.config import RunConfig
from tasks.prep import build

SEQUENCE_LEN = 64
MAX_FRAGMENT_LEN = 48
OVERLAP = 8
WORDS = "revenue profit bond yield credit risk default coupon issuer rating 债券 违约 信用 风险 利润 𠀀".split()


def long_text(rng: random.Random, tokenizer: Any, times: int) -> str:
    """Paragraphs of at most 25 tokens, so every window of a fragment holds a paragraph end, until
    the text is `times` x SEQUENCE_LEN tokens long."""
    paragraphs: list[str] = []
    while len(tokenizer("\n\n".join(paragraphs))["input_ids"]) < times * SEQUENCE_LEN:
        paragraph = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        while len(tokenizer(paragraph)["input_ids"]) > 25:
            paragraph = paragraph.rsplit(" ", 1)[0]
        paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


@pytest.fixture(scope="module")
def long_documents(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> dict[str, Any]:
    rng = random.Random(18)
    directory = tmp_path_factory.mktemp("long")
    texts = [long_text(rng, tiny_tokenizer, rng.randint(3, 20)) for _ in range(50)]
    (directory / "docs.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    chats = [[{"role": "system", "content": "Analyse the bond."}, {"role": "user", "content": f"Issuer {i}"},
              {"role": "assistant", "content": long_text(rng, tiny_tokenizer, rng.randint(3, 6))}] for i in range(10)]
    (directory / "chats.jsonl").write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in chats), encoding="utf-8")
    return {"directory": directory, "texts": texts, "chats": chats}


def prep(long_documents: dict[str, Any], tiny_model_dir: Path, name: str, **settings: Any) -> tuple[dict[str, Any], list[list[dict]]]:
    directory = long_documents["directory"]
    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        datasets=[{"path": str(directory / "docs.jsonl"), "type": "completion"},
                  {"path": str(directory / "chats.jsonl"), "type": "chat_template", "field_messages": "messages"}],
        sequence_len=SEQUENCE_LEN, val_set_size=0.1, excess_length_strategy="split", state_dir=str(directory / "state"),
        **settings,
    )
    work_dir = directory / name
    work_dir.mkdir()
    manifest = build(cfg, work_dir, {})
    samples = []
    for shard in manifest["train_shards"] + manifest["val_shards"]:
        for row in Dataset.from_file(str(work_dir / shard["file"])):
            starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["input_ids"])]
            samples.extend({"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b]} for a, b in zip(starts, starts[1:]))
    return manifest, samples


@pytest.mark.parametrize("settings", [
    {"fragment_str": "\n\n", "max_fragment_len": MAX_FRAGMENT_LEN, "fragment_overlap": OVERLAP},
    {"fragment_str": "\n\n", "max_fragment_len": 30, "combine_fragment": True},
], ids=["overlap", "combine"])
def test_long_documents_are_split_not_lost_and_trained_once(long_documents, tiny_model_dir, tiny_tokenizer, settings):
    manifest, samples = prep(long_documents, tiny_model_dir, "-".join(settings) + str(len(settings)), **settings)
    texts, chats = long_documents["texts"], long_documents["chats"]

    # Nothing lost: every document accepted and split, none quarantined or truncated.
    assert (manifest["rows_in"], manifest["rows_accepted"], manifest["rows_quarantined"]) == (60, 60, 0)
    documents, conversations = manifest["sources"]
    assert (documents["documents_split"], conversations["documents_split"]) == (50, 10)
    assert documents["rows_truncated"] == conversations["rows_truncated"] == 0
    assert documents["fragments_made"] + conversations["fragments_made"] == manifest["fragments_made"] == len(samples)
    assert manifest["documents_split"] == 60
    assert manifest["val_samples"] + manifest["train_samples"] == len(samples)
    assert all(len(sample["input_ids"]) <= SEQUENCE_LEN for sample in samples)
    if settings.get("combine_fragment"):  # pieces of <= 30 tokens joined in pairs into samples of <= 64
        assert max(sum(label != IGNORE_INDEX for label in sample["labels"]) for sample in samples) > 30

    # Every token trained exactly once: the label tokens of the shards are the documents' label tokens
    # (but the first token of each, which a causal LM never predicts and packing masks).
    expected = [tokenize_segments(tiny_tokenizer, [{"text": t, "train": True}]) for t in texts]
    expected += [tokenize_conversation(tiny_tokenizer, m) for m in chats]
    wanted = sorted(label for tokens in expected for label in tokens.labels[1:] if label != IGNORE_INDEX)
    trained = sorted(label for sample in samples for label in sample["labels"] if label != IGNORE_INDEX)
    assert trained == wanted
    assert manifest["trained_tokens"] == len(wanted) + len(texts)

    # Each fragment ends at a paragraph boundary (every window holds one) unless it ends its document,
    # so no cut splits a character (the 4-byte 𠀀 is 4 tokens of the English tiny tokenizer). Only a
    # document's first piece may begin with a partial character: its untrainable first token.
    for sample in samples:
        piece = tiny_tokenizer.decode([label for label in sample["labels"] if label != IGNORE_INDEX])
        assert "\ufffd" not in piece.lstrip("\ufffd")
        assert piece.endswith("\n\n") or piece.endswith(tiny_tokenizer.eos_token), repr(piece[-20:])

    # A chat fragment repeats the prompt (system + user + assistant header), masked.
    prompt = tokenize_conversation(tiny_tokenizer, chats[0]).input_ids
    prompt = prompt[:prompt.index(tiny_tokenizer.convert_tokens_to_ids("<|im_start|>"), 1)]
    chat_fragments = [s for s in samples if s["input_ids"][:len(prompt)] == prompt]
    assert len(chat_fragments) >= 3
    assert all(set(s["labels"][:len(prompt)]) == {IGNORE_INDEX} for s in chat_fragments)

    # A split document is one eval item, not one per fragment.
    val_items = (long_documents["directory"] / ("-".join(settings) + str(len(settings))) / manifest["val_items"]).read_text().splitlines()
    assert len(val_items) == len(set(val_items)) <= 6


def test_without_split_the_same_documents_are_quarantined(long_documents, tiny_model_dir):
    directory = long_documents["directory"]
    cfg = RunConfig(base_model=str(tiny_model_dir), datasets=[{"path": str(directory / "docs.jsonl"), "type": "completion"}],
                    sequence_len=SEQUENCE_LEN, contract={"max_rejected_fraction": 1.0}, state_dir=str(directory / "state"))
    (directory / "quarantine-run").mkdir()
    with pytest.raises(Exception, match="no rows left"):
        build(cfg, directory / "quarantine-run", {})
