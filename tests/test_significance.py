"""The paired tests of the promotion gate, pinned with values computed by hand."""

from __future__ import annotations

import math

import pytest

from tasks.significance import PairingError, binomial_cdf, clopper_pearson, compare, mcnemar, paired_bootstrap


def test_binomial_cdf_by_hand():
    # P(X <= 2), X ~ Bin(12, 1/2) = (1 + 12 + 66) / 4096
    assert binomial_cdf(2, 12, 0.5) == pytest.approx(79 / 4096, abs=1e-15)
    assert binomial_cdf(-1, 5, 0.3) == 0.0 and binomial_cdf(5, 5, 0.3) == 1.0


def test_clopper_pearson_edges_by_hand():
    # 0 of 5: upper = 1 - (alpha/2)^(1/5); 5 of 5: lower = (alpha/2)^(1/5)
    low, high = clopper_pearson(0, 5, 0.95)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** 0.2, abs=1e-12)
    low, high = clopper_pearson(5, 5, 0.95)
    assert low == pytest.approx(0.025 ** 0.2, abs=1e-12) and high == 1.0
    # 1 of 2: P(X >= 1 | p) = 1 - (1-p)^2 = 0.025 -> p = 1 - sqrt(0.975); symmetric above
    low, high = clopper_pearson(1, 2, 0.95)
    assert low == pytest.approx(1 - math.sqrt(0.975), abs=1e-12) and high == pytest.approx(math.sqrt(0.975), abs=1e-12)


def test_mcnemar_counts_only_discordant_items():
    # 20 items: 10 the candidate alone gets right (b), 2 production alone (c), 5 both, 3 neither.
    candidate = [1] * 10 + [0] * 2 + [1] * 5 + [0] * 3
    production = [0] * 10 + [1] * 2 + [1] * 5 + [0] * 3
    result = mcnemar(candidate, production, 0.95)
    assert result.discordant == (10, 2) and result.items == 20
    assert result.candidate == 15 / 20 and result.production == 7 / 20
    assert result.difference == pytest.approx(8 / 20)
    assert result.p_value == pytest.approx(2 * 79 / 4096, abs=1e-15)  # 0.0386: significant at 95 %
    share_low, share_high = clopper_pearson(10, 12, 0.95)
    assert result.low == pytest.approx((2 * share_low - 1) * 12 / 20) and result.high == pytest.approx((2 * share_high - 1) * 12 / 20)
    assert result.low > 0  # the interval excludes 0 exactly when p < 0.05
    # 3 against 1 is noise: p = 2 * (1 + 4) / 16 = 0.625, and the interval straddles 0.
    noise = mcnemar([1, 1, 1, 0, 1], [0, 0, 0, 1, 1], 0.95)
    assert noise.p_value == pytest.approx(0.625) and noise.low < 0 < noise.high


def test_mcnemar_with_identical_answers_is_no_difference():
    result = mcnemar([1, 0, 1], [1, 0, 1])
    assert result.p_value == 1.0 and result.difference == 0.0 and result.low == 0.0 and result.high == 0.0


def test_paired_bootstrap_by_hand():
    # Every pair differs by 0.25: every resample's mean is 0.25.
    constant = paired_bootstrap([0.75, 0.5, 1.0], [0.5, 0.25, 0.75])
    assert constant.difference == pytest.approx(0.25) and constant.low == pytest.approx(0.25) and constant.high == pytest.approx(0.25)
    # Differences 0 and 1: a resample's mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4, so the
    # 2.5 % and 97.5 % quantiles of 10,000 resamples are 0 and 1.
    two = paired_bootstrap([0.4, 1.0], [0.4, 0.0])
    assert (two.low, two.high) == (0.0, 1.0) and two.difference == 0.5
    # The fixed seed: the same scores give the same interval every time.
    scores = [0.1 * (i % 7) for i in range(50)]
    other = [0.1 * (i % 5) for i in range(50)]
    assert paired_bootstrap(scores, other) == paired_bootstrap(scores, other)


def test_compare_picks_the_test_and_refuses_unpaired_scores():
    assert compare([1, 0], [0, 0], 0.95).method == "mcnemar"
    assert compare([0.5, 0], [0, 0], 0.95).method == "paired_bootstrap"
    with pytest.raises(PairingError, match="same items"):
        compare([1, 0], [1], 0.95)
    with pytest.raises(PairingError, match="0/1 scores"):
        mcnemar([0.5], [1])
