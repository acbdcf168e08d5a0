"""Prior.add_task refuses a curvature that does not fit the model, and a refused task changes nothing.

Each bad curvature is a real estimate with one entry broken by hand (a wrong shape, an unknown parameter
name, a NaN or inf), or an estimate made on another model. The error must name the parameter and say
how to fix it, and the prior's tensors (state_dict), tasks and recorded shapes must be exactly as before.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from trainer_fixtures import batches_of, make_model, make_rows, one_thread  # noqa: E402

from hf_kfac import Curvature, Prior, estimate_fisher  # noqa: E402
from hf_kfac.compact import CompactFactor, CompactKFACBlock, StorageConfig, compress_curvature  # noqa: E402
from hf_kfac.curvature.blocks import KFACBlock  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)

REFIT = r"Estimate the Fisher on this model \(estimate_fisher\(model, \.\.\.\)\)"
DIVERGED = r"holds NaN or inf: the Fisher estimate diverged.*Re-estimate it .*exclude="


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    model = make_model("seq", seed=0)
    batches = batches_of(make_rows("seq", 6, seed=3), 3)
    kfac = estimate_fisher(model, batches, shape="kfac", fisher_type="empirical", progress=False)
    diag = estimate_fisher(model, batches, shape="diag", fisher_type="empirical", progress=False)
    return {"model": model, "kfac": kfac, "diag": diag}


def _clone(c: Curvature) -> Curvature:
    return copy.deepcopy(c)


def _snapshot(prior: Prior) -> tuple[dict[str, torch.Tensor], list[str], dict[str, list[int]], list[list[int]]]:
    sd = {k: v.clone() for k, v in prior.state_dict().items()}
    return sd, [t.name for t in prior.tasks], copy.deepcopy(prior.param_shapes), [list(s.tasks) for s in prior.slots]


def _assert_unchanged(prior: Prior, before: tuple) -> None:
    sd, names, shapes, slot_tasks = before
    now = prior.state_dict()
    assert now.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(now[k], v), k
    assert [t.name for t in prior.tasks] == names
    assert prior.param_shapes == shapes
    assert [list(s.tasks) for s in prior.slots] == slot_tasks


def _first_block(c: Curvature, bias: bool = True) -> tuple[str, KFACBlock]:
    return next((n, b) for n, b in c.kfac.items() if (b.bias is not None) == bias)


def _diag_name(c: Curvature) -> str:
    return "bert.embeddings.word_embeddings.weight" if "bert.embeddings.word_embeddings.weight" in c.diag else next(iter(c.diag))


# each case: (fisher shape, how to break a copy of the curvature -> the parameter the error must name, what else it says)
def _transposed_diag(c: Curvature) -> str:
    name = _diag_name(c)
    c.diag[name] = c.diag[name].T.contiguous()
    return name


def _one_row_short_diag(c: Curvature) -> str:
    name = "classifier.bias" if "classifier.bias" in c.diag else _diag_name(c)
    c.diag[name] = c.diag[name][:-1].clone()
    return name


def _a_without_bias_row(c: Curvature) -> str:
    _, b = _first_block(c)
    b.A = b.A[:-1, :-1].clone()
    return b.weight


def _g_too_big(c: Curvature) -> str:
    _, b = _first_block(c)
    d = b.G.shape[0] + 1
    b.G = torch.eye(d)
    return b.weight


def _unknown_diag(c: Curvature) -> str:
    name = _diag_name(c)
    c.diag["bert.embeddings.no_such_table.weight"] = c.diag.pop(name)
    return "bert.embeddings.no_such_table.weight"


def _unknown_kfac_weight(c: Curvature) -> str:
    _, b = _first_block(c)
    b.weight = "bert.encoder.layer.9.attention.self.query.weight"
    return b.weight


def _nan_diag(c: Curvature) -> str:
    name = _diag_name(c)
    c.diag[name] = c.diag[name].clone()
    c.diag[name][1, 2] = float("nan")
    return name


def _inf_a(c: Curvature) -> str:
    _, b = _first_block(c)
    b.A = b.A.clone()
    b.A[0, 0] = float("inf")
    return b.weight


def _nan_g(c: Curvature) -> str:
    _, b = _first_block(c, bias=True)
    b.G = b.G.clone()
    b.G[-1, 0] = float("nan")
    return b.weight


CASES: list[tuple[str, str, Callable[[Curvature], str], str]] = [
    ("diag", "transposed diagonal", _transposed_diag, rf"has shape \[.*but the parameter has shape .*{REFIT}"),
    ("diag", "short bias diagonal", _one_row_short_diag, rf"has shape \[.*but the parameter has shape .*{REFIT}"),
    ("kfac", "A without the bias row", _a_without_bias_row, rf"factor A .*needs \[\d+, \d+\] \(\d+ inputs \+ 1 for the bias\).*{REFIT}"),
    ("kfac", "G too big", _g_too_big, rf"factor G .*needs \[\d+, \d+\] \(\d+ outputs\).*{REFIT}"),
    ("diag", "unknown diagonal parameter", _unknown_diag, rf"not a parameter of the model.*{REFIT}"),
    ("kfac", "unknown K-FAC weight", _unknown_kfac_weight, rf"not a parameter of the model.*{REFIT}"),
    ("diag", "NaN in a diagonal", _nan_diag, DIVERGED),
    ("kfac", "inf in A", _inf_a, DIVERGED),
    ("kfac", "NaN in G", _nan_g, DIVERGED),
]


@pytest.mark.parametrize("accumulation", ["separate", "merge"])
@pytest.mark.parametrize("shape,case,breaker,message", CASES, ids=[c[1] for c in CASES])
def test_a_curvature_that_does_not_fit_is_refused_naming_the_parameter_and_the_prior_is_unchanged(
    setup, accumulation: str, shape: str, case: str, breaker: Callable[[Curvature], str], message: str
) -> None:
    model, good = setup["model"], setup[shape]
    prior = Prior(shape=shape, accumulation=accumulation, damping=0.1)
    prior.add_task(model, good, "a", n_examples=6)
    before = _snapshot(prior)
    bad = _clone(good)
    pname = breaker(bad)
    with pytest.raises(ValueError, match=message) as refused:
        prior.add_task(model, bad, "b", n_examples=6)
    assert repr(pname) in str(refused.value)
    _assert_unchanged(prior, before)
    # the prior still takes a good task
    prior.add_task(model, good, "b", n_examples=6)
    assert [t.name for t in prior.tasks] == ["a", "b"]


def test_a_curvature_estimated_on_a_wider_model_is_refused_before_anything_changes(setup) -> None:
    """Same parameter names, other widths: the first K-FAC block's A is (17 × 17) for a model whose weight
    needs (9 × 9)."""
    model = setup["model"]
    wide = make_model("seq", seed=0, hidden_size=16, intermediate_size=24)
    curv = estimate_fisher(wide, batches_of(make_rows("seq", 4, seed=3), 4), shape="kfac", fisher_type="empirical",
                           progress=False)
    prior = Prior(shape="kfac")
    prior.add_task(model, setup["kfac"], "a", n_examples=6)
    before = _snapshot(prior)
    with pytest.raises(ValueError, match=rf"factor A of parameter '[^']+' .*has shape \[17, 17\].*needs \[9, 9\].*{REFIT}"):
        prior.add_task(model, curv, "b")
    _assert_unchanged(prior, before)


def test_a_compact_curvature_with_inf_is_refused_and_a_finite_one_is_taken(setup) -> None:
    """Compact blocks (U, w, r) are checked too: an inf eigenvalue is refused naming the weight; the same
    block with finite values is accepted."""
    model = setup["model"]
    cfg = StorageConfig(format="compact", rank_fraction=0.5)
    compact = compress_curvature(setup["kfac"], cfg)
    prior = Prior(shape="kfac", storage=cfg)
    prior.add_task(model, compact, "a", n_examples=6)
    before = _snapshot(prior)
    bad = _clone(compact)
    name, block = next(iter(bad.kfac.items()))
    assert isinstance(block, CompactKFACBlock)
    bad.kfac[name] = CompactKFACBlock(
        block.A, CompactFactor(block.G.eigvecs, torch.full_like(block.G.eigvals, math.inf), block.G.residual),
        block.weight, block.bias,
    )
    with pytest.raises(ValueError, match=rf"factor G of parameter {block.weight!r}.*{DIVERGED}"):
        prior.add_task(model, bad, "b", n_examples=6)
    _assert_unchanged(prior, before)
    prior.add_task(model, compact, "b", n_examples=6)
    assert prior.num_tasks == 2


def test_a_task_without_data_is_refused_and_records_no_parameter_shape(setup) -> None:
    """n_examples=0 under data_size weighting: refused before the prior records anything (its param_shapes
    included)."""
    model = setup["model"]
    prior = Prior(shape="diag")
    with pytest.raises(ValueError, match="has no data .*weight 0"):
        prior.add_task(model, setup["diag"], "empty", n_examples=0)
    assert prior.num_tasks == 0 and prior.param_shapes == {} and prior.state_dict() == {}
