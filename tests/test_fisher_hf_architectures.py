"""Transformers architectures whose forward needs care, each diagonal checked against ``brute_force_diag``.

- A call broadcast over the batch (a ``(1, ...)`` input) is expanded to one row per example so
  that its output gradient stays per example. That is exact only when the model's predictions do
  not depend on the call's shape; where they do (DeBERTa-v2 repeats its relative-position
  projections by the batch size), the module must go to the exact per-example path instead.
- Encoder-decoder models (T5) need decoder inputs, built from the labels as in training, and each
  call's positions masked by its own side's padding.
- A module whose rows are not the examples (a (T, T) relative-position grid with T = N, rows the
  model reorders) must not be taken for per-example, whatever its shape.
- Causal LMs (OPT) predict the next token: the oracle gets the labels shifted by hand.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from oracles import brute_force_diag
from torch import nn

from hf_kfac import estimate_fisher

BROADCAST_MSG = "called once for the whole batch"
ROWS_MSG = "rows are not the batch's examples"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _assert_matches_brute_force(curv, ref: dict[str, torch.Tensor]) -> None:
    assert curv.diag.keys() == ref.keys()
    scale = max(float(v.abs().max()) for v in ref.values())
    for name in ref:
        torch.testing.assert_close(curv.diag[name], ref[name], rtol=1e-4, atol=1e-7 * scale, msg=name)


def _ids(n: int = 3, t: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (n, t), generator=g)
    am = torch.ones_like(ids)
    am[0, t - 2 :] = 0
    return ids, am


class _SummedBroadcast(nn.Module):
    """Adds ``proj(base).sum(0)`` to its logits, ``base`` of shape (1, D): expanded to (N, D), the
    sum would count the call N times, so the predictions change without any error."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.head = nn.Linear(4, 3)
        self.register_buffer("base", torch.randn(1, 4))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(x) + self.proj(self.base).sum(0))


def _exact_path_matches_brute_force(model: nn.Module, batches: list[dict], shape: str, names: tuple[str, ...],
                                    caplog) -> tuple[object, str]:
    """The estimate's diagonal of ``names`` against ``brute_force_diag``; returns it and the warnings logged."""
    with caplog.at_level(logging.WARNING):
        curv = estimate_fisher(model, batches, shape=shape, fisher_type="empirical", progress=False)
    ref = brute_force_diag(model, batches, "empirical")
    for name in names:
        torch.testing.assert_close(curv.diag[name], ref[name], rtol=1e-4, atol=1e-8, msg=name)
    return curv, caplog.text


@pytest.mark.parametrize("shape", ["diag", "kfac"])
def test_a_broadcast_call_whose_expansion_changes_the_predictions_goes_to_the_exact_path(shape: str, caplog) -> None:
    torch.manual_seed(0)
    model = _SummedBroadcast()
    batches = [{"x": torch.randn(5, 4), "labels": torch.randint(0, 3, (5,))} for _ in range(2)]
    curv, log = _exact_path_matches_brute_force(model, batches, shape, ("proj.weight", "proj.bias"), caplog)
    assert BROADCAST_MSG in log and "proj (Linear)" in log
    assert "proj" not in curv.kfac


@pytest.mark.parametrize("shape", ["diag", "kfac"])
def test_a_first_batch_of_one_example_still_checks_the_broadcast_expansion(shape: str, caplog) -> None:
    """One example shows nothing broadcast; the check runs on it twice, so the later batches of five are
    not expanded unchecked (which counted `proj` five times over)."""
    torch.manual_seed(0)
    model = _SummedBroadcast()
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(n, 4, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)} for n in (1, 5)]
    curv, log = _exact_path_matches_brute_force(model, batches, shape, ("proj.weight", "proj.bias"), caplog)
    assert BROADCAST_MSG in log
    if shape == "diag":
        ref = brute_force_diag(model, batches, "empirical")
        torch.testing.assert_close(curv.diag["head.bias"], ref["head.bias"], rtol=1e-4, atol=1e-8)


