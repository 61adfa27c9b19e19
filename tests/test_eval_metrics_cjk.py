"""Scoring of CJK and mixed text, pinned to hand-computed values in Chinese and in English: NFKC
normalisation and CJK punctuation, character-level ROUGE-L for CJK runs, and label matching without
spaces around the label (issue 18; the first three cases are the failures it reports)."""

from __future__ import annotations

import pytest

from tasks.config import EvalConfig
from tasks.eval_metrics import named_labels, normalise, rouge_l, rouge_tokens, score

ZH_LABELS = ["正面", "负面", "中性"]
EN_LABELS = ["positive", "negative", "neutral"]
DEFAULT = EvalConfig().normalisation
STRICT = EvalConfig(normalisation={"lowercase": False, "strip_punctuation": False, "collapse_whitespace": False}).normalisation


# The three scoring failures of issue 18, as a new user met them.
def test_a_close_chinese_paraphrase_scores_by_characters_not_zero():
    # 8 characters each; LCS 营收 利润 下 = 5, so P = R = 5/8 and F1 = 0.625 (whitespace ROUGE: 0.0).
    assert rouge_l("营收上升利润下滑", "营收增长利润下降") == pytest.approx(0.625)


def test_full_width_punctuation_is_stripped_for_exact_match():
    assert score("正面。", "正面", EvalConfig(labels=ZH_LABELS)) == {"exact_match": 1.0, "rouge_l": 1.0, "accuracy": 1.0}


def test_a_label_inside_a_chinese_sentence_counts():
    # Exact match fails; ROUGE-L: LCS 2 of 6 predicted, 2 of 2 wanted: P 1/3, R 1, F1 = (2/3)/(4/3) = 0.5.
    assert score("该新闻为正面", "正面", EvalConfig(labels=ZH_LABELS)) == {"exact_match": 0.0, "rouge_l": 0.5, "accuracy": 1.0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("正面。", "正面"),
        ("「正面」", "正面"),
        ("《正面》！", "正面"),
        ("（正面）", "正面"),  # NFKC: full-width brackets become ASCII ones, then are stripped
        ("\u3000正面\u3000", "正面"),  # the ideographic space
        ("ＰＯＳＩＴＩＶＥ！", "positive"),  # full-width letters and mark
        ("增长５０％。", "增长50%"),  # full-width digits; a trailing % carries meaning and stays
        ("利润　下降，风险上升。", "利润 下降,风险上升"),  # inner punctuation is kept (NFKC makes it ASCII)
        ("  Positive. ", "positive"),  # English as before
        ("-5%", "-5%"),
    ],
)
def test_normalisation_of_cjk_and_full_width_text(text, expected):
    assert normalise(text, DEFAULT) == expected


def test_nfkc_applies_even_with_every_rule_off():
    assert normalise("ＡＢ\u3000１", STRICT) == "AB 1"
    assert normalise("正面。", STRICT) == "正面。"
    assert normalise("A  b\n c!", STRICT) == "A  b\n c!"  # ASCII text: unchanged


def test_rouge_tokens_are_cjk_characters_and_other_words():
    assert rouge_tokens("净利润增长20%, as expected") == ["净", "利", "润", "增", "长", "20", "as", "expected"]
    assert rouge_tokens("公司Q3 revenue增长。") == ["公", "司", "Q3", "revenue", "增", "长"]
    assert rouge_tokens("ポジティブ・ネガティブ") == ["ポ", "ジ", "テ", "ィ", "ブ", "ネ", "ガ", "テ", "ィ", "ブ"]
    assert rouge_tokens("。，！") == []


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("利润下降，风险上升。", "利润下降风险上升", 1.0),  # punctuation is not a token
        ("净利润增长20%", "净利润增长 20", 1.0),
        # 6 vs 4 tokens (公 司 Q3 revenue 增 长 / Q3 revenue 增 长), LCS 4: P 2/3, R 1, F1 = (4/3)/(5/3) = 0.8.
        ("公司Q3 revenue增长", "Q3 revenue增长", 0.8),
        # 5 vs 3 characters, LCS 风 险 = 2: P 2/5, R 2/3, F1 = (8/15)/(16/15) = 0.5.
        ("信用风险低", "风险高", 0.5),
        ("债券违约", "股票上涨", 0.0),
        # English: words as before, and punctuation attached to a word no longer makes it another word.
        ("revenue rose, profit fell.", "revenue rose; profit fell", 1.0),
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        ("。", "", 1.0),  # no tokens on either side
    ],
)
def test_rouge_l_chinese_mixed_and_english(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("reply", "labels", "named"),
    [
        ("该新闻为正面", ZH_LABELS, {"正面"}),
        ("情绪:负面", ZH_LABELS, {"负面"}),
        ("正面还是负面", ZH_LABELS, {"正面", "负面"}),  # two labels: accuracy refuses it below
        ("中性偏正面", ["正面", "中性", "中性偏正面"], {"中性偏正面"}),  # the longer label wins its span
        ("sentiment: 正面", ZH_LABELS, {"正面"}),
        ("情绪positive", EN_LABELS, {"positive"}),  # a CJK neighbour is a boundary
        ("it is positive", EN_LABELS, {"positive"}),
        ("nonpositive", EN_LABELS, set()),  # a Latin neighbour is not
        ("positive_score", EN_LABELS, set()),
        ("very positive", ["positive", "very positive"], {"very positive"}),
        ("positive, not negative", EN_LABELS, {"positive", "negative"}),
        ("ポジティブです", ["ポジティブ", "ネガティブ"], {"ポジティブ"}),
        ("无法判断", ZH_LABELS, set()),
    ],
)
def test_named_labels(reply, labels, named):
    assert named_labels(reply, labels) == named


@pytest.mark.parametrize(
    ("reply", "wanted", "accuracy"),
    [
        ("正面", "正面", 1.0),
        ("答案：正面。", "正面", 1.0),
        ("正面还是负面", "正面", 0.0),
        ("负面", "正面", 0.0),
        ("中性", "中性", 1.0),
        ("Positive!", "positive", 1.0),
        ("positive, not negative", "positive", 0.0),
    ],
)
def test_accuracy_needs_exactly_the_right_label(reply, wanted, accuracy):
    labels = ZH_LABELS if wanted in ZH_LABELS else EN_LABELS
    assert score(reply, wanted, EvalConfig(labels=labels))["accuracy"] == accuracy


def test_full_width_labels_in_the_config_match_ascii_replies():
    # Labels are normalised like replies: a label written full-width in the config still matches.
    assert score("positive", "positive", EvalConfig(labels=["ＰＯＳＩＴＩＶＥ", "negative"]))["accuracy"] == 1.0
