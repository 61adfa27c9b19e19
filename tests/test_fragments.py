"""Splitting long documents (tasks/fragments.py): pure rules pinned on hand-made token sequences
(one token per character unless a test spells a character with several byte tokens), then the
offsets of real tokenized rows."""

from __future__ import annotations

import random

import pytest

from tasks.chat_tokens import IGNORE_INDEX, tokenize_conversation, tokenize_segments
from tasks.fragments import (
    FragmentError,
    FragmentSettings,
    character_safe,
    context_length,
    split_row,
    split_tokens,
    token_offsets,
)

M = IGNORE_INDEX


def chars(text: str, trained_from: int = 0) -> tuple[list[int], list[int], list[int], str]:
    """One token per character; tokens before `trained_from` are context (masked)."""
    ids = [ord(c) for c in text]
    labels = [M] * trained_from + ids[trained_from:]
    return ids, labels, list(range(len(text))), text


def pieces(fragments, text_of=lambda ids: "".join(map(chr, ids))) -> list[str]:
    """The trained text of each fragment."""
    return [text_of([label for label in fragment.labels if label != M]) for fragment in fragments]


def test_context_is_everything_before_the_last_trained_stretch():
    assert context_length([M, M, 5, 6, M]) == 2
    assert context_length([M, 1, M, 2, 3, M]) == 3
    assert context_length([1, 2, 3]) == 0
    assert context_length([M, M]) == 0


def test_a_fragment_ends_at_fragment_str_when_one_lies_in_range():
    ids, labels, starts, text = chars("aaaa\n\nbbbb\n\ncccc")
    fragments = split_tokens(ids, labels, starts, text, FragmentSettings(sequence_len=8, fragment_str="\n\n"))
    # Budget 8, then 7 after the masked token repeated in front: the last boundary in range is after
    # "aaaa\n\n" (6), then after "bbbb\n\n" (12).
    assert pieces(fragments) == ["aaaa\n\n", "bbbb\n\n", "cccc"]
    assert fragments[1].input_ids[0] == ord("\n") and fragments[1].labels[0] == M


def test_a_stretch_without_boundary_is_cut_at_the_limit():
    ids, labels, starts, text = chars("abcdefghij")
    fragments = split_tokens(ids, labels, starts, text, FragmentSettings(sequence_len=4, fragment_str="\n\n"))
    # After the first, a fragment starts one token early (masked): a sample's first token is never predicted.
    assert ["".join(map(chr, f.input_ids)) for f in fragments] == ["abcd", "defg", "ghij"]
    assert pieces(fragments) == ["abcd", "efg", "hij"]
    # max_fragment_len below sequence_len bounds the pieces.
    fragments = split_tokens(ids, labels, starts, text, FragmentSettings(sequence_len=8, max_fragment_len=3))
    assert pieces(fragments) == ["abc", "de", "fg", "hi", "j"]


def test_never_cuts_between_the_byte_tokens_of_one_character():
    # "ab" then a character spelled by 3 byte tokens (all starting at character 2), then "cd".
    ids = [97, 98, 1001, 1002, 1003, 99, 100]
    starts = [0, 1, 2, 2, 2, 3, 4]
    text = "ab\U00020000cd"
    assert [character_safe(starts, p) for p in range(1, 7)] == [True, True, False, False, True, True]
    fragments = split_tokens(ids, list(ids), starts, text, FragmentSettings(sequence_len=4))
    # The limit (4) falls inside the character: the cut moves back to before it. Later fragments
    # start one token early (masked).
    assert [f.input_ids for f in fragments] == [[97, 98], [98, 1001, 1002, 1003], [1003, 99, 100]]
    assert pieces(fragments, list) == [[97, 98], [1001, 1002, 1003], [99, 100]]


def test_overlap_is_context_with_labels_masked():
    ids, labels, starts, text = chars("abcdefghij")
    fragments = split_tokens(ids, labels, starts, text, FragmentSettings(sequence_len=6, overlap=2))
    assert ["".join(map(chr, f.input_ids)) for f in fragments] == ["abcdef", "efghij"]
    assert fragments[1].labels == [M, M] + [ord(c) for c in "ghij"]
    assert sum(f.trained_tokens for f in fragments) == 10