def test_deberta_v3_batches_of_one_whose_first_length_is_twice_the_buckets_run_and_match_brute_force() -> None:
    """DeBERTa-v3 normalises its (2k, D) relative embeddings (no batch dimension): a first example of
    length 2k looks like one example's positions, which only a batch of two can tell apart."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=60, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_labels=3,
        relative_attention=True, position_buckets=4, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
        share_att_key=True, norm_rel_ebd="layer_norm", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(4, 60, (1, t), generator=g), "attention_mask": torch.ones(1, t, dtype=torch.long),
                "labels": torch.tensor([1])} for t in (8, 6)]
    curv = estimate_fisher(model, batches, shape="diag", fisher_type="empirical", progress=False)
    _assert_matches_brute_force(curv, brute_force_diag(model, batches, "empirical"))


def _deberta_v2(share_att_key: bool) -> nn.Module:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    return DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=60, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_labels=3,
        relative_attention=True, position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
        share_att_key=share_att_key, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


@pytest.mark.parametrize("share_att_key", [False, True], ids=["own-position-projections", "shared-query-key"])
def test_deberta_v2_relative_attention_matches_brute_force(share_att_key: bool, caplog) -> None:
    """Its relative-position projections run on (1, 2k, D) and are repeated by the batch size."""
    torch.manual_seed(0)
    model = _deberta_v2(share_att_key).eval()
    ids, am = _ids()
    batches = [{"input_ids": ids, "attention_mask": am, "labels": torch.tensor([0, 1, 2])}]
    for fisher_type in ("empirical", "exact"):
        with caplog.at_level(logging.WARNING):
            curv = estimate_fisher(model, batches, shape="diag", fisher_type=fisher_type, progress=False)
        _assert_matches_brute_force(curv, brute_force_diag(model, batches, fisher_type))
    assert BROADCAST_MSG in caplog.text
    kfac = estimate_fisher(model, batches, shape="kfac", fisher_type="exact", progress=False)
    projections = ("query_proj", "key_proj") if share_att_key else ("pos_query_proj", "pos_key_proj")
    for proj in projections:
        name = f"deberta.encoder.layer.0.attention.self.{proj}"
        assert name not in kfac.kfac and "broadcast over the batch" in kfac.diag_fallbacks[name]
    assert "deberta.encoder.layer.0.attention.self.value_proj" in kfac.kfac


def test_bert_position_embeddings_stay_on_the_fast_path(caplog) -> None:
    """BERT adds its (1, T, D) position embeddings: expanding them leaves the predictions unchanged."""
    from oracles import tiny_bert_config
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval()
    ids, am = _ids()
    batches = [{"input_ids": ids % 40, "attention_mask": am, "labels": torch.tensor([0, 1, 2])}]
    with caplog.at_level(logging.WARNING):
        curv = estimate_fisher(model, batches, shape="diag", fisher_type="empirical", progress=False)
    assert BROADCAST_MSG not in caplog.text and "per-example" not in caplog.text
    _assert_matches_brute_force(curv, brute_force_diag(model, batches, "empirical"))


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=60, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2, decoder_start_token_id=0,
        pad_token_id=0, dropout_rate=0.0))


@pytest.mark.parametrize("fisher_type", ["empirical", "exact"])
def test_t5_gets_its_decoder_inputs_from_the_labels_and_matches_brute_force(fisher_type: str) -> None:
    """The decoder reads [start, y_1 .. y_{T-1}] (padding for -100), built here by hand for the oracle."""
    torch.manual_seed(0)
    model = _t5().eval()
    ids, am = _ids()
    labels = torch.randint(3, 50, (3, 4), generator=torch.Generator().manual_seed(1))
    labels[1, 2:] = -100
    batches = [{"input_ids": ids, "attention_mask": am, "labels": labels}]
    decoder_ids = torch.zeros_like(labels)  # decoder_start_token_id = pad = 0
    decoder_ids[:, 1:] = labels[:, :-1].clamp_min(0)
    oracle = [{**batches[0], "decoder_input_ids": decoder_ids}]
    curv = estimate_fisher(model, batches, shape="diag", fisher_type=fisher_type, progress=False)
    _assert_matches_brute_force(curv, brute_force_diag(model, oracle, fisher_type))
    kfac = estimate_fisher(model, batches, shape="kfac", fisher_type=fisher_type, progress=False)
    assert "decoder.block.0.layer.2.DenseReluDense.wo" in kfac.kfac


def _t5_padded_batch(n: int, t: int, length: int) -> tuple[dict, list[dict]]:
    """A right-padded T5 batch (encoder lengths t, t-1, t-2, ...; label lengths length-1, length-2, length, ...)
    and the same examples one per batch, unpadded."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (n, t), generator=g)
    labels = torch.randint(3, 50, (n, length), generator=g)
    am = torch.ones_like(ids)
    lens = [t - i % 3 for i in range(n)]
    label_lens = [length - (i + 1) % 3 for i in range(n)]
    for i in range(n):
        am[i, lens[i]:] = 0
        ids[i, lens[i]:] = 0
        labels[i, label_lens[i]:] = -100
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
    alone = [{"input_ids": ids[i:i + 1, :lens[i]], "attention_mask": am[i:i + 1, :lens[i]],
              "labels": labels[i:i + 1, :label_lens[i]]} for i in range(n)]
    return batch, alone


