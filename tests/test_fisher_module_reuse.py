"""Modules called more than once per forward, and parameters read outside their module's call.

Every diagonal is checked against ``brute_force_diag`` (one autograd call per example, which
sums all uses of a parameter before squaring by construction); K-FAC factors of a reused
Linear against hook-collected sums written here.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from oracles import brute_force_diag
from torch import nn

from hf_kfac import PredictiveOutput, estimate_fisher

VOCAB = 11


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _token_batches(n: int = 4, t: int = 6, classes: int = 3, bs: int = 2, seed: int = 0) -> list[dict]:
    """Ragged token-classification batches: padding at the end, -100 labels on padding and at one position."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    am = torch.ones(n, t, dtype=torch.long)
    for i in range(n):
        am[i, t - i % 3 :] = 0
    ids[am == 0] = 0
    labels = torch.randint(0, classes, (n, t), generator=g)
    labels[am == 0] = -100
    labels[0, 1] = -100
    return [{"input_ids": ids[s : s + bs], "attention_mask": am[s : s + bs], "labels": labels[s : s + bs]} for s in range(0, n, bs)]


def _assert_matches_oracle(curv, ref: dict[str, torch.Tensor], names: list[str] | None = None) -> None:
    for name in names if names is not None else list(ref):
        torch.testing.assert_close(curv.diag[name], ref[name], rtol=1e-4, atol=1e-8, msg=name)


def _assert_each_parameter_once(curv, model: nn.Module) -> None:
    covered = curv.param_names()
    assert len(covered) == len(set(covered))
    assert set(covered) == {n for n, _ in model.named_parameters()}


