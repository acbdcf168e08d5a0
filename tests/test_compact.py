"""The compact prior format: accuracy against the full prior, closed-form gradient, files, anchors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from oracles import dense_compact_penalty, tiny_bert_config
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertForSequenceClassification

import hf_kfac.serialization as ser
from hf_kfac import Prior, PriorConfig, PriorFileError, estimate_fisher
from hf_kfac.compact import CompactFactor, CompactKFACBlock, StorageConfig, compress_factor, is_compact

EXACT = {"format": "compact", "rank_fraction": 1.0, "eigenvector_dtype": "float32"}


def _batches(vocab: int, n: int, t: int, k: int, seed: int, n_classes: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        ids = torch.randint(1, vocab, (n, t), generator=g)
        mask = torch.ones_like(ids)
        mask[: n // 2, t - 2 :] = 0  # some padding
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, n_classes, (n,), generator=g)})
    return out


def _tiny(seed: int = 0, **cfg) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**cfg))


def _train_steps(model: nn.Module, batches: list[dict], lr: float = 1e-2) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for b in batches:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _perturb(model: nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _prior_pair(model: nn.Module, curvs: list, storage, **kw) -> tuple[Prior, Prior]:
    full, comp = Prior(shape="kfac", **kw), Prior(shape="kfac", storage=storage, **kw)
    for i, c in enumerate(curvs):
        full.add_task(model, c, f"t{i}")
        comp.add_task(model, c, f"t{i}")
    return full, comp


@pytest.fixture(scope="module")
def tiny_setup():
    model = _tiny()
    curvs = [estimate_fisher(model, _batches(40, 6, 5, 2, s), shape="kfac", fisher_type="mc", progress=False) for s in (1, 2)]
    return model, curvs


def test_storage_config_coercion_and_validation() -> None:
    assert PriorConfig().storage.format == "full"
    cfg = PriorConfig(storage="compact")
    assert cfg.storage.compact and cfg.storage.rank_fraction == 0.25
    again = PriorConfig(**json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert PriorConfig(storage={"format": "compact", "rank": 8, "energy": 0.9}).storage.rank == 8
    for bad in ({"rank_fraction": 0}, {"rank": 0}, {"energy": 1.5}, {"remainder": "x"}, {"eigenvector_dtype": "float16"}, {"anchor": "x"}):
        with pytest.raises(ValueError):
            StorageConfig(format="compact", **bad)
    with pytest.raises(ValueError, match="not a valid StorageFormat"):
        StorageConfig(format="tiny")


def test_rank_criteria_take_the_smallest() -> None:
    ev = torch.tensor([10.0, 5.0, 3.0, 1.0, 0.5, 0.5])
    assert StorageConfig(format="compact", rank_fraction=None).rank_for(ev) == 6
    assert StorageConfig(format="compact", rank_fraction=0.5).rank_for(ev) == 3
    assert StorageConfig(format="compact", rank_fraction=None, rank=2).rank_for(ev) == 2
    assert StorageConfig(format="compact", rank_fraction=None, energy=0.75).rank_for(ev) == 2  # 15/20
    assert StorageConfig(format="compact", rank_fraction=0.2, energy=0.99).rank_for(ev) == 2


@pytest.mark.parametrize("eigvec_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("remainder", ["diagonal", "isotropic"])
def test_factor_compression_is_psd_keeps_the_diagonal_or_trace_and_is_exact_at_full_rank(
    remainder: str, eigvec_dtype: str
) -> None:
    """F̃ = U diag(w) Uᵀ + diag(r) of a full-rank 9 × 9 factor at rank 3 (see :mod:`hf_kfac.compact`):

    - diagonal remainder: diag(F̃) = diag(F) to float32 round-off, with bf16 or float32 U (r is
      computed with the stored U), hence tr F̃ = tr F too;
    - isotropic remainder: r = σ·1 with σ the mean of the 6 discarded eigenvalues (from an
      independent float64 eigvalsh), and tr F̃ = tr F to round-off with float32 U, to U's bf16
      rounding (relative 2⁻⁸ per entry) with bf16 U;
    - both PSD, and equal to F at full rank with float32 U.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 30, generator=g) * torch.linspace(0.1, 3, 9).unsqueeze(1)
    F = x @ x.T / 30
    low = compress_factor(F, StorageConfig(format="compact", rank_fraction=0.3, remainder=remainder,
                                           eigenvector_dtype=eigvec_dtype))
    assert low.rank == 3 and low.eigvecs.dtype == getattr(torch, eigvec_dtype)
    dense = low.dense(torch.float64)
    assert torch.linalg.eigvalsh(dense).min() > -1e-6
    diag_f = torch.diagonal(F).double()
    if remainder == "diagonal":
        torch.testing.assert_close(torch.diagonal(dense), diag_f, rtol=1e-6, atol=1e-7)
        assert float(torch.trace(dense)) == pytest.approx(float(diag_f.sum()), rel=1e-6)
    else:
        discarded = torch.linalg.eigvalsh(F.double())[:6]  # ascending: the 6 smallest
        torch.testing.assert_close(low.residual.double(), discarded.mean().expand(9), rtol=1e-5, atol=0.0)
        rel = 1e-6 if eigvec_dtype == "float32" else 2.0**-7
        assert float(torch.trace(dense)) == pytest.approx(float(diag_f.sum()), rel=rel)
    if eigvec_dtype == "float32":
        full = compress_factor(F, StorageConfig(format="compact", rank_fraction=1.0, remainder=remainder,
                                                eigenvector_dtype="float32"))
        torch.testing.assert_close(full.dense(), F, rtol=1e-5, atol=1e-6)