@pytest.mark.parametrize("n,t,length", [(3, 6, 4), (6, 6, 6)], ids=["lengths-differ", "batch-and-lengths-equal"])
def test_t5_kfac_of_a_padded_batch_equals_kfac_of_each_example_alone(n: int, t: int, length: int) -> None:
    """Decoder positions are masked by the decoder's padding (labels -100 here), encoder positions by the
    attention mask, and the cross-attention keys/values by the encoder's: then padding changes nothing.
    With N = T = T_dec every mask fits every module by shape, so only knowing which side a call is on works."""
    torch.manual_seed(0)
    model = _t5().eval()
    batch, alone = _t5_padded_batch(n, t, length)
    padded = estimate_fisher(model, [batch], shape="kfac", fisher_type="empirical", progress=False)
    ref = estimate_fisher(model, alone, shape="kfac", fisher_type="empirical", progress=False)
    assert padded.kfac.keys() == ref.kfac.keys() and padded.diag.keys() == ref.diag.keys()
    assert "decoder.block.0.layer.1.EncDecAttention.k" in padded.kfac
    for name, block in padded.kfac.items():
        for factor in ("A", "G"):
            r = getattr(ref.kfac[name], factor)
            torch.testing.assert_close(getattr(block, factor), r, rtol=1e-4, atol=1e-6 * float(r.abs().max()),
                                       msg=f"{name}.{factor}")
    for name, d in padded.diag.items():
        torch.testing.assert_close(d, ref.diag[name], rtol=1e-4, atol=1e-7 * float(ref.diag[name].abs().max()),
                                   msg=name)


def test_t5_diagonal_matches_brute_force_when_the_batch_size_equals_the_sequence_lengths(caplog) -> None:
    """Its relative-position bias is looked up on a (T, T) grid: with T = N the rows look like examples."""
    torch.manual_seed(0)
    model = _t5().eval()
    batch, _ = _t5_padded_batch(6, 6, 6)
    decoder_ids = torch.zeros_like(batch["labels"])
    decoder_ids[:, 1:] = batch["labels"][:, :-1].clamp_min(0)
    with caplog.at_level(logging.WARNING):
        curv = estimate_fisher(model, [batch], shape="diag", fisher_type="empirical", progress=False)
    _assert_matches_brute_force(curv, brute_force_diag(model, [{**batch, "decoder_input_ids": decoder_ids}],
                                                       "empirical"))
    assert ROWS_MSG in caplog.text and "encoder.block.0.layer.0.SelfAttention.relative_attention_bias" in caplog.text


