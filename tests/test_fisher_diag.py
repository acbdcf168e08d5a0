"""The diagonal Fisher equals the mean of per-example squared gradients (brute force)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from oracles import brute_force_diag, tiny_bert_config
from torch import nn
from transformers import BertForSequenceClassification, BertForTokenClassification

from hf_kfac import PredictiveOutput, estimate_fisher


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


def test_excluding_a_module_leaves_out_every_parameter_inside_it_and_an_unmatched_pattern_is_reported(caplog) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    frozen = BertForSequenceClassification(tiny_bert_config())
    for p in frozen.bert.embeddings.parameters():
        p.requires_grad_(False)
    with caplog.at_level(logging.WARNING):
        curv = estimate_fisher(model, _seq_batches(2), shape="diag", fisher_type="empirical",
                               exclude=["bert.embeddings", "bert.embedings.*"], progress=False)
    ref = estimate_fisher(frozen, _seq_batches(2), shape="diag", fisher_type="empirical", progress=False)
    assert sorted(curv.diag) == sorted(ref.diag)  # the same as freezing the module
    assert "['bert.embedings.*'] match no module or parameter" in caplog.text  # only the misspelt one


def test_every_module_keeps_its_own_train_or_eval_mode() -> None:
    """The estimate runs in eval mode, then gives each module back its own flag, not the root's."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(hidden_dropout_prob=0.1))
    model.train()
    model.bert.embeddings.eval()  # e.g. dropout kept off where the user turned it off
    before = {n: m.training for n, m in model.named_modules()}
    estimate_fisher(model, _seq_batches(2), shape="kfac", fisher_type="empirical", progress=False)
    assert {n: m.training for n, m in model.named_modules()} == before
    model.eval()
    model.classifier.train()
    before = {n: m.training for n, m in model.named_modules()}
    estimate_fisher(model, _seq_batches(2), shape="diag", fisher_type="empirical", progress=False)
    assert {n: m.training for n, m in model.named_modules()} == before


# --------------------------------------------------------------- each parameter counted once

def _mlm_batches() -> tuple[nn.Module, list[dict]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
    from trainer_fixtures import batches_of, make_model, make_rows

    return make_model("mlm"), batches_of(make_rows("mlm", 4, seed=4), 2)


@pytest.mark.parametrize("shape", ["diag", "kfac"])
def test_mlm_tied_output_bias_is_counted_once(shape: str) -> None:
    """BERT-MLM's `cls.predictions.bias` is also `decoder.bias`: its Fisher is the brute-force one, not twice it.

    Every other diagonal of the model (the decoder weight tied to the word embeddings included) matches too,
    and every parameter appears exactly once in the result.
    """
    torch.set_num_threads(1)
    model, batches = _mlm_batches()
    assert model.cls.predictions.bias is model.cls.predictions.decoder.bias
    curv = estimate_fisher(model, batches, shape=shape, fisher_type="empirical", progress=False)
    ref = brute_force_diag(model, batches, "empirical")
    covered = curv.param_names()
    assert len(covered) == len(set(covered)) and set(covered) == set(ref)
    assert "cls.predictions.bias" in curv.diag
    if shape == "diag":
        assert set(curv.diag) == set(ref)
    for name in curv.diag:
        torch.testing.assert_close(curv.diag[name], ref[name], rtol=1e-4, atol=1e-8, msg=name)


class _Holder(nn.Module):
    """Holds `bias`, which is also `proj.bias` (as in BERT-MLM); ``read_directly`` also adds it itself."""

    def __init__(self, d: int, c: int, read_directly: bool) -> None:
        super().__init__()
        self.bias = nn.Parameter(0.1 * torch.randn(c))
        self.proj = nn.Linear(d, c)
        self.proj.bias = self.bias
        self.read_directly = read_directly

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.proj(h)
        return out + self.bias if self.read_directly else out


class _BareParameters(nn.Module):
    """A bare nn.Parameter of the top module used in forward, and a tied head bias."""

    def __init__(self, read_directly: bool, vocab: int = 40, d: int = 5, c: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        self.head = _Holder(d, c, read_directly)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.emb(input_ids) * self.scale))