class ReusedModules(nn.Module):
    """One Embedding, one Linear and one LayerNorm, each called twice in every forward."""

    def __init__(self, d: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.lin = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        # the second lookup maps ids so that an example reads some rows in both calls
        h = self.emb(input_ids) + self.emb((input_ids * 3) % VOCAB)
        h = self.ln(self.lin(torch.tanh(self.lin(h))))
        h = self.ln(torch.tanh(h))
        return SimpleNamespace(logits=self.head(h))


@pytest.mark.parametrize("fisher_type", ["empirical", "exact"])
def test_modules_called_twice_square_the_sum_over_calls(fisher_type: str) -> None:
    """(Σ_calls g)² per example for a reused Linear, LayerNorm and Embedding, not Σ_calls g²."""
    torch.manual_seed(0)
    model = ReusedModules()
    batches = _token_batches()
    # the oracle's premise: some example reads the same embedding row in both calls
    ids = batches[0]["input_ids"][0]
    assert set(ids.tolist()) & set(((ids * 3) % VOCAB).tolist())
    curv = estimate_fisher(model, batches, shape="diag", fisher_type=fisher_type, progress=False)
    ref = brute_force_diag(model, batches, fisher_type)
    assert set(curv.diag) == set(ref)
    _assert_matches_oracle(curv, ref)


def test_reused_modules_outside_kfac_blocks_are_exact_under_kfac_shape() -> None:
    """With shape='kfac' the reused Linear is a K-FAC block; the reused LayerNorm and Embedding stay exact."""
    torch.manual_seed(0)
    model = ReusedModules()
    batches = _token_batches()
    curv = estimate_fisher(model, batches, shape="kfac", fisher_type="empirical", progress=False)
    assert {"lin", "head"} <= set(curv.kfac)
    _assert_each_parameter_once(curv, model)
    ref = brute_force_diag(model, batches, "empirical")
    _assert_matches_oracle(curv, ref, ["emb.weight", "ln.weight", "ln.bias"])


def test_kfac_treats_the_calls_of_a_reused_linear_as_extra_positions() -> None:
    """expand: A = mean over both calls' valid positions of [a;1][a;1]ᵀ, G = (1/N) Σ_calls Σ_t g gᵀ (hooks + autograd)."""
    torch.manual_seed(0)
    model = ReusedModules()
    batches = _token_batches()
    curv = estimate_fisher(model, batches, shape="kfac", fisher_type="empirical", kfac_approx="expand", progress=False)
    model.eval()
    rows_a, rows_g, n_total = [], [], 0
    for batch in batches:
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        hook = model.lin.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o)))
        logits = model(batch["input_ids"]).logits
        hook.remove()
        ll = -nn.functional.cross_entropy(logits.reshape(-1, 3), batch["labels"].reshape(-1), reduction="sum")
        gs = torch.autograd.grad(ll, [o for _, o in seen])
        valid = batch["attention_mask"].bool()
        assert len(seen) == 2
        for (a, _), g in zip(seen, gs):
            rows_a.append(torch.cat([a, torch.ones(*a.shape[:-1], 1)], -1)[valid])
            rows_g.append(g[valid])
        n_total += logits.shape[0]
    a, g = torch.cat(rows_a), torch.cat(rows_g)
    torch.testing.assert_close(curv.kfac["lin"].A, a.T @ a / a.shape[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(curv.kfac["lin"].G, g.T @ g / n_total, rtol=1e-5, atol=1e-8)


def test_albert_shared_layer_group_matches_brute_force() -> None:
    """ALBERT runs one layer group num_hidden_layers times: every weight of it is a reused module."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.manual_seed(0)
    config = AlbertConfig(
        vocab_size=VOCAB, embedding_size=6, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=10, max_position_embeddings=8, num_labels=3, attn_implementation="eager",
    )
    model = AlbertForSequenceClassification(config)
    batches = _token_batches(n=4, bs=2)
    for b in batches:
        b["labels"] = torch.tensor([0, 2]) if b is batches[0] else torch.tensor([1, 1])
    curv = estimate_fisher(model, batches, shape="diag", fisher_type="empirical", progress=False)
    ref = brute_force_diag(model, batches, "empirical")
    assert set(curv.diag) == set(ref)
    _assert_matches_oracle(curv, ref)


class DirectReads(nn.Module):
    """Linears whose weights are read without calling them, and one that is never read."""

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)  # out_proj is read by F.multi_head_attention_forward
        self.head = nn.Linear(d, classes)  # read as h @ W.T + b, never called
        self.unused = nn.Linear(d, d)  # never read: its Fisher is exactly zero

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        h = self.emb(input_ids)
        h, _ = self.attn(h, h, h, key_padding_mask=attention_mask == 0, need_weights=False)
        return SimpleNamespace(logits=h @ self.head.weight.T + self.head.bias)


@pytest.mark.parametrize("shape", ["diag", "kfac"])
def test_weights_read_outside_the_module_call_match_brute_force(shape: str, caplog: pytest.LogCaptureFixture) -> None:
    """MultiheadAttention.out_proj and an uncalled head get their exact Fisher (not zero); an unused Linear gets zero."""
    torch.manual_seed(0)
    model = DirectReads()
    batches = _token_batches()
    with caplog.at_level(logging.WARNING, logger="hf_kfac.curvature.estimate"):
        curv = estimate_fisher(model, batches, shape=shape, fisher_type="empirical", progress=False)
    ref = brute_force_diag(model, batches, "empirical")
    direct = ["attn.out_proj.weight", "attn.out_proj.bias", "head.weight", "head.bias"]
    warning = " ".join(r.getMessage() for r in caplog.records if "outside the forward call" in r.getMessage())
    for name in direct:
        assert ref[name].abs().max() > 0, name
        assert name in warning, name
    assert "unused" not in warning
    _assert_each_parameter_once(curv, model)
    _assert_matches_oracle(curv, ref, [n for n in ref if not n.startswith("unused.")])
    if shape == "diag":
        assert torch.equal(curv.diag["unused.weight"], torch.zeros(4, 4))
    else:
        assert {"attn.out_proj", "head"} <= set(curv.diag_fallbacks)
        assert torch.equal(curv.kfac["unused"].A, torch.zeros(5, 5))
        assert torch.equal(curv.kfac["unused"].G, torch.zeros(4, 4))


class _ScaledEmbedding(nn.Embedding):
    """out = E[ids] · 3 (as Gemma's or BART's scaled word embeddings)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * 3.0


class _PositionEmbedding(nn.Embedding):
    """Looks up positions 0..T-1, not its argument (as BART's and OPT's learned positional embeddings)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.arange(input_ids.shape[1]).expand_as(input_ids))


class _PassThroughLinear(nn.Linear):
    """Overrides forward but still is the plain op: keeps the fast rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class CustomForwards(nn.Module):
    def __init__(self, d: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.emb = _ScaledEmbedding(VOCAB, d)
        self.pos = _PositionEmbedding(6, d)
        self.head = _PassThroughLinear(d, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(torch.tanh(self.emb(input_ids) + self.pos(input_ids))))


def test_subclasses_whose_forward_is_not_the_plain_op_match_brute_force(caplog: pytest.LogCaptureFixture) -> None:
    """A scaled embedding and a positional embedding that ignores its argument get their exact Fisher
    (and a warning naming them); a subclass whose forward is the plain op keeps the fast rule."""
    torch.manual_seed(0)
    model = CustomForwards()
    batches = _token_batches()
    with caplog.at_level(logging.WARNING, logger="hf_kfac.curvature.estimate"):
        curv = estimate_fisher(model, batches, shape="diag", fisher_type="empirical", progress=False)
    ref = brute_force_diag(model, batches, "empirical")
    _assert_matches_oracle(curv, ref)
    warning = " ".join(r.getMessage() for r in caplog.records if "overrides" in r.getMessage() or "forward that is not" in r.getMessage())
    assert "emb (_ScaledEmbedding)" in warning and "pos (_PositionEmbedding)" in warning
    assert "head" not in warning


def test_gemma_scaled_word_embedding_matches_brute_force() -> None:
    """Gemma multiplies the looked-up rows by √d inside its embedding's forward (and ties it to lm_head)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    config = GemmaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=10, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=4, pad_token_id=0, attn_implementation="eager")
    model = GemmaForCausalLM(config)
    batches = _token_batches()
    for b in batches:
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    oracle = []
    for b in batches:  # the oracle does not shift: logit t scores token t+1
        shifted = torch.full_like(b["labels"], -100)
        shifted[:, :-1] = b["labels"][:, 1:]
        oracle.append({**b, "labels": shifted})
    curv = estimate_fisher(model, batches, shape="diag", fisher_type="empirical", progress=False)
    ref = brute_force_diag(model, oracle, "empirical")
    assert set(curv.diag) == set(ref)
    _assert_matches_oracle(curv, ref)


@pytest.mark.parametrize("how", ["torch.compile", "module.compile", "submodule"])
def test_a_compiled_model_is_refused_because_its_hooks_see_no_layer_gradients(how: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    if how == "torch.compile":
        target: nn.Module = torch.compile(model, backend="eager")
    elif how == "module.compile":
        model.compile(backend="eager")
        target = model
    else:
        model[0] = torch.compile(model[0], backend="eager")
        target = model
    batches = [{"input": torch.randn(3, 4), "labels": torch.tensor([0, 1, 0])}]
    with pytest.raises(ValueError, match=r"compiled .*_orig_mod"):
        estimate_fisher(target, batches, shape="diag", fisher_type="empirical", progress=False,
                        predictive_fn=lambda m, b: PredictiveOutput(m(b["input"]), b["labels"]))


@pytest.mark.parametrize("shape", ["diag", "kfac"])
def test_an_output_modified_in_place_after_the_call_matches_brute_force(shape: str, caplog) -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
            h = self.a(input_ids)
            h.mul_(2.0)  # the hook saw h before this: its gradient w.r.t. the module's output is off by 2
            return SimpleNamespace(logits=self.b(torch.tanh(h)))

    torch.manual_seed(0)
    model = InPlace()
    batches = [{"input_ids": torch.randn(6, 4), "labels": torch.randint(0, 3, (6,))} for _ in range(2)]
    with caplog.at_level(logging.WARNING):
        curv = estimate_fisher(model, batches, shape=shape, fisher_type="empirical", progress=False)
    ref = brute_force_diag(model, batches, "empirical")
    for name in ("a.weight", "a.bias"):
        torch.testing.assert_close(curv.diag[name], ref[name], rtol=1e-4, atol=1e-7)
    assert "modified in place" in caplog.text and "a" in caplog.text


def _mpnet() -> nn.Module:
    from transformers import MPNetConfig, MPNetForSequenceClassification

    return MPNetForSequenceClassification(MPNetConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=32, num_labels=3))


def _deberta() -> nn.Module:
    from transformers import DebertaConfig, DebertaForSequenceClassification

    return DebertaForSequenceClassification(DebertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3,
        relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=8))


@pytest.mark.parametrize("make", [_mpnet, _deberta], ids=["mpnet-relative-bias", "deberta-relative-attention"])
def test_relative_position_encoders_match_brute_force(make, caplog) -> None:
    """MPNet looks its bias up on a (T, T) grid; DeBERTa scales a broadcast projection in place."""
    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(3, 50, (4, 7))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (4,))}]
    with caplog.at_level(logging.WARNING):
        curv = estimate_fisher(model, batches, shape="diag", fisher_type="empirical", progress=False)
    ref = brute_force_diag(model, batches, "empirical")
    assert curv.diag.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(curv.diag[name], ref[name], rtol=1e-4, atol=1e-9, msg=name)
