"""The diagonal Fisher equals the mean of per-example squared gradients (brute force)."""

from __future__ import annotations

import pytest
import torch
from oracles import brute_force_diag, tiny_bert_config
from transformers import BertForSequenceClassification, BertForTokenClassification

from hf_kfac import estimate_fisher


def _seq_batches(batch_size: int, n: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, 6), generator=g)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    ids[mask == 0] = 0
    labels = torch.randint(0, 3, (n,), generator=g)
    return [
        {"input_ids": ids[s : s + batch_size], "attention_mask": mask[s : s + batch_size], "labels": labels[s : s + batch_size]}
        for s in range(0, n, batch_size)
    ]


def _token_batches(batch_size: int, n: int = 4, seed: int = 1) -> list[dict]:
    out = _seq_batches(batch_size, n, seed)
    g = torch.Generator().manual_seed(seed + 10)
    for b in out:
        labels = torch.randint(0, 3, b["input_ids"].shape, generator=g)
        labels[b["attention_mask"] == 0] = -100
        labels[:, 0] = -100  # e.g. [CLS] is never labelled
        b["labels"] = labels
    return out


@pytest.mark.parametrize("fisher_type", ["empirical", "exact"])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("task", ["sequence", "token"])
def test_diag_equals_brute_force_per_example_squares(fisher_type: str, batch_size: int, task: str) -> None:
    torch.manual_seed(0)
    if task == "sequence":
        model = BertForSequenceClassification(tiny_bert_config())
        batches = _seq_batches(batch_size)
    else:
        model = BertForTokenClassification(tiny_bert_config())
        batches = _token_batches(batch_size)
    curv = estimate_fisher(model, batches, shape="diag", fisher_type=fisher_type, progress=False)
    ref = brute_force_diag(model, batches, fisher_type)
    assert set(curv.diag) == set(ref)
    assert curv.n_examples == 4
    for name, expected in ref.items():
        torch.testing.assert_close(curv.diag[name], expected, rtol=1e-4, atol=1e-7, msg=name)


def test_diag_is_not_the_square_of_the_batch_mean_gradient() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    full = _seq_batches(4)
    curv = estimate_fisher(model, full, shape="diag", fisher_type="empirical", progress=False)
    one_by_one = estimate_fisher(model, _seq_batches(1), shape="diag", fisher_type="empirical", progress=False)
    name = "classifier.weight"
    torch.testing.assert_close(curv.diag[name], one_by_one.diag[name], rtol=1e-5, atol=1e-8)
    # the common bug, squaring the mean gradient of the batch, gives something else
    model.eval()
    loss = model(**full[0]).loss
    g = torch.autograd.grad(-loss, model.classifier.weight)[0]
    assert not torch.allclose(g**2, curv.diag[name], rtol=1e-2)


def test_mc_diag_converges_to_exact() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    batches = _seq_batches(4)
    exact = estimate_fisher(model, batches, shape="diag", fisher_type="exact", progress=False)
    mc = estimate_fisher(model, batches, shape="diag", fisher_type="mc", n_samples=1500, progress=False)
    for name in ["classifier.weight", "bert.encoder.layer.1.output.dense.weight", "bert.embeddings.word_embeddings.weight"]:
        rel = (mc.diag[name] - exact.diag[name]).norm() / exact.diag[name].norm()
        assert rel < 0.08, (name, rel)


def test_frozen_parameters_are_left_out() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    curv = estimate_fisher(model, _seq_batches(2), shape="diag", fisher_type="empirical", progress=False)
    assert not any(k.startswith("bert.embeddings") for k in curv.diag)
    assert "classifier.weight" in curv.diag