@pytest.mark.parametrize("shape", ["diag", "kfac"])
@pytest.mark.parametrize("read_directly", [False, True])
def test_bare_and_tied_parameters_match_brute_force(read_directly: bool, shape: str) -> None:
    """A bare parameter (exact per-example path) and a bias tied between a holder and a Linear, read
    only through the Linear or also by the holder itself: each summed over its uses once, then squared."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _BareParameters(read_directly)
    batches = _token_batches(2)
    curv = estimate_fisher(model, batches, shape=shape, fisher_type="empirical", progress=False)
    ref = brute_force_diag(model, batches, "empirical")
    assert set(curv.diag) == set(ref)
    for name, expected in ref.items():
        torch.testing.assert_close(curv.diag[name], expected, rtol=1e-4, atol=1e-8, msg=name)


# --------------------------------------------------------------- transformers Conv1D (GPT-2)

def _gpt2_batches() -> tuple[list[dict], list[dict]]:
    """Causal-LM batches, and the same with labels shifted by hand for the (unshifting) oracle."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 20, (4, 6), generator=g)
    am = torch.ones_like(ids)
    am[1, 4:] = 0
    am[3, 3:] = 0
    labels = ids.masked_fill(am == 0, -100)
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]  # the oracle's logit t scores token t+1
    est = [{"input_ids": ids[s : s + 2], "attention_mask": am[s : s + 2], "labels": labels[s : s + 2]} for s in (0, 2)]
    oracle = [{**b, "labels": shifted[s : s + 2]} for b, s in zip(est, (0, 2))]
    return est, oracle


@pytest.mark.parametrize("shape", ["diag", "kfac"])
def test_gpt2_conv1d_diagonal_matches_brute_force_and_kfac_records_why(shape: str, caplog: pytest.LogCaptureFixture) -> None:
    """GPT-2's Conv1D (y = x W + b, W (in, out)) gets a fast exact diagonal; under shape='kfac' each is
    listed in diag_fallbacks with the reason and a warning says K-FAC was not applied."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager")
    model = GPT2LMHeadModel(config)
    batches, oracle_batches = _gpt2_batches()
    with caplog.at_level(logging.WARNING, logger="hf_kfac.curvature.estimate"):
        curv = estimate_fisher(model, batches, shape=shape, fisher_type="empirical", progress=False)
    ref = brute_force_diag(model, oracle_batches, "empirical")
    conv = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv) == 8
    assert set(curv.diag) == set(ref)  # lm_head is tied to wte: no K-FAC block at all
    for name, expected in ref.items():
        torch.testing.assert_close(curv.diag[name], expected, rtol=1e-4, atol=1e-8, msg=name)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "No per-example rule" not in messages  # Conv1D has its own per-example rule
    if shape == "kfac":
        assert all("Conv1D" in curv.diag_fallbacks[n] for n in conv)
        assert "K-FAC is not applied" in messages and conv[0] in messages
    else:
        assert curv.diag_fallbacks == {}


# --------------------------------------------------------------- labels

def test_empirical_fisher_rejects_negative_labels_other_than_minus_100() -> None:
    """-1 is not an ignore index: it must raise (naming the value), not be read as class 0."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_bert_config())
    batch = _token_batches(4)[0]
    bad = {**batch, "labels": batch["labels"].clone()}
    bad["labels"][0, 2] = -1
    with pytest.raises(ValueError, match=r"label -1 .*Use -100 for ignored positions"):
        estimate_fisher(model, [bad], shape="diag", fisher_type="empirical", progress=False)
    # a -1 at a position an explicit mask leaves out is never read, so it is accepted (and equals -100 there)
    def masked(m: nn.Module, b: dict) -> PredictiveOutput:
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return PredictiveOutput(logits, b["labels"], "categorical", mask=b["labels"] >= 0)
    ok = estimate_fisher(model, [bad], shape="diag", fisher_type="empirical", predictive_fn=masked, progress=False)
    ignored = {**bad, "labels": bad["labels"].masked_fill(bad["labels"] == -1, -100)}
    ref = estimate_fisher(model, [ignored], shape="diag", fisher_type="empirical", progress=False)
    for name in ref.diag:
        torch.testing.assert_close(ok.diag[name], ref.diag[name], msg=name)
