"""K-FAC factors against exact Fisher blocks (where K-FAC is exact) and dense references."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from oracles import brute_force_dense_block, brute_force_diag, gaussian_dense_block, tiny_bert_config
from torch import nn
from transformers import BertForSequenceClassification, BertForTokenClassification

from hf_kfac import PredictiveOutput, estimate_fisher


class DeepLinear(nn.Module):
    """A deep linear network over positions: expand (per-position outputs) or reduce (masked mean)."""

    def __init__(self, dims: list[int], reduce_after: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:]))
        self.reduce_after = reduce_after

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor, **_: object) -> SimpleNamespace:
        h = features
        for i, layer in enumerate(self.layers):
            if self.reduce_after is not None and i == self.reduce_after:
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                h = (h * m).sum(1) / m.sum(1)
            h = layer(h)
        return SimpleNamespace(logits=h)


def gaussian_predictive(model: nn.Module, batch: dict) -> PredictiveOutput:
    out = model(**batch).logits
    return PredictiveOutput(out, batch.get("targets"), "gaussian", mask=batch.get("output_mask"))


def _linear_batches(n: int, t: int, d: int, ragged: bool, seed: int = 0, batch_size: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    if ragged:
        for i in range(n):
            mask[i, 1 + i % t :] = 0
        x[mask == 0] = 0.0
    return [
        {"features": x[s : s + batch_size], "attention_mask": mask[s : s + batch_size]}
        for s in range(0, n, batch_size)
    ]


def _blocks(model: nn.Module) -> list[tuple[str, str, str | None]]:
    return [
        (name, f"{name}.weight", f"{name}.bias" if m.bias is not None else None)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]


@pytest.mark.parametrize("bias", [True, False])
def test_single_linear_layer_kfac_is_exact(bias: bool) -> None:
    torch.manual_seed(0)
    model = DeepLinear([5, 3], bias=bias)
    batches = _linear_batches(7, 1, 5, ragged=False)
    curv = estimate_fisher(model, batches, shape="kfac", fisher_type="exact", predictive_fn=gaussian_predictive, progress=False)
    for name, w, b in _blocks(model):
        exact = gaussian_dense_block(model, batches, w, b)
        torch.testing.assert_close(curv.kfac[name].dense(), exact, rtol=1e-5, atol=1e-6)


class _WeightNormedLinear(DeepLinear):
    """One Linear whose output is divided by the norm of ``lin(I)``, computed on every forward and
    detached (as DoRA does for its LoRA weight): that call's output reaches no prediction."""

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor, **_: object) -> SimpleNamespace:
        lin = self.layers[0]
        scale = lin(torch.eye(lin.in_features)).detach().norm()
        return SimpleNamespace(logits=lin(features) / scale)


def test_a_call_whose_output_reaches_no_prediction_adds_nothing_to_a() -> None:
    """K-FAC stays exact for one linear layer: the detached call on the identity adds no rows to A."""
    torch.manual_seed(0)
    model = _WeightNormedLinear([5, 3])
    batches = _linear_batches(7, 1, 5, ragged=False)

    def scaled_gaussian(m: nn.Module, batch: dict) -> PredictiveOutput:
        return PredictiveOutput(m(**batch).logits, None, "gaussian")

    curv = estimate_fisher(model, batches, shape="kfac", fisher_type="exact", predictive_fn=scaled_gaussian,
                           progress=False)
    x = torch.cat([b["features"][:, 0] for b in batches])
    a = torch.cat([x, torch.ones(len(x), 1)], 1)
    torch.testing.assert_close(curv.kfac["layers.0"].A, a.T @ a / len(x), rtol=1e-5, atol=1e-6)
    scale = float(model.layers[0](torch.eye(5)).norm())
    torch.testing.assert_close(curv.kfac["layers.0"].G, torch.eye(3) / scale**2, rtol=1e-5, atol=1e-7)