def test_chat_context_is_repeated_and_trained_once():
    # 2 prompt tokens ("PQ"), an earlier trained answer ("r"), a prompt token ("S"), then the long answer.
    text = "PQrSabcdefgh"
    ids = [ord(c) for c in text]
    labels = [M, M, ord("r"), M] + ids[4:]
    fragments = split_tokens(ids, labels, list(range(len(text))), text, FragmentSettings(sequence_len=7))
    assert ["".join(map(chr, f.input_ids)) for f in fragments] == ["PQrSabc", "PQrSdef", "PQrSgh"]
    assert pieces(fragments) == ["rabc", "def", "gh"]  # the earlier answer trains in the first fragment only
    with pytest.raises(FragmentError, match="4 tokens of context"):
        split_tokens(ids, labels, list(range(len(text))), text, FragmentSettings(sequence_len=4))
    with pytest.raises(FragmentError, match="fragment_overlap"):
        split_tokens(ids, labels, list(range(len(text))), text, FragmentSettings(sequence_len=7, overlap=3))


def test_combine_joins_consecutive_fragments_that_fit():
    ids, labels, starts, text = chars("PQabcdefghi", trained_from=2)
    settings = FragmentSettings(sequence_len=8, max_fragment_len=3)
    assert pieces(split_tokens(ids, labels, starts, text, settings)) == ["abc", "def", "ghi"]
    combined = split_tokens(ids, labels, starts, text, FragmentSettings(sequence_len=8, max_fragment_len=3, combine=True))
    # Context 2 + "abcdef" = 8 fits; adding "ghi" would not.
    assert ["".join(map(chr, f.input_ids)) for f in combined] == ["PQabcdef", "PQghi"]


@pytest.mark.parametrize("seed", range(30))
def test_every_token_is_trained_exactly_once_in_order(seed):
    rng = random.Random(seed)
    paragraphs = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(0, 40))) for _ in range(rng.randint(1, 12))]
    text = "SYS:" + "\n\n".join(paragraphs) + "$"
    # Every fifth character is spelled by two byte tokens sharing its offset.
    ids, starts = [], []
    for position, character in enumerate(text):
        for part in range(2 if position % 5 == 4 else 1):
            ids.append(ord(character) * 10 + part)
            starts.append(position)
    context = 4 if rng.random() < 0.5 else 0
    labels = [M] * context + ids[context:]
    settings = FragmentSettings(
        sequence_len=rng.randint(12, 40), max_fragment_len=rng.choice([None, 10, 20]), fragment_str="\n\n",
        overlap=rng.choice([0, 2, 5]), combine=rng.random() < 0.5,
    )
    fragments = split_tokens(ids, labels, starts, text, settings)
    trained = [label for fragment in fragments for label in fragment.labels if label != M]
    assert trained == [label for label in labels if label != M]
    for fragment in fragments:
        assert len(fragment.input_ids) <= settings.sequence_len
        assert fragment.input_ids[:context] == ids[:context]
    # Only the document's own first token can be a fragment's first label: no other goes unpredicted.
    assert all(fragment.labels[0] == M for fragment in fragments[1:])


def test_offsets_of_real_rows_match_prep_tokenization(tiny_tokenizer):
    messages = [{"role": "system", "content": "Summarise."}, {"role": "user", "content": "Report"},
                {"role": "assistant", "content": "Revenue rose.\n\n净利润增长𠀀 and more.\n\nThe end."}]
    text, ids, starts = token_offsets(tiny_tokenizer, "chat", messages, ["assistant"])
    assert ids == tokenize_conversation(tiny_tokenizer, messages).input_ids
    assert text.endswith("<|im_end|>\n") and len(starts) == len(ids)
    segments = [{"text": "Long text.\n\n债券违约𠀀.", "train": True}]
    text, ids, starts = token_offsets(tiny_tokenizer, "text", segments, [])
    assert ids == tokenize_segments(tiny_tokenizer, segments).input_ids and starts[-1] == len(text)


def test_real_fragments_hold_whole_characters(tiny_tokenizer):
    # The English tiny tokenizer has no CJK tokens: each character below is 3 or 4 byte tokens.
    answer = "\n\n".join("风险𠀀" * 7 for _ in range(6))
    messages = [{"role": "user", "content": "分析"}, {"role": "assistant", "content": answer}]
    tokens = tokenize_conversation(tiny_tokenizer, messages)
    settings = FragmentSettings(sequence_len=48, fragment_str="\n\n", overlap=3)
    fragments = split_row(tiny_tokenizer, "chat", messages, ["assistant"], tokens, settings)
    assert len(fragments) > 3
    trained_texts = [tiny_tokenizer.decode([t for t in f.labels if t != M]) for f in fragments]
    assert all("\ufffd" not in piece for piece in trained_texts), trained_texts
    assert "".join(trained_texts) == answer + "<|im_end|>"
    assert sum(f.trained_tokens for f in fragments) == tokens.trained_tokens
