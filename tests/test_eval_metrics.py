"""Eval's pure parts, pinned to hand-computed values: normalisation, exact match, label accuracy,
ROUGE-L, percentiles, cost, the judge's verdict parsing and win rate, the eval config's key
checks, API key resolution and what the eval fingerprint covers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import ConfigError, EvalConfig, RunConfig
from tasks.config_load import load_config
from tasks.eval import EvalError, comparison_markdown, judge_target
from tasks.eval_client import ApiKeyError, resolve_api_key
from tasks.eval_metrics import cost_usd, normalise, percentile, rouge_l, score
from tasks.fingerprint import FileHasher
from tasks.judge import outcome, parse_verdict, win_rate_summary
from tasks.stage import stage_key
from tasks.stages import EVAL

LABELS = ["positive", "negative", "neutral"]


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS "the cat on the mat"
        ("a b c d", "a c e", 4 / 7),  # LCS 2: P 2/4, R 2/3, F1 = 2PR/(P+R) = 4/7
        ("b a", "a b", 0.5),  # order matters: LCS 1
        ("x y", "a b", 0.0),
        ("same words here", "same words here", 1.0),
        ("", "", 1.0),
        ("", "a", 0.0),
    ],
)
def test_rouge_l_matches_hand_computed_f1(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_score_normalises_and_checks_labels():
    settings = EvalConfig(labels=LABELS)
    assert score("  Positive. ", "positive", settings) == {"exact_match": 1.0, "rouge_l": 1.0, "accuracy": 1.0}
    # Names two labels: wrong, although the right one is there.
    assert score("positive, not negative", "positive", settings)["accuracy"] == 0.0
    assert score("It is positive", "positive", settings) == {"exact_match": 0.0, "rouge_l": pytest.approx(0.5), "accuracy": 1.0}
    assert score("nonpositive", "positive", settings)["accuracy"] == 0.0
    assert "accuracy" not in score("anything", "positive", EvalConfig())


def test_normalisation_is_configurable():
    strict = EvalConfig(normalisation={"lowercase": False, "strip_punctuation": False, "collapse_whitespace": False})
    assert score("Positive", "positive", strict)["exact_match"] == 0.0
    assert score("positive.", "positive", strict)["exact_match"] == 0.0
    assert normalise("A  b\n c!", strict.normalisation) == "A  b\n c!"
    assert normalise("  A  b\n c!", EvalConfig().normalisation) == "a b c"


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(10, 0, -1)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (5.0, 10.0, 10.0)
    assert percentile([0.3, 0.1, 0.2], 50) == 0.2
    assert percentile([], 50) is None


def test_cost_from_price_table_by_model_then_role():
    prices = {
        "deepseek-chat": EvalConfig.Price(input_per_million=1.0, output_per_million=2.0),
        "base": EvalConfig.Price(input_per_million=0.5),
    }
    assert cost_usd(prices, ("deepseek-chat", "tuned"), 1000, 500) == pytest.approx(0.002)
    assert cost_usd(prices, ("/models/tiny", "base"), 2_000_000, 10) == pytest.approx(1.0)
    assert cost_usd(prices, ("/models/tiny", "tuned"), 10**6, 10**6) == 0.0


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [("A", "A"), ("b", "B"), ("Tie.", "tie"), ("[[B]] because it is right", "B"), ("Answer A is better", "A"),
     ("I prefer A", None), ("Both are fine", None), ("", None)],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_outcome_needs_both_orders_to_agree():
    assert outcome("A", "B") == "win"  # tuned was A, then B: preferred both times
    assert outcome("B", "A") == "loss"
    assert outcome("A", "A") == "tie"  # position bias: cancels out
    assert outcome("tie", "B") == "tie"
    assert outcome(None, "B") == "tie"


def test_win_rate_counts_ties_half():
    verdicts = [
        {"tuned_first": "A", "base_first": "B", "outcome": "win", "identical": False},
        {"tuned_first": "A", "base_first": "B", "outcome": "win", "identical": False},
        {"tuned_first": "A", "base_first": "A", "outcome": "tie", "identical": False},
        {"tuned_first": "B", "base_first": "A", "outcome": "loss", "identical": False},
        {"tuned_first": None, "base_first": None, "outcome": "tie", "identical": True},
    ]
    summary = win_rate_summary(verdicts)
    assert summary["win_rate"] == pytest.approx((2 + 0.5 * 2) / 5)
    assert (summary["wins"], summary["losses"], summary["ties"], summary["inconsistent"], summary["identical_answers"]) == (2, 1, 2, 1, 1)


def _config_error(tmp_path: Path, eval_yaml: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(f"base_model: model\ndatasets: [{{path: data.jsonl}}]\neval: {eval_yaml}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_config_takes_key_names_never_keys(tmp_path):
    key = "sk-live-0123456789abcdef"
    message = _config_error(tmp_path, f"{{api_key_env: {key}}}")
    assert "api_key_env" in message and "NAME of an environment variable" in message and key not in message
    message = _config_error(tmp_path, f"{{judge: {{base_url: 'http://x/v1', model: m, api_key_env: {key}}}}}")
    assert "eval.judge.api_key_env" in message and key not in message
    assert "not both" in _config_error(tmp_path, "{api_key_env: KEY, api_key_secret: key-block}")
    assert "compare_base" in _config_error(tmp_path, "{compare_base: false, judge: {base_url: 'http://x/v1', model: m}}")
    assert "did you mean `api_key_env`" in _config_error(tmp_path, "{api_key: KEY}")


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("LORAFLOW_TEST_KEY", "secret-value")
    assert resolve_api_key("LORAFLOW_TEST_KEY", None, "eval") == "secret-value"
    monkeypatch.delenv("LORAFLOW_TEST_KEY")
    with pytest.raises(ApiKeyError, match="LORAFLOW_TEST_KEY is not set"):
        resolve_api_key("LORAFLOW_TEST_KEY", None, "eval")
    # A name that looks like a pasted key is not repeated in the message.
    with pytest.raises(ApiKeyError) as caught:
        resolve_api_key("abcDEF0123456789xyz", None, "eval")
    assert "abcDEF0123456789xyz" not in str(caught.value)
    assert resolve_api_key(None, None, "eval") == "none"


def test_fingerprint_covers_what_decides_the_output(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")

    def eval_fingerprint(**eval_settings) -> str:
        cfg = RunConfig(base_model=str(tmp_path / "model"), datasets=[{"path": "data.jsonl"}], eval=eval_settings)
        upstream = {"prep": {"output_digest": "prep-digest"}, "train": {"output_digest": "train-digest"}}
        return stage_key(EVAL, cfg, upstream, FileHasher())

    judge = {"base_url": "http://judge/v1", "model": "judge-model"}
    reference = eval_fingerprint(judge=judge)
    # How requests are made, and which variable holds the key, change no answer.
    assert eval_fingerprint(judge={**judge, "api_key_env": "JUDGE_KEY"}, concurrency=16, request_timeout=5, max_retries=0,
                            startup_timeout=9, api_key_env="KEY") == reference
    for changed in ({"max_tokens": 3}, {"labels": LABELS}, {"prices": {"base": {"input_per_million": 1}}},
                    {"judge": {**judge, "rubric": "Be strict."}}, {"normalisation": {"lowercase": False}}):
        assert eval_fingerprint(**{"judge": judge, **changed}) != reference, changed


def test_comparison_markdown_shows_tuned_minus_base():
    manifest = {
        "metrics": {"tuned": {"accuracy": 0.9, "samples": 10}, "base": {"accuracy": 0.25, "samples": 10}},
        "judge": {"model": "judge-model", "win_rate": 0.75, "comparisons": 10, "wins": 6, "losses": 1, "ties": 3, "inconsistent": 2},
        "cost_usd": {"total": 0.0123},
        "eval_loss": 0.5, "eval_perplexity": 1.6487,
    }
    markdown = comparison_markdown(manifest)
    assert "| accuracy | 0.9 | 0.25 | 0.65 |" in markdown
    assert "| samples | 10 | 10 | 0 |" in markdown
    assert "win rate **0.75**" in markdown and "0.0123 USD" in markdown


def test_a_judge_needs_a_base_model_at_an_external_endpoint():
    settings = EvalConfig(endpoint="external", base_url="http://api/v1", model="tuned", judge={"base_url": "http://j/v1", "model": "j"})
    with pytest.raises(EvalError, match="eval.base_model_name"):
        judge_target(settings)