def test_diagonal_remainder_is_clamped_to_stay_psd_where_rounded_eigenvectors_overshoot() -> None:
    """F of rank 3 kept at rank 3 with bf16 U: the rounded U Λ Uᵀ may exceed diag(F) at a coordinate, where
    r = max(diag(F − U Λ Uᵀ), 0) = 0 keeps F̃ PSD. There diag(F̃) exceeds diag(F) by at most U's rounding,
    a factor (1 + 2⁻⁸)² per squared entry; elsewhere it equals diag(F)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(9, 3, generator=g)
    F = y @ y.T
    low = compress_factor(F, StorageConfig(format="compact", rank=3, rank_fraction=None, remainder="diagonal"))
    assert low.rank == 3 and (low.residual >= 0).all()
    u = low.eigvecs.double()
    top = (u.square() * low.eigvals.double()).sum(1)
    diag_f = torch.diagonal(F).double()
    overshoot = top > diag_f
    assert overshoot.any()  # the case this test is about occurs
    assert (low.residual[overshoot] == 0).all()
    got = torch.diagonal(low.dense(torch.float64))
    assert torch.linalg.eigvalsh(low.dense(torch.float64)).min() > -1e-6
    assert (got >= diag_f * (1 - 1e-6)).all() and (got <= diag_f * (1 + 2.0**-8) ** 2 + 1e-6).all()
    torch.testing.assert_close(got[~overshoot], diag_f[~overshoot], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("accumulation", ["separate", "merge"])
@pytest.mark.parametrize("remainder", ["diagonal", "isotropic"])
def test_full_rank_compact_penalty_equals_full_penalty(tiny_setup, accumulation: str, remainder: str) -> None:
    model, curvs = tiny_setup
    full, comp = _prior_pair(model, curvs, dict(EXACT, remainder=remainder), accumulation=accumulation, damping=1e-3)
    assert all(is_compact(b) for s in comp.slots for b in s.curvature.kfac.values())
    m = copy.deepcopy(model)
    _perturb(m, 0.05, 3)
    pf, pc = full.penalty(m, 2.0), comp.penalty(m, 2.0)
    torch.testing.assert_close(pc, pf, rtol=1e-5, atol=1e-8)
    gf = torch.autograd.grad(pf, list(m.parameters()), allow_unused=True)
    gc = torch.autograd.grad(pc, list(m.parameters()), allow_unused=True)
    for a, b in zip(gf, gc):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_bf16_full_rank_is_within_rounding(tiny_setup) -> None:
    model, curvs = tiny_setup
    full, comp = _prior_pair(model, curvs, {"format": "compact", "rank_fraction": 1.0})
    m = copy.deepcopy(model)
    _perturb(m, 0.05, 4)
    assert float(comp.penalty(m, 1.0).detach()) == pytest.approx(float(full.penalty(m, 1.0).detach()), rel=1e-2)


@pytest.mark.parametrize("remainder", ["diagonal", "isotropic"])
@pytest.mark.parametrize("rank_fraction", [0.25, 0.75])
def test_closed_form_gradient_matches_autograd_on_the_dense_compact_form(tiny_setup, remainder: str, rank_fraction: float) -> None:
    model, curvs = tiny_setup
    prior = Prior(shape="kfac", damping=1e-2, task_weighting="uniform", decay=0.5,
                  storage={"format": "compact", "rank_fraction": rank_fraction, "remainder": remainder})
    for i, c in enumerate(curvs):
        prior.add_task(model, c, f"t{i}")
    m = copy.deepcopy(model)
    _perturb(m, 0.05, 5)
    ours = prior.penalty(m, 1.3)
    ref = dense_compact_penalty(dict(m.named_parameters()), prior, 1.3)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-8)
    g_ours = torch.autograd.grad(ours, list(m.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad(ref, list(m.parameters()), allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_compact_is_within_one_percent_at_the_default_setting_on_a_small_model() -> None:
    """The benchmark's setting (rank_fraction 0.25, diagonal remainder, bf16) on a small BERT."""
    cfg = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
               max_position_embeddings=32, num_labels=4)
    model = _tiny(1, **cfg)
    _train_steps(model, _batches(300, 16, 12, 8, 10, 4), lr=3e-3)  # a little structure in the weights
    curv = estimate_fisher(model, _batches(300, 32, 12, 6, 11, 4), shape="kfac", fisher_type="mc", progress=False)
    full, comp = _prior_pair(model, [curv], "compact", accumulation="merge")
    trained = copy.deepcopy(model)
    _train_steps(trained, _batches(300, 16, 12, 4, 12, 4), lr=1e-3)  # another task's data
    rnd = copy.deepcopy(model)
    _perturb(rnd, 1e-3, 6)
    for m in (trained, rnd):
        pf, pc = float(full.penalty(m, 1.0).detach()), float(comp.penalty(m, 1.0).detach())
        assert abs(pc - pf) <= 0.01 * pf, (pc, pf)
    assert comp.nbytes(anchors=False) < full.nbytes(anchors=False)


