"""The fast paths of K-FAC estimation: blocked upper-triangular Gram products and their completion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_kfac import estimate_fisher
from hf_kfac.curvature.estimate import _gram_cuts, gram_upper_, symmetric_from_upper


@pytest.mark.parametrize("d", [5, 255, 256, 383, 1023, 1537, 3072])
def test_blocked_gram_equals_full_product(d: int) -> None:
    g = torch.Generator().manual_seed(d)
    x = torch.randn(37, d, generator=g, dtype=torch.float64)
    acc = torch.tril(torch.full((d, d), 123.0, dtype=torch.float64), -1)  # garbage below the diagonal is ignored
    gram_upper_(acc, x, alpha=0.5)
    gram_upper_(acc, x, alpha=0.5)
    full = symmetric_from_upper(acc, 2.0)
    torch.testing.assert_close(full, 2 * x.T @ x)
    assert torch.equal(full, full.T)
    cuts = _gram_cuts(d)
    assert cuts[0] == 0 and cuts[-1] == d and (len(cuts) > 2) == (d >= 256)


def test_wide_linear_factors_match_dense_reference() -> None:
    """A Linear with d_in >= 1024 goes through the blocked path; A and G must equal the plain sums."""
    torch.manual_seed(0)
    lin = nn.Linear(1100, 4)
    x = torch.randn(12, 3, 1100)
    mask = torch.ones(12, 3, dtype=torch.bool)
    mask[:5, 2] = False

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, input_ids, attention_mask, labels=None):  # noqa: ARG002
            return {"logits": self.lin(input_ids).mean(1)}

    batch = {"input_ids": x, "attention_mask": mask, "labels": torch.randint(0, 4, (12,))}
    curv = estimate_fisher(M(), [batch], shape="kfac", fisher_type="empirical", progress=False, max_factor_ratio=1e9)
    block = curv.kfac["lin"]
    a = torch.cat([x, torch.ones(12, 3, 1)], -1)[mask]
    torch.testing.assert_close(block.A, a.T @ a / a.shape[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(block.A, block.A.T) and torch.equal(block.G, block.G.T)
    # G: output gradients of the mean-pooled logits at every valid position
    logits = lin(x).mean(1)
    v = torch.softmax(logits, -1) - nn.functional.one_hot(batch["labels"], 4)
    gpos = (v.unsqueeze(1) / 3).expand(12, 3, 4)[mask]
    torch.testing.assert_close(block.G, gpos.T @ gpos / 12, rtol=1e-5, atol=1e-7)


def test_factors_start_empty_yet_unused_layers_come_out_zero() -> None:
    """Accumulators are not zero-filled up front: a Linear no batch reaches must still give exact zeros,
    and two batches must add up to the dense sums (the first one overwrites, the second accumulates)."""
    torch.manual_seed(1)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(300, 5)
            self.unused = nn.Linear(300, 300)

        def forward(self, input_ids, attention_mask, labels=None):  # noqa: ARG002
            return {"logits": self.used(input_ids).mean(1)}

    m = M()
    batches = [{"input_ids": torch.randn(4, 2, 300), "attention_mask": torch.ones(4, 2, dtype=torch.bool),
                "labels": torch.randint(0, 5, (4,))} for _ in range(2)]
    both = estimate_fisher(m, batches, shape="kfac", fisher_type="empirical", progress=False, max_factor_ratio=1e9)
    assert torch.equal(both.kfac["unused"].A, torch.zeros(301, 301))
    assert torch.equal(both.kfac["unused"].G, torch.zeros(300, 300))
    # dense references over both batches: A from the inputs, G from the empirical output gradients
    x = torch.cat([b["input_ids"] for b in batches])
    a = torch.cat([x, torch.ones(8, 2, 1)], -1).reshape(-1, 301)
    torch.testing.assert_close(both.kfac["used"].A, a.T @ a / a.shape[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        y = torch.cat([b["labels"] for b in batches])
        v = torch.softmax(m.used(x).mean(1), -1) - nn.functional.one_hot(y, 5)
    gpos = (v.unsqueeze(1) / 2).expand(8, 2, 5).reshape(-1, 5)
    torch.testing.assert_close(both.kfac["used"].G, gpos.T @ gpos / 8, rtol=1e-5, atol=1e-7)