class _ReversedRows(nn.Module):
    """Normalises the examples in reverse order and reverses them back: the LayerNorm's row r is
    example N-1-r, which no shape shows."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.norm(x.flip(0)).flip(0)))


@pytest.mark.parametrize("shape", ["diag", "kfac"])
def test_a_module_whose_rows_are_not_in_example_order_goes_to_the_exact_path(shape: str, caplog) -> None:
    torch.manual_seed(0)
    model = _ReversedRows()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    batches = [{"x": torch.randn(5, 4) * torch.arange(1, 6.0).unsqueeze(1), "labels": torch.randint(0, 3, (5,))}]
    _, log = _exact_path_matches_brute_force(model, batches, shape, ("norm.weight", "norm.bias"), caplog)
    assert ROWS_MSG in log and "norm (LayerNorm)" in log


@pytest.mark.parametrize("n", [3, 4])
def test_bart_matches_brute_force_for_batch_sizes_that_do_and_do_not_divide_its_position_table(n: int) -> None:
    """BART's learned positions are looked up without a batch dimension, (T, D), whatever N is."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=60, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)).eval()
    ids, am = _ids(n, 6)
    labels = torch.randint(3, 50, (n, 5), generator=torch.Generator().manual_seed(1))
    labels[1, 3:] = -100
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
    decoder_ids = torch.full_like(labels, 2)  # decoder_start_token_id, then the labels shifted (-100 -> pad)
    decoder_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, 1)
    curv = estimate_fisher(model, [batch], shape="diag", fisher_type="empirical", progress=False)
    _assert_matches_brute_force(curv, brute_force_diag(model, [{**batch, "decoder_input_ids": decoder_ids}],
                                                       "empirical"))
    kfac = estimate_fisher(model, [batch], shape="kfac", fisher_type="mc", progress=False)
    assert "model.decoder.layers.0.fc2" in kfac.kfac


def test_t5_without_labels_or_decoder_inputs_is_refused_naming_both() -> None:
    model = _t5()
    ids, am = _ids()
    with pytest.raises(ValueError, match=r"encoder-decoder model: .*`labels`.*`decoder_input_ids`"):
        estimate_fisher(model, [{"input_ids": ids, "attention_mask": am}], shape="diag", fisher_type="mc",
                        progress=False)


def test_opt_causal_lm_matches_brute_force_on_labels_shifted_by_hand() -> None:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(
        vocab_size=60, hidden_size=16, ffn_dim=24, num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=16,
        max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)).eval()
    ids, am = _ids()
    labels = ids.masked_fill(am == 0, -100)
    curv = estimate_fisher(model, [{"input_ids": ids, "attention_mask": am, "labels": labels}], shape="diag",
                           fisher_type="empirical", progress=False)
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    ref = brute_force_diag(model, [{"input_ids": ids, "attention_mask": am, "labels": shifted}], "empirical")
    _assert_matches_brute_force(curv, ref)


def _opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(
        vocab_size=60, hidden_size=16, ffn_dim=24, num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=16,
        max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)).eval()


@pytest.mark.parametrize("fisher_type", ["empirical", "exact"])
def test_left_padded_causal_lm_diagonal_counts_the_first_token_predicted_from_a_pad(fisher_type: str) -> None:
    """The last left pad predicts the first real token and the loss counts it: that position's
    gradient belongs to the example although its attention mask is 0."""
    torch.manual_seed(0)
    model = _opt()
    ids = torch.tensor([[1, 1, 5, 7, 9, 11], [3, 4, 6, 8, 12, 13], [1, 1, 1, 14, 15, 16]])
    am = (ids != 1).long()
    labels = ids.masked_fill(am == 0, -100)
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
    curv = estimate_fisher(model, [batch], shape="diag", fisher_type=fisher_type, progress=False)
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    assert shifted[0, 1] == 5 and am[0, 1] == 0  # a counted prediction made at a pad position
    ref = brute_force_diag(model, [{"input_ids": ids, "attention_mask": am, "labels": shifted}], fisher_type)
    _assert_matches_brute_force(curv, ref)