def test_single_example_categorical_kfac_is_exact() -> None:
    """With one example and one position, F = ā āᵀ ⊗ E[g gᵀ] holds for any depth."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    batch = {"input_ids": torch.tensor([[2, 5, 7, 9]]), "attention_mask": torch.ones(1, 4, dtype=torch.long), "labels": torch.tensor([1])}
    curv = estimate_fisher(model, [batch], shape="kfac", fisher_type="exact", progress=False)
    for name in ["classifier", "bert.pooler.dense"]:
        block = curv.kfac[name]
        exact = brute_force_dense_block(model, [batch], "exact", block.weight, block.bias)
        torch.testing.assert_close(block.dense(), exact, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("ragged", [False, True])
def test_deep_linear_expand_is_exact(ragged: bool) -> None:
    torch.manual_seed(0)
    model = DeepLinear([4, 3, 3, 2])
    batches = _linear_batches(6, 4, 4, ragged)
    for b in batches:
        b["output_mask"] = b["attention_mask"].bool()
    curv = estimate_fisher(
        model, batches, shape="kfac", fisher_type="exact", kfac_approx="expand", predictive_fn=gaussian_predictive, progress=False
    )
    for name, w, b in _blocks(model):
        exact = gaussian_dense_block(model, batches, w, b)
        torch.testing.assert_close(curv.kfac[name].dense(), exact, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("ragged", [False, True])
def test_deep_linear_reduce_is_exact(ragged: bool) -> None:
    torch.manual_seed(0)
    model = DeepLinear([4, 3, 3, 2], reduce_after=2)
    batches = _linear_batches(6, 4, 4, ragged)
    curv = estimate_fisher(
        model, batches, shape="kfac", fisher_type="exact", kfac_approx="reduce", predictive_fn=gaussian_predictive, progress=False
    )
    for name, w, b in _blocks(model):
        exact = gaussian_dense_block(model, batches, w, b)
        torch.testing.assert_close(curv.kfac[name].dense(), exact, rtol=1e-4, atol=1e-6, msg=name)


def _reference_factors(model: nn.Module, batches: list[dict], approx: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A = mean ā āᵀ and G = (1/N) Σ g gᵀ from hooks and the summed empirical loss, written independently."""
    model.eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    sums = {n: [0.0, 0.0, 0] for n in linears}
    n_total = 0
    for batch in batches:
        store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: store.__setitem__(n, (i[0], o))) for n, m in linears.items()]
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        for h in hooks:
            h.remove()
        logits = out.logits
        n_total += logits.shape[0]
        ll = -nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="sum", ignore_index=-100)
        names = list(store)
        grads = torch.autograd.grad(ll, [store[n][1] for n in names], allow_unused=True)
        am = batch["attention_mask"].bool()
        for n, g in zip(names, grads):
            a = store[n][0].detach()
            a = torch.cat([a, torch.ones(*a.shape[:-1], 1)], -1)
            if g is None:
                g = torch.zeros_like(store[n][1])
            if a.dim() == 2:
                a, g = a.unsqueeze(1), g.unsqueeze(1)
                m = torch.ones(a.shape[0], 1, dtype=torch.bool)
            else:
                m = am
            if approx == "expand":
                sums[n][0] = sums[n][0] + torch.einsum("ni,nj->ij", a[m], a[m])
                sums[n][1] = sums[n][1] + torch.einsum("ni,nj->ij", g[m], g[m])
                sums[n][2] += int(m.sum())
            else:
                mf = m.unsqueeze(-1).float()
                abar = (a * mf).sum(1) / mf.sum(1)
                gsum = (g * mf).sum(1)
                sums[n][0] = sums[n][0] + abar.T @ abar
                sums[n][1] = sums[n][1] + gsum.T @ gsum
                sums[n][2] += a.shape[0]
    return {n: (s[0] / s[2], s[1] / n_total) for n, s in sums.items()}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_bert_factors_equal_independent_dense_computation(approx: str) -> None:
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_bert_config())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 40, (5, 6), generator=g)
    am = torch.ones(5, 6, dtype=torch.long)
    am[0, 3:] = 0
    am[2, 5:] = 0
    ids[am == 0] = 0
    labels = torch.randint(0, 3, (5, 6), generator=g)
    labels[am == 0] = -100
    labels[1, 2] = -100
    batches = [
        {"input_ids": ids[:3], "attention_mask": am[:3], "labels": labels[:3]},
        {"input_ids": ids[3:], "attention_mask": am[3:], "labels": labels[3:]},
    ]
    curv = estimate_fisher(model, batches, shape="kfac", fisher_type="empirical", kfac_approx=approx, progress=False)
    ref = _reference_factors(model, batches, approx)
    assert set(curv.kfac) == set(ref)
    for name, (A, G) in ref.items():
        torch.testing.assert_close(curv.kfac[name].A, A, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(curv.kfac[name].G, G, rtol=1e-4, atol=1e-9, msg=name)
        # and the block is exactly the Kronecker product of the two
        torch.testing.assert_close(curv.kfac[name].dense(), torch.kron(A, G), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("shape,approx", [("kfac", "expand"), ("kfac", "reduce"), ("diag", "expand")])
def test_padding_changes_nothing(shape: str, approx: str) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    ids = torch.tensor([[2, 5, 7, 9], [3, 4, 0, 0], [6, 8, 10, 0]])
    am = (ids != 0).long()
    labels = torch.tensor([0, 2, 1])
    short = [{"input_ids": ids, "attention_mask": am, "labels": labels}]
    pad = torch.zeros(3, 3, dtype=torch.long)
    long_ = [{"input_ids": torch.cat([ids, pad], 1), "attention_mask": torch.cat([am, pad], 1), "labels": labels}]
    a = estimate_fisher(model, short, shape=shape, fisher_type="empirical", kfac_approx=approx, progress=False)
    b = estimate_fisher(model, long_, shape=shape, fisher_type="empirical", kfac_approx=approx, progress=False)
    for name in a.kfac:
        torch.testing.assert_close(a.kfac[name].A, b.kfac[name].A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.kfac[name].G, b.kfac[name].G, rtol=1e-4, atol=1e-9)
    for name in a.diag:
        torch.testing.assert_close(a.diag[name], b.diag[name], rtol=1e-4, atol=1e-9, msg=name)


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_ignored_labels_contribute_nothing(fisher_type: str) -> None:
    """Positions labelled -100 add nothing, compared with brute force that skips them
    (oracles.brute_force_dense_block / brute_force_diag, one autograd call per example, position and class).

    K-FAC ``reduce`` sums each example's output gradients over positions and its ā ends in 1, so every
    block's G is exactly the bias-bias block of the dense Fisher; under ``expand`` that holds for the
    classifier with the exact Fisher (one output vector per position, so no cross-position terms). The diagonal is exact for every parameter. Labelling the
    ignored positions changes the Fisher (so the -100 matter here), and an example with every label
    ignored gives G = 0.
    """
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_bert_config())
    ids = torch.tensor([[2, 5, 7, 9, 11], [3, 4, 6, 8, 0]])
    am = (ids != 0).long()
    labels = torch.tensor([[-100, 1, -100, 2, -100], [0, -100, 2, -100, -100]])
    batches = [{"input_ids": ids, "attention_mask": am, "labels": labels}]
    relabelled = [{"input_ids": ids, "attention_mask": am, "labels": torch.tensor([[0, 1, 2, 2, 1], [0, 1, 2, 0, -100]])}]
    kw = dict(fisher_type=fisher_type, progress=False)
    reduce = estimate_fisher(model, batches, shape="kfac", kfac_approx="reduce", **kw)
    expand = estimate_fisher(model, batches, shape="kfac", kfac_approx="expand", **kw) if fisher_type == "exact" else None
    other = estimate_fisher(model, relabelled, shape="kfac", kfac_approx="reduce", **kw)
    assert set(reduce.kfac) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, block in reduce.kfac.items():
        dense = brute_force_dense_block(model, batches, fisher_type, block.weight, block.bias)
        d = block.G.shape[0]
        scale = float(dense.abs().max())
        torch.testing.assert_close(block.G, dense[-d:, -d:], rtol=1e-4, atol=1e-6 * scale, msg=name)
        if name == "classifier":
            if expand is not None:
                torch.testing.assert_close(expand.kfac[name].G, dense[-d:, -d:], rtol=1e-4, atol=1e-6 * scale)
            assert float((other.kfac[name].G - block.G).norm()) > 0.1 * float(block.G.norm())
    diag = estimate_fisher(model, batches, shape="diag", **kw)
    ref = brute_force_diag(model, batches, fisher_type)
    scale = max(float(v.abs().max()) for v in ref.values())
    for name, want in ref.items():
        torch.testing.assert_close(diag.diag[name], want, rtol=1e-4, atol=1e-7 * scale, msg=name)
    # an example whose every label is ignored gives a zero output factor
    none = estimate_fisher(model, [{"input_ids": ids, "attention_mask": am, "labels": torch.full_like(ids, -100)}],
                           shape="kfac", fisher_type="mc", progress=False)
    assert all(b.G.abs().max() == 0 for b in none.kfac.values())


def test_large_heads_fall_back_to_diagonal_and_are_recorded() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=200))
    batch = {"input_ids": torch.tensor([[2, 5, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long), "labels": torch.tensor([3])}
    curv = estimate_fisher(model, [batch], shape="kfac", fisher_type="empirical", progress=False)
    assert "classifier" not in curv.kfac
    assert "classifier.weight" in curv.diag and "classifier.bias" in curv.diag
    assert "max_factor_ratio" in curv.diag_fallbacks["classifier"]
    forced = estimate_fisher(model, [batch], shape="kfac", fisher_type="empirical", force_diag=["*.query"], exclude=["bert.embeddings.*"], progress=False)
    assert not any(n.endswith("query") for n in forced.kfac)
    assert "bert.encoder.layer.0.attention.self.query.weight" in forced.diag
    assert not any(n.startswith("bert.embeddings") for n in forced.param_names())
    covered = set(forced.param_names())
    expected = {n for n, p in model.named_parameters() if not n.startswith("bert.embeddings")}
    assert covered == expected


def test_mc_kfac_converges_to_exact() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    ids = torch.randint(1, 40, (4, 5))
    batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    exact = estimate_fisher(model, batch, shape="kfac", fisher_type="exact", progress=False)
    mc = estimate_fisher(model, batch, shape="kfac", fisher_type="mc", n_samples=1000, progress=False)
    for name, blk in exact.kfac.items():
        rel = (mc.kfac[name].G - blk.G).norm() / blk.G.norm()
        assert rel < 0.08, (name, rel)
        torch.testing.assert_close(mc.kfac[name].A, blk.A)


def test_exact_fisher_refuses_huge_label_spaces() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 25_000)
    batch = {"x": torch.randn(2, 4)}
    fn = lambda m, b: PredictiveOutput(m(b["x"]))  # noqa: E731
    with pytest.raises(ValueError, match="25000 classes.*fisher_type='mc'"):
        estimate_fisher(model, [batch], shape="diag", fisher_type="exact", predictive_fn=fn, progress=False)
