"""Factors stay float32 and close to the float32 run under bf16 autocast or a bf16 model."""

from __future__ import annotations

import copy

import pytest
import torch
from oracles import tiny_bert_config
from transformers import BertForSequenceClassification

from hf_kfac import Prior, estimate_fisher


def _batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (16, 8), generator=g)
    am = torch.ones_like(ids)
    am[::3, 5:] = 0
    return [{"input_ids": ids[i : i + 8], "attention_mask": am[i : i + 8], "labels": torch.randint(0, 3, (8,), generator=g)} for i in (0, 8)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("shape", ["kfac", "diag"])
def test_bf16_autocast_gives_float32_factors_close_to_float32(shape: str) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(hidden_size=32, intermediate_size=64, num_attention_heads=4))
    ref = estimate_fisher(model, _batches(), shape=shape, fisher_type="empirical", progress=False)
    amp = estimate_fisher(model, _batches(), shape=shape, fisher_type="empirical", autocast_dtype=torch.bfloat16, progress=False)
    for name, block in ref.kfac.items():
        assert amp.kfac[name].A.dtype == amp.kfac[name].G.dtype == torch.float32
        assert _rel(amp.kfac[name].A, block.A) < 0.03, name
        assert _rel(amp.kfac[name].G, block.G) < 0.1, name
    scale = max(float(d.abs().max()) for d in ref.diag.values()) if ref.diag else 0.0
    for name, d in ref.diag.items():
        assert amp.diag[name].dtype == torch.float32
        if float(d.abs().max()) < 1e-9 * scale:  # exactly zero in theory (e.g. the attention key bias)
            assert float(amp.diag[name].abs().max()) < 1e-6 * scale, name
            continue
        assert _rel(amp.diag[name], d) < 0.1, name


def test_bf16_model_gets_float32_prior_and_penalty() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(hidden_size=32, intermediate_size=64, num_attention_heads=4))
    half = copy.deepcopy(model).to(torch.bfloat16)
    ref = estimate_fisher(model, _batches(), shape="kfac", fisher_type="empirical", progress=False)
    curv = estimate_fisher(half, _batches(), shape="kfac", fisher_type="empirical", progress=False)
    assert all(b.A.dtype == torch.float32 for b in curv.kfac.values())
    assert _rel(curv.kfac["bert.pooler.dense"].A, ref.kfac["bert.pooler.dense"].A) < 0.05
    prior = Prior(shape="kfac")
    prior.add_task(half, curv, "a")
    assert all(t.dtype == torch.float32 for t in prior.state_dict().values())
    with torch.no_grad():
        for p in half.parameters():
            p.add_(0.01)
    pen = prior.penalty(half, 1.0)
    assert pen.dtype == torch.float32 and pen.item() > 0
    pen.backward()
    assert half.classifier.weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("storage", ["full", "compact"])
@pytest.mark.parametrize("shape", ["kfac", "diag"])
def test_penalty_inside_autocast_equals_the_float32_penalty(shape: str, storage: str) -> None:
    """A custom loop may call the penalty inside torch.autocast: value and gradient stay float32."""
    if shape == "diag" and storage == "compact":
        pytest.skip("compact storage is for K-FAC factors")
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(hidden_size=32, intermediate_size=64, num_attention_heads=4))
    prior = Prior(shape=shape, storage=storage)
    prior.add_task(model, estimate_fisher(model, _batches(), shape=shape, fisher_type="empirical", progress=False), "a")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref = prior.penalty(model, 2.0)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        amp = prior.penalty(model, 2.0)
    amp.backward()
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, ref, rtol=1e-6, atol=0)
    for n, g in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-6, atol=1e-12, msg=n)
