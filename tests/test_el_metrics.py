"""Tests of hf_kfac.el.metrics on hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_kfac.el.metrics import (
    NOT_FOUND,
    accuracy_at_k,
    accuracy_at_k_from_predictions,
    accuracy_from_ranks,
    bootstrap_ci,
    concept_ranks_from_string_scores,
    hits_at_k,
    paired_bootstrap,
    ranks_from_predictions,
    reduce_string_scores,
    target_ranks,
)

# 3 items, 6 classes
SCORES = torch.tensor([
    [0.1, 0.9, 0.3, 0.2, 0.0, 0.5],  # gold 1: rank 0
    [0.8, 0.7, 0.6, 0.5, 0.4, 0.3],  # gold 5: rank 5
    [0.2, 0.9, 0.1, 0.05, 0.0, -1.0],  # gold 2: rank 2
])
TARGETS = torch.tensor([1, 5, 2])


def test_accuracy_at_k_simple() -> None:
    assert target_ranks(SCORES, TARGETS).tolist() == [0, 5, 2]
    acc = accuracy_at_k(SCORES, TARGETS, ks=(1, 3, 5, 6))
    assert acc == {1: pytest.approx(1 / 3), 3: pytest.approx(2 / 3), 5: pytest.approx(2 / 3), 6: 1.0}
    # numpy and list inputs give the same result
    assert accuracy_at_k(SCORES.numpy(), TARGETS.numpy()) == accuracy_at_k(SCORES.tolist(), TARGETS.tolist())


def test_ties_are_deterministic() -> None:
    scores = torch.tensor([
        [1.0, 1.0, 1.0, 0.0],  # gold 1 tied with 0 and 2
        [0.5, 0.5, 0.5, 0.5],  # constant scorer, gold 0
        [0.0, 2.0, 2.0, 1.0],  # gold 2 tied with 1 at the top
    ])
    gold = torch.tensor([1, 0, 2])
    assert target_ranks(scores, gold, "pessimistic").tolist() == [2, 3, 1]
    assert target_ranks(scores, gold, "first").tolist() == [1, 0, 1]
    assert target_ranks(scores, gold, "optimistic").tolist() == [0, 0, 0]
    assert accuracy_at_k(scores, gold, ks=(1,)) == {1: 0.0}  # pessimistic by default
    assert accuracy_at_k(scores, gold, ks=(1,), ties="first") == {1: pytest.approx(1 / 3)}
    # "first" agrees with a stable descending sort
    order = torch.from_numpy(np.argsort(-scores.numpy(), axis=1, kind="stable"))
    stable_rank = (order == gold[:, None]).float().argmax(1)
    assert stable_rank.tolist() == target_ranks(scores, gold, "first").tolist()
    # acc@5 with only 4 candidates is 1 whatever the ties
    assert accuracy_at_k(scores, gold, ks=(5,)) == {5: 1.0}
    with pytest.raises(ValueError, match="ties"):
        target_ranks(scores, gold, "random")  # type: ignore[arg-type]


def test_rank_input_errors() -> None:
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[n, C\]"):
        target_ranks(torch.zeros(3), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="class indices"):
        target_ranks(torch.zeros(1, 3), torch.tensor([3]))
    with pytest.raises(ValueError, match="k must be"):
        hits_at_k([0, 1], 0)
    with pytest.raises(ValueError, match="no items"):
        accuracy_from_ranks([])


def test_reduce_string_scores_max_over_strings() -> None:
    # 5 strings -> 3 concepts: concept 0 has strings 0, 3; concept 1 has 1, 2, 4; concept 2 none
    s2c = torch.tensor([0, 1, 1, 0, 1])
    string_scores = torch.tensor([[0.1, 0.2, 0.9, 0.4, -0.3], [0.7, -1.0, -2.0, 0.0, -0.5]])
    concept = reduce_string_scores(string_scores, s2c, 3)
    assert concept[:, :2].tolist() == [[pytest.approx(0.4), pytest.approx(0.9)], [pytest.approx(0.7), -0.5]]
    assert torch.isinf(concept[:, 2]).all() and (concept[:, 2] < 0).all()
    ranks = concept_ranks_from_string_scores(string_scores, s2c, 3, torch.tensor([1, 1]))
    assert ranks.tolist() == [0, 1]
    with pytest.raises(ValueError, match="concept indices"):
        reduce_string_scores(string_scores, torch.tensor([0, 1, 1, 0, 3]), 3)


def test_reduce_string_scores_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    string_scores = torch.randn(7, 50, generator=gen)
    s2c = torch.randint(0, 12, (50,), generator=gen)
    got = reduce_string_scores(string_scores, s2c, 12)
    for c in range(12):
        cols = (s2c == c).nonzero().flatten()
        want = string_scores[:, cols].max(1).values if len(cols) else torch.full((7,), float("-inf"))
        assert torch.equal(got[:, c], want)


def test_ranked_predictions() -> None:
    preds = [["a", "b", "c"], ["b", "b", "a"], ["c", "c", "c"], []]
    gold = ["a", "a", "a", "z"]
    ranks = ranks_from_predictions(preds, gold)
    assert ranks.tolist() == [0, 1, NOT_FOUND, NOT_FOUND]  # duplicates count once
    assert accuracy_at_k_from_predictions(preds, gold, ks=(1, 2)) == {1: 0.25, 2: 0.5}
    with pytest.raises(ValueError, match="gold labels"):
        ranks_from_predictions(preds, gold[:2])


def test_bootstrap_ci_contains_estimate_and_shrinks() -> None:
    rng = np.random.default_rng(1)
    small = rng.random(100) < 0.7
    large = rng.random(10_000) < 0.7
    ci_small = bootstrap_ci(small, n_boot=1000, seed=0)
    ci_large = bootstrap_ci(torch.from_numpy(large), n_boot=1000, seed=0)
    for ci, v in ((ci_small, small), (ci_large, large)):
        assert ci.estimate == pytest.approx(v.mean())
        assert ci.low <= ci.estimate <= ci.high
    assert (ci_large.high - ci_large.low) < (ci_small.high - ci_small.low) / 5
    # normal-approximation width for n = 10000, p = 0.7 is 2 * 1.96 * 0.00458
    assert (ci_large.high - ci_large.low) == pytest.approx(2 * 1.96 * np.sqrt(0.21 / 10_000), rel=0.15)
    assert bootstrap_ci(small, seed=0) == ci_small  # deterministic
    assert bootstrap_ci([1, 1, 1, 1]) == (1.0, 1.0, 1.0)
    est, low, high = bootstrap_ci([0.0, 1.0], n_boot=200)
    assert est == 0.5 and 0.0 <= low <= high <= 1.0
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="one-dimensional"):
        bootstrap_ci(np.zeros((2, 2)))


def test_paired_bootstrap_forgetting() -> None:
    rng = np.random.default_rng(2)
    before = rng.random(2000) < 0.8
    # after the update, 10% of the previously correct items are forgotten
    after = before & (rng.random(2000) > 0.1)
    res = paired_bootstrap(before, after, n_boot=1000, seed=0)
    assert res.estimate == pytest.approx(before.mean() - after.mean())
    assert res.low <= res.estimate <= res.high
    assert res.low > 0 and res.fraction_le_zero == 0.0
    # pairing: narrower than an unpaired interval on the same data
    unpaired = np.sqrt(before.var() / 2000 + after.var() / 2000) * 2 * 1.96
    assert res.high - res.low < unpaired / 2
    same = paired_bootstrap(before, before)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    assert paired_bootstrap(np.ones(5), np.zeros(5)).estimate == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([1, 0], [1])