def test_compact_round_trip_is_bit_exact_and_keeps_bf16(tiny_setup, tmp_path: Path) -> None:
    model, curvs = tiny_setup
    _, comp = _prior_pair(model, curvs, "compact", damping=1e-3)
    folder = comp.save_pretrained(tmp_path / "fisher")
    cfg = json.loads((folder / "prior_config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["prior"]["storage"]["format"] == "compact"
    loaded = Prior.from_pretrained(folder, model=model)
    a, b = comp.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == (torch.bfloat16 if k.endswith(".eigvecs") else torch.float32), k
        assert torch.equal(a[k], b[k]), k
    assert loaded.config == comp.config
    m = copy.deepcopy(model)
    _perturb(m, 0.05, 7)
    # the tensors are equal bit for bit (above); the products may differ in the last bit with layout
    torch.testing.assert_close(loaded.penalty(m, 1.0), comp.penalty(m, 1.0), rtol=1e-6, atol=0.0)


def test_full_priors_keep_format_version_1(tiny_setup, tmp_path: Path) -> None:
    model, curvs = tiny_setup
    full = Prior(shape="kfac")
    full.add_task(model, curvs[0], "a")
    folder = full.save_pretrained(tmp_path / "fisher", model=model)  # no reference for a full prior
    cfg = json.loads((folder / "prior_config.json").read_text())
    assert cfg["format_version"] == 1 and "anchor_ref" not in cfg["slots"][0]


def _rewrite(folder: Path, key: str, value: torch.Tensor) -> None:
    path = folder / "prior.safetensors"
    tensors = load_file(str(path))
    tensors[key] = value
    save_file(tensors, str(path))
    cfg = json.loads((folder / "prior_config.json").read_text())
    cfg["files"]["prior.safetensors"] = ser.sha256_file(path)
    (folder / "prior_config.json").write_text(json.dumps(cfg))


def test_bf16_is_allowed_for_eigenvectors_only(tiny_setup, tmp_path: Path) -> None:
    model, curvs = tiny_setup
    _, comp = _prior_pair(model, curvs[:1], "compact")
    folder = comp.save_pretrained(tmp_path / "fisher")
    sd = comp.state_dict()
    vals = next(k for k in sd if k.endswith(".eigvals"))
    _rewrite(folder, vals, sd[vals].bfloat16())
    with pytest.raises(PriorFileError, match="dtype bfloat16"):
        Prior.from_pretrained(folder)
    _rewrite(folder, vals, sd[vals])
    vecs = next(k for k in sd if k.endswith(".eigvecs"))
    _rewrite(folder, vecs, sd[vecs].half())
    with pytest.raises(PriorFileError, match="dtype float16"):
        Prior.from_pretrained(folder)
    _rewrite(folder, vecs, sd[vecs])
    res = next(k for k in sd if k.endswith(".residual"))
    _rewrite(folder, res, -sd[res] - 1)
    with pytest.raises(PriorFileError, match="negative"):
        Prior.from_pretrained(folder)


def test_anchor_is_stored_by_reference_only_when_it_equals_the_model(tiny_setup, tmp_path: Path) -> None:
    model, curvs = tiny_setup
    _, comp = _prior_pair(model, curvs, "compact", accumulation="merge")
    folder = comp.save_pretrained(tmp_path / "ref", model=model)
    cfg = json.loads((folder / "prior_config.json").read_text())
    assert "anchor_ref" in cfg["slots"][0] and not any(".anchor." in k for k in cfg["weight_map"])
    with pytest.raises(PriorFileError, match="reference to the model weights"):
        Prior.from_pretrained(folder)
    loaded = Prior.from_pretrained(folder, model=model)
    for k, v in comp.slots[0].anchor.items():
        assert torch.equal(loaded.slots[0].anchor[k], v)
    moved = copy.deepcopy(model)
    _perturb(moved, 1e-3, 8)
    with pytest.raises(PriorFileError, match="other weights"):
        Prior.from_pretrained(folder, model=moved)
    # mid-task: the weights moved on, so the anchor is stored in full and loads without the model
    mid = comp.save_pretrained(tmp_path / "mid", model=moved)
    cfg = json.loads((mid / "prior_config.json").read_text())
    assert "anchor_ref" not in cfg["slots"][0]
    again = Prior.from_pretrained(mid)
    for k, v in comp.slots[0].anchor.items():
        assert torch.equal(again.slots[0].anchor[k], v)
    # same numbers; the products may run through differently laid-out tensors, so not bit for bit
    torch.testing.assert_close(again.penalty(moved, 1.0), comp.penalty(moved, 1.0), rtol=1e-6, atol=0.0)
    # anchor="copy" never references
    copy_prior = Prior(shape="kfac", accumulation="merge", storage={"format": "compact", "anchor": "copy"})
    copy_prior.add_task(model, curvs[0], "a")
    cfg = json.loads((copy_prior.save_pretrained(tmp_path / "copy", model=model) / "prior_config.json").read_text())
    assert "anchor_ref" not in cfg["slots"][0]


def test_compact_prior_is_smaller_and_merge_stays_constant() -> None:
    """Curvature bytes after 1, 2 and 3 tasks (each with its own Fisher): constant with ``merge`` (full and
    compact, anchors included), t times the one-task size with ``separate``; compact is under 35% of full,
    with rank ceil(d / 4) per factor."""
    cfg = dict(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=256,
               max_position_embeddings=16)
    big = _tiny(2, **cfg)
    curvs = [estimate_fisher(big, _batches(50, 8, 6, 1, s), shape="kfac", fisher_type="mc", progress=False)
             for s in (3, 4, 5)]
    sizes: dict[tuple[str, str], list[tuple[int, int]]] = {}
    merged_compact = None
    for accumulation in ("merge", "separate"):
        full, comp = Prior(shape="kfac", accumulation=accumulation), Prior(shape="kfac", accumulation=accumulation,
                                                                          storage="compact")
        for i, c in enumerate(curvs):
            for name, prior in (("full", full), ("compact", comp)):
                prior.add_task(big, c, f"t{i}")
                sizes.setdefault((accumulation, name), []).append((prior.nbytes(anchors=False), prior.nbytes()))
        if accumulation == "merge":
            merged_compact = comp
    for name in ("full", "compact"):
        merged, separate = sizes[("merge", name)], sizes[("separate", name)]
        assert merged == [merged[0]] * 3, (name, merged)
        assert separate == [(t * separate[0][0], t * separate[0][1]) for t in (1, 2, 3)], (name, separate)
        assert separate[0] == merged[0]
    assert sizes[("merge", "compact")][-1][0] < 0.35 * sizes[("merge", "full")][-1][0]
    comp_block = next(iter(merged_compact.slots[0].curvature.kfac.values()))
    assert isinstance(comp_block, CompactKFACBlock) and isinstance(comp_block.A, CompactFactor)
    assert comp_block.A.rank == -(-comp_block.A.dim // 4)


@pytest.mark.parametrize("remainder", ["diagonal", "isotropic"])
def test_randomized_top_eigenpairs_match_the_spectrum_known_by_construction(remainder: str, monkeypatch) -> None:
    """A 1100 × 1100 factor F = Q diag(λ) Qᵀ with a chosen orthonormal Q and λ = logspace(3, -3) takes the
    subspace-iteration path at rank_fraction 0.25 (k = 275). Its eigenpairs must be Q's columns and λ, and
    F̃ the truncation built from them: Q_k Λ_k Q_kᵀ + diag(diag(F − Q_k Λ_k Q_kᵀ)) (diagonal remainder) or
    Q_k (Λ_k − σ) Q_kᵀ + σ I with σ the mean of the discarded λ (isotropic)."""
    from hf_kfac import compact

    calls = []
    real = compact._randomized_top_eigh
    monkeypatch.setattr(compact, "_randomized_top_eigh", lambda F, k, *a, **kw: calls.append(k) or real(F, k, *a, **kw))
    g = torch.Generator().manual_seed(0)
    d, k = 1100, 275
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    spectrum = torch.logspace(3, -3, d, dtype=torch.float64)
    F = ((q * spectrum) @ q.T).float()
    cfg = StorageConfig(format="compact", rank_fraction=0.25, remainder=remainder, eigenvector_dtype="float32")
    fast = compress_factor(F, cfg)
    assert calls == [k] and fast.rank == k  # the randomized path ran
    qk, lk = q[:, :k], spectrum[:k]
    if remainder == "isotropic":
        sigma = spectrum[k:].mean()
        assert float(fast.residual[0]) == pytest.approx(float(sigma), rel=1e-2)
        torch.testing.assert_close(fast.residual, fast.residual[:1].expand(d), rtol=0.0, atol=0.0)
        found = fast.eigvals.double() + fast.residual.double()[0]
        ref = (qk * (lk - sigma)) @ qk.T + sigma * torch.eye(d, dtype=torch.float64)
    else:
        found = fast.eigvals.double()
        top = (qk * lk) @ qk.T
        ref = top + torch.diag(torch.diagonal(F.double()) - torch.diagonal(top))
    # a flat spectrum (adjacent eigenvalues 1.3% apart) converges slowly at the cut: the leading pairs are
    # tight, the last ones close
    torch.testing.assert_close(found[:200], lk[:200], rtol=1e-4, atol=0.0)
    torch.testing.assert_close(found, lk, rtol=3e-2, atol=0.0)
    cosines = (qk[:, :200] * fast.eigvecs[:, :200].double()).sum(0).abs()
    assert float(cosines.min()) > 1 - 1e-4
    dense = fast.dense(torch.float64)
    assert float((dense - ref).norm() / ref.norm()) < 1e-2
    if remainder == "diagonal":
        torch.testing.assert_close(torch.diagonal(dense), torch.diagonal(F.double()), rtol=1e-5, atol=1e-6)


def test_bf16_products_stay_close_to_float32(tiny_setup) -> None:
    model, curvs = tiny_setup
    fp = Prior(shape="kfac", storage={"format": "compact", "rank_fraction": 0.25})
    bf = Prior(shape="kfac", storage={"format": "compact", "rank_fraction": 0.25, "compute_dtype": "bfloat16"})
    for p in (fp, bf):
        p.add_task(model, curvs[0], "a")
    m = copy.deepcopy(model)
    _perturb(m, 0.05, 9)
    a, b = fp.penalty(m, 1.0), bf.penalty(m, 1.0)
    assert float(b.detach()) == pytest.approx(float(a.detach()), rel=1e-2)
    ga = torch.cat([g.reshape(-1) for g in torch.autograd.grad(a, list(m.parameters()), allow_unused=True) if g is not None])
    gb = torch.cat([g.reshape(-1) for g in torch.autograd.grad(b, list(m.parameters()), allow_unused=True) if g is not None])
    assert float((ga - gb).norm() / ga.norm()) < 2e-2
    with pytest.raises(ValueError, match="compute_dtype"):
        StorageConfig(format="compact", compute_dtype="float16")