def test_t5_unlabelled_decoder_positions_before_a_label_still_count() -> None:
    """A -100 inside the labels: that position's output is not counted, but the causal decoder's later
    positions read it (its key/value, its input embedding), so its gradient is the example's."""
    torch.manual_seed(0)
    model = _t5().eval()
    ids, am = _ids()
    labels = torch.tensor([[5, -100, 6, 7, 2], [8, 9, -100, -100, 4], [10, 11, 12, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
    decoder_ids = torch.zeros_like(labels)
    decoder_ids[:, 1:] = labels[:, :-1].clamp_min(0)
    oracle = [{**batch, "decoder_input_ids": decoder_ids}]
    curv = estimate_fisher(model, [batch], shape="diag", fisher_type="empirical", progress=False)
    _assert_matches_brute_force(curv, brute_force_diag(model, oracle, "empirical"))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_multiple_choice_kfac_does_not_depend_on_padding(approx: str) -> None:
    """Its (N, C, T) attention mask fits the encoder's (N·C, T) calls once flattened: more pad columns
    leave the predictions and so the factors unchanged."""
    from oracles import tiny_bert_config
    from transformers import BertForMultipleChoice

    torch.manual_seed(0)
    model = BertForMultipleChoice(tiny_bert_config()).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (3, 2, 5), generator=g)
    am = torch.ones_like(ids)
    am[0, 1, 3:] = 0
    am[2, 0, 4:] = 0
    ids[am == 0] = 0
    batch = {"input_ids": ids, "attention_mask": am, "labels": torch.tensor([0, 1, 1])}
    wider = {"input_ids": torch.cat([ids, torch.zeros(3, 2, 4, dtype=ids.dtype)], -1),
             "attention_mask": torch.cat([am, torch.zeros(3, 2, 4, dtype=am.dtype)], -1), "labels": batch["labels"]}
    with torch.no_grad():
        torch.testing.assert_close(model(**wider).logits, model(**batch).logits)
    ref = estimate_fisher(model, [batch], shape="kfac", fisher_type="empirical", kfac_approx=approx, progress=False)
    padded = estimate_fisher(model, [wider], shape="kfac", fisher_type="empirical", kfac_approx=approx,
                             progress=False)
    assert "bert.encoder.layer.0.attention.self.query" in padded.kfac
    for name, block in padded.kfac.items():
        for factor in ("A", "G"):
            r = getattr(ref.kfac[name], factor)  # key's reduced G is 0 up to rounding (softmax shift invariance)
            torch.testing.assert_close(getattr(block, factor), r, rtol=1e-4,
                                       atol=max(1e-6 * float(r.abs().max()), 1e-20), msg=f"{name}.{factor}")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_opt_kfac_of_a_padded_batch_equals_kfac_of_each_example_alone(approx: str, caplog) -> None:
    """OPT feeds its MLP (fc1, fc2) the positions flattened to (N·T, D) rows: they take the batch's mask
    too, read as N examples of T positions (so `reduce` averages per example), and the diagonal keeps
    its fast per-example rule there."""
    torch.manual_seed(0)
    model = _opt()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (3, 6), generator=g)
    am = torch.ones_like(ids)
    lens = [6, 4, 5]
    for i, n in enumerate(lens):
        am[i, n:] = 0
        ids[i, n:] = 1
    labels = ids.masked_fill(am == 0, -100)
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
    alone = [{k: v[i:i + 1, :lens[i]] for k, v in batch.items()} for i in range(3)]
    with caplog.at_level(logging.WARNING):
        padded = estimate_fisher(model, [batch], shape="kfac", fisher_type="empirical", kfac_approx=approx,
                                 progress=False)
    ref = estimate_fisher(model, alone, shape="kfac", fisher_type="empirical", kfac_approx=approx, progress=False)
    assert "model.decoder.layers.0.fc1" in padded.kfac and ROWS_MSG not in caplog.text
    for name, block in padded.kfac.items():
        for factor in ("A", "G"):
            r = getattr(ref.kfac[name], factor)
            torch.testing.assert_close(getattr(block, factor), r, rtol=1e-4,
                                       atol=max(1e-6 * float(r.abs().max()), 1e-20), msg=f"{name}.{factor}")


class _SeqFirstMLP(nn.Module):
    """Flattens its (N, T, D) input position-major, (T·N, D), before a Linear: rows of one example are not
    contiguous, so they cannot be read as N blocks of T."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None) -> SimpleNamespace:
        h = self.emb(input_ids)
        n, t, d = h.shape
        rows = self.lin(h.transpose(0, 1).reshape(t * n, d)).reshape(t, n, d).transpose(0, 1)
        return SimpleNamespace(logits=self.head(rows.mean(1)))


def test_flattened_rows_out_of_example_order_keep_kfac_per_row_and_an_exact_diagonal(caplog) -> None:
    torch.manual_seed(0)
    model = _SeqFirstMLP().eval()
    ids = torch.randint(0, 20, (4, 3), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 1])}
    with caplog.at_level(logging.WARNING):
        kfac = estimate_fisher(model, [batch], shape="kfac", fisher_type="empirical", progress=False)
    assert "run on rows that are not the batch's examples" in caplog.text and "lin" in caplog.text
    x = model.emb(ids).detach().reshape(-1, 4)
    a = torch.cat([x, torch.ones(len(x), 1)], 1)
    torch.testing.assert_close(kfac.kfac["lin"].A, a.T @ a / len(x), rtol=1e-5, atol=1e-6)  # every row one position
    _exact_path_matches_brute_force(model, [batch], "diag", ("lin.weight", "lin.bias"), caplog)


class _SeqFirstLinear(_SeqFirstMLP):
    """Runs its Linear on the sequence-first (T, N, D) view, as Longformer does its q/k/v."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None) -> SimpleNamespace:
        h = self.emb(input_ids)
        rows = self.lin(h.transpose(0, 1)).transpose(0, 1)
        return SimpleNamespace(logits=self.head(rows.mean(1)))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("n,t", [(4, 4), (3, 5)], ids=["T-equals-N", "T-not-N"])
def test_a_sequence_first_input_is_never_read_as_examples(n: int, t: int, approx: str, caplog) -> None:
    """Rows of a (T, N, D) input are positions of every example: with T = N the (N, T) mask fits by shape
    (and would be applied transposed), and `reduce` would average over the examples. Each of the N·T
    positions counts on its own instead, with a warning."""
    torch.manual_seed(0)
    model = _SeqFirstLinear().eval()
    ids = torch.randint(0, 20, (n, t), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, t - 1:] = 0  # a mask that must not be applied to the rows
    batch = {"input_ids": ids, "attention_mask": am, "labels": torch.arange(n) % 3}
    with caplog.at_level(logging.WARNING):
        curv = estimate_fisher(model, [batch], shape="kfac", fisher_type="empirical", kfac_approx=approx,
                               progress=False)
    # expand with T ≠ N groups nothing anyway: the mask that fits no call is reported, and every position counts
    assert "run on rows that are not the batch's examples" in caplog.text or (
        approx == "expand" and n != t and "every position counts" in caplog.text)
    x = model.emb(ids).detach().reshape(-1, 4)
    a = torch.cat([x, torch.ones(len(x), 1)], 1)
    torch.testing.assert_close(curv.kfac["lin"].A, a.T @ a / len(x), rtol=1e-5, atol=1e-6)


class _UnpaddedLinear(_SeqFirstMLP):
    """Gathers the valid tokens into (total_tokens, D) before its Linear (unpadded attention does)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None) -> SimpleNamespace:
        h = self.emb(input_ids)
        keep = attention_mask.bool()
        out = torch.zeros(h.shape[:-1] + (4,), dtype=h.dtype)
        out[keep] = self.lin(h[keep])
        pooled = out.sum(1) / keep.sum(1, keepdim=True)
        return SimpleNamespace(logits=self.head(pooled))


def test_reduce_on_tokens_gathered_without_padding_says_it_counts_each_row(caplog) -> None:
    torch.manual_seed(0)
    model = _UnpaddedLinear().eval()
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[0, 3:] = 0
    am[2, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": am, "labels": torch.tensor([0, 1, 2])}
    with caplog.at_level(logging.WARNING):
        curv = estimate_fisher(model, [batch], shape="kfac", fisher_type="empirical", kfac_approx="reduce",
                               progress=False)
    assert "`reduce`: module(s) lin run on rows that are not grouped by example" in caplog.text
    x = model.emb(ids).detach()[am.bool()]
    a = torch.cat([x, torch.ones(len(x), 1)], 1)
    torch.testing.assert_close(curv.kfac["lin"].A, a.T @ a / len(x), rtol=1e-5, atol=1e-6)


class _PadsToBlocks(_SeqFirstMLP):
    """Pads its input on the right to a multiple of 4 positions (block-sparse attention, Longformer's window),
    or with ``prepend`` puts 2 learned-free tokens in front (prompt tuning): its layers see T' > T positions."""

    def __init__(self, prepend: bool = False) -> None:
        super().__init__()
        self.prepend = prepend

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None) -> SimpleNamespace:
        n, t = input_ids.shape
        extra = 2 if self.prepend else (-t) % 4
        pad_ids = torch.zeros(n, extra, dtype=input_ids.dtype)
        pad_mask = torch.full((n, extra), self.prepend, dtype=attention_mask.dtype)
        ids = torch.cat([pad_ids, input_ids], 1) if self.prepend else torch.cat([input_ids, pad_ids], 1)
        am = torch.cat([pad_mask, attention_mask], 1) if self.prepend else torch.cat([attention_mask, pad_mask], 1)
        h = self.lin(self.emb(ids)) * am.unsqueeze(-1)
        return SimpleNamespace(logits=self.head(h.sum(1) / am.sum(1, keepdim=True)))


@pytest.mark.parametrize("prepend", [False, True], ids=["padded-on-the-right", "tokens-prepended"])
def test_a_model_that_pads_internally_keeps_the_padding_mask(prepend: bool, caplog) -> None:
    """Right padding to T' > T: the (N, T) mask is extended with False (the extra positions feed nothing).
    Positions added in front would shift the mask: the first batch sees their gradient and counts every
    position instead, with a warning."""
    torch.manual_seed(0)
    model = _PadsToBlocks(prepend).eval()
    ids = torch.randint(1, 20, (3, 5), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[0, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": am, "labels": torch.tensor([0, 1, 2])}
    with caplog.at_level(logging.WARNING):
        curv = estimate_fisher(model, [batch], shape="kfac", fisher_type="empirical", progress=False)
    x = model.emb(ids).detach()
    if prepend:
        assert "extra ones feed the outputs" in caplog.text
        x = torch.cat([model.emb(torch.zeros(3, 2, dtype=ids.dtype)).detach(), x], 1).reshape(-1, 4)
    else:
        assert "No attention mask" not in caplog.text
        x = x[am.bool()]
    a = torch.cat([x, torch.ones(len(x), 1)], 1)
    torch.testing.assert_close(curv.kfac["lin"].A, a.T @ a / len(x), rtol=1e-5, atol=1e-6)
