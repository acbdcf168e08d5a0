"""What the Fisher is estimated on: clear errors for outputs, labels and data it cannot use, and which
examples ``fisher_max_examples`` makes consolidate() use.

Every error must say what is wrong (the check matches the message), raised by ``default_predictive_fn`` /
``PredictiveOutput.flat`` or ``estimate_fisher`` before any statistic is accumulated.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from trainer_fixtures import batches_of, make_model, make_rows, one_thread  # noqa: E402

from hf_kfac import PredictiveOutput, estimate_fisher  # noqa: E402
from hf_kfac.curvature.predictive import default_predictive_fn  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)


def _seq_batch(n: int = 4) -> dict[str, torch.Tensor]:
    return batches_of(make_rows("seq", n, seed=2, ragged=False), n)[0]


# ------------------------------------------------------------------ model outputs
class _Scores(nn.Module):
    """A model whose output has no ``logits``: an object, a tuple or a dict of other names."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor):
        s = self.lin(x)
        return {"object": SimpleNamespace(scores=s), "tuple": (s,), "dict": {"scores": s}}[self.kind]


@pytest.mark.parametrize("kind", ["object", "tuple", "dict"])
def test_a_model_output_without_logits_is_refused_naming_the_output_and_predictive_fn(kind: str) -> None:
    model = _Scores(kind)
    batch = {"x": torch.randn(2, 3)}
    name = {"object": "SimpleNamespace", "tuple": "tuple", "dict": "dict"}[kind]
    with pytest.raises(TypeError, match=rf"the model returned {name} without `logits`; pass predictive_fn="):
        default_predictive_fn(model, batch)
    with pytest.raises(TypeError, match="without `logits`"):
        estimate_fisher(model, [batch], shape="diag", progress=False)


# ------------------------------------------------------------------ labels
def _lm_batch() -> dict[str, torch.Tensor]:
    return batches_of(make_rows("lm", 4, seed=2), 4)[0]


LABEL_SHAPE_CASES = [
    # (model kind, model overrides, how to break the labels, expected message)
    ("seq", {}, lambda b: b["labels"][:3], r"labels of shape \(3,\) do not match logits of shape \(4, 3\): expected 4 class ids"),
    ("seq", {}, lambda b: b["labels"].unsqueeze(1).expand(4, 2), r"labels of shape \(4, 2\) do not match logits of shape \(4, 3\)"),
    ("tok", {}, lambda b: b["labels"][:, :-1], r"labels of shape \(4, 5\) do not match logits of shape \(4, 6, 3\): expected 24"),
    ("seq", {"num_labels": 1}, lambda b: torch.randn(5), r"regression targets of shape \(5,\) do not match outputs of shape \(4, 1\)"),
    ("lm", {}, lambda b: b["labels"][:, 0], r"causal-LM labels of shape \(4,\) do not match logits of shape \(4, 6, 40\): expected \(4, 6\)"),
    ("lm", {}, lambda b: b["labels"][:, 1:], r"causal-LM labels of shape \(4, 5\) do not match .*unshifted"),
]


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
@pytest.mark.parametrize("kind,overrides,breaker,message", LABEL_SHAPE_CASES,
                         ids=["seq-short", "seq-2d", "tok-short", "regression", "lm-1d", "lm-pre-shifted"])
def test_labels_whose_shape_does_not_match_the_logits_are_refused_with_both_shapes(
    kind: str, overrides: dict, breaker, message: str, fisher_type: str
) -> None:
    model = make_model(kind, **overrides)
    batch = _lm_batch() if kind == "lm" else batches_of(make_rows(kind, 4, seed=2, ragged=False), 4)[0]
    bad = {**batch, "labels": breaker(batch)}
    with pytest.raises(ValueError, match=message):
        estimate_fisher(model, [bad], shape="diag", fisher_type=fisher_type, progress=False)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
def test_a_label_the_model_cannot_predict_is_refused_whatever_the_fisher_type(fisher_type: str) -> None:
    """Class 3 for a 3-class head (and 40 for a 40-token vocabulary): the labels belong to another task.
    The message names the value, the number of classes and the fix."""
    model = make_model("seq")
    batch = _seq_batch()
    bad = {**batch, "labels": torch.tensor([0, 1, 3, 2])}
    with pytest.raises(ValueError, match=r"label 3 at a position that counts, but the model predicts 3 classes: "
                                         r"class ids must be in \[0, 3\)\. Check that the labels belong"):
        estimate_fisher(model, [bad], shape="diag", fisher_type=fisher_type, progress=False)
    mlm = make_model("mlm")
    mb = batches_of(make_rows("mlm", 2, seed=2), 2)[0]
    mb["labels"][0, 1] = 40
    with pytest.raises(ValueError, match=r"label 40 .*predicts 40 classes"):
        estimate_fisher(mlm, [mb], shape="diag", fisher_type=fisher_type, progress=False)


class _Logits(nn.Module):
    """A 3-class linear model that returns ``{"logits": ...}`` and never reads its labels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"logits": self.lin(x)}


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_float_labels_with_a_fraction_are_refused_rather_than_truncated_to_a_class(fisher_type: str) -> None:
    """1.5 would silently become class 1; whole-number floats are the same class ids as longs."""
    model = _Logits()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"categorical labels must be class ids; got a torch.float32 .*likelihood='gaussian'"):
        estimate_fisher(model, [{"x": x, "labels": torch.tensor([0.0, 1.5, 2.0, 1.0])}], shape="diag",
                        fisher_type=fisher_type, progress=False)
    whole = estimate_fisher(model, [{"x": x, "labels": torch.tensor([0.0, 1.0, 2.0, 1.0])}], shape="diag",
                            fisher_type="empirical", progress=False)
    ids = estimate_fisher(model, [{"x": x, "labels": torch.tensor([0, 1, 2, 1])}], shape="diag",
                          fisher_type="empirical", progress=False)
    for k in ids.diag:
        torch.testing.assert_close(whole.diag[k], ids.diag[k], rtol=0, atol=0)


def test_a_bad_batch_for_a_model_with_broadcast_calls_raises_its_own_error_and_hands_nothing_over(caplog) -> None:
    """BERT's position embeddings are expanded on the first batch; a batch the plain model rejects too must
    get the real error, not a hand-over of those embeddings blamed on the expansion."""
    from oracles import tiny_bert_config
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    batch = {"input_ids": torch.randint(0, 40, (4, 5)), "attention_mask": torch.ones(4, 5, dtype=torch.long),
             "labels": torch.tensor([0.5, 1.0, 2.0, 0.0])}
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="categorical labels must be class ids"):
        estimate_fisher(model, [batch], shape="diag", fisher_type="mc", progress=False)
    assert "called once for the whole batch" not in caplog.text


def test_an_out_of_range_label_where_the_mask_leaves_it_out_is_never_read() -> None:
    """Only positions that count are checked: label 7 under an explicit mask that drops it equals -100 there."""
    model = make_model("tok")
    batch = batches_of(make_rows("tok", 3, seed=2), 3)[0]
    keep = batch["labels"] != -100
    keep[0, 0] = False
    bad = {**batch, "labels": batch["labels"].clone()}
    bad["labels"][0, 0] = 7
    ignored = {**batch, "labels": batch["labels"].clone()}
    ignored["labels"][0, 0] = -100

    def masked(m: nn.Module, b: dict) -> PredictiveOutput:
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return PredictiveOutput(logits, b["labels"], "categorical", mask=keep)

    got = estimate_fisher(model, [bad], shape="diag", fisher_type="empirical", predictive_fn=masked, progress=False)
    want = estimate_fisher(model, [ignored], shape="diag", fisher_type="empirical", progress=False)
    for name, d in want.diag.items():
        torch.testing.assert_close(got.diag[name], d, msg=name)
    with pytest.raises(ValueError, match="label 7"):
        estimate_fisher(model, [bad], shape="diag", fisher_type="empirical", progress=False)


def test_minus_100_where_an_explicit_mask_counts_the_position_is_refused_by_the_empirical_fisher_only() -> None:
    """With mask = attention mask, a -100 label at a real token: ``mc`` does not read labels there (the Fisher
    equals the one without labels), the empirical Fisher needs a class and refuses, saying so."""
    model = make_model("tok")
    batch = batches_of(make_rows("tok", 3, seed=2), 3)[0]
    batch["labels"][0, 1] = -100
    assert batch["attention_mask"][0, 1] == 1

    def fn(m: nn.Module, b: dict) -> PredictiveOutput:
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return PredictiveOutput(logits, b.get("labels"), "categorical", mask=b["attention_mask"].bool())

    got = estimate_fisher(model, [batch], shape="diag", fisher_type="mc", predictive_fn=fn, progress=False)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    want = estimate_fisher(model, [unlabelled], shape="diag", fisher_type="mc", predictive_fn=fn, progress=False)
    for name, d in want.diag.items():
        torch.testing.assert_close(got.diag[name], d, msg=name)
    with pytest.raises(ValueError, match=r"label -100 \(ignored\) at a position the PredictiveOutput's mask counts: "
                                         r"the empirical Fisher needs a class id there"):
        estimate_fisher(model, [batch], shape="diag", fisher_type="empirical", predictive_fn=fn, progress=False)


def test_the_empirical_fisher_without_labels_is_refused_and_says_to_add_them_or_use_mc() -> None:
    model = make_model("seq")
    batch = {k: v for k, v in _seq_batch().items() if k != "labels"}
    with pytest.raises(ValueError, match=r"the empirical Fisher needs the true labels.*add `labels`.*fisher_type='mc'"):
        estimate_fisher(model, [batch], shape="diag", fisher_type="empirical", progress=False)


# ------------------------------------------------------------------ data and parameters
@pytest.mark.parametrize("shape", ["diag", "kfac"])
def test_an_empty_dataloader_is_refused_as_no_example(shape: str) -> None:
    model = make_model("seq")
    with pytest.raises(ValueError, match=r"estimated on no example: the dataset or dataloader is empty"):
        estimate_fisher(model, [], shape=shape, fisher_type="empirical", progress=False)
    with pytest.raises(ValueError, match="on no example"):
        estimate_fisher(model, torch.utils.data.DataLoader([], batch_size=2), shape=shape, progress=False)


def test_a_model_with_no_trainable_parameter_is_refused_naming_frozen_and_exclude() -> None:
    model = make_model("seq")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameter left .*frozen \(requires_grad=False\) or excluded"):
        estimate_fisher(model, [_seq_batch()], shape="diag", progress=False)
    everything_excluded = make_model("seq")
    with pytest.raises(ValueError, match="no trainable parameter left"):
        estimate_fisher(everything_excluded, [_seq_batch()], shape="kfac", exclude=["*"], progress=False)


# ------------------------------------------------------------------ which examples consolidate() uses
N_ROWS, FIRST_TOKEN = 12, 10


def _identifiable_rows() -> dict[str, list]:
    """Example i holds token FIRST_TOKEN + i and no other example does: the empirical diagonal Fisher of that
    row of the word embeddings is non-zero exactly when example i was used."""
    g = torch.Generator().manual_seed(4)
    ids = [[1, FIRST_TOKEN + i, 2, 3, 4, 5] for i in range(N_ROWS)]
    return {"input_ids": ids, "attention_mask": [[1] * 6 for _ in ids],
            "labels": torch.randint(0, 3, (N_ROWS,), generator=g).tolist()}


@pytest.mark.parametrize("seed,max_examples,max_batches", [(0, 5, None), (1, 5, None), (0, 5, 2)])
def test_fisher_max_examples_uses_the_seeded_random_subset_each_example_once(
    tmp_path: Path, seed: int, max_examples: int, max_batches: int | None
) -> None:
    """The chosen examples, read off the Fisher itself and the loader, are
    sorted(randperm(n, seed)[:min(fisher_max_examples, fisher_max_batches · fisher_batch_size)]) (the rule of
    ContinualTrainer.get_fisher_dataloader), in index order; the Fisher equals a direct estimate on exactly
    those rows. Seeds 0 and 1 pick different subsets, so the seed is what decides."""
    import datasets

    from hf_kfac.trainer import ContinualTrainer
    from hf_kfac.trainer_config import ContinualConfig

    rows = _identifiable_rows()
    limit = min(max_examples, max_batches * 2) if max_batches else max_examples
    expected = sorted(torch.randperm(N_ROWS, generator=torch.Generator().manual_seed(seed))[:limit].tolist())
    other = sorted(torch.randperm(N_ROWS, generator=torch.Generator().manual_seed(1 - seed))[:limit].tolist())
    assert expected != other  # the two seeds tell subsets apart
    model = make_model("seq")
    args = ContinualConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True,
                           save_strategy="no", seed=seed, penalty="ewc", fisher_type="empirical",
                           dataloader_num_workers=0, fisher_batch_size=2, fisher_max_examples=max_examples,
                           fisher_max_batches=max_batches)
    ds = datasets.Dataset.from_dict(rows)
    trainer = ContinualTrainer(model=model, args=args, train_dataset=ds)
    loader = trainer.get_fisher_dataloader(ds)
    seen = [int(t) - FIRST_TOKEN for b in loader for t in b["input_ids"][:, 1]]
    assert seen == expected
    record = trainer.consolidate()
    assert record.metadata["n_fisher_examples"] == limit and record.n_examples == N_ROWS
    curv = trainer.prior.slots[0].curvature
    emb = curv.diag["bert.embeddings.word_embeddings.weight"]
    used = [i for i in range(N_ROWS) if float(emb[FIRST_TOKEN + i].abs().sum()) > 0]
    assert used == expected
    chosen = {k: [v[i] for i in expected] for k, v in rows.items()}
    want = estimate_fisher(model, batches_of(chosen, 2), shape="diag", fisher_type="empirical", progress=False)
    assert curv.n_examples == want.n_examples == limit
    for name, d in want.diag.items():
        torch.testing.assert_close(curv.diag[name], d, rtol=1e-5, atol=1e-9, msg=name)


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
def test_float_multi_hot_labels_on_a_model_with_no_problem_type_are_refused_as_multi_label(fisher_type: str) -> None:
    """The model's own loss would infer multi-label classification from them, as after its first labelled forward."""
    model = make_model("seq")
    assert model.config.problem_type is None
    batch = _seq_batch()
    n, c = batch["input_ids"].shape[0], model.config.num_labels
    batch["labels"] = (torch.arange(n * c).reshape(n, c) % 2).float()
    with pytest.raises(NotImplementedError, match="multi-label classification"):
        estimate_fisher(model, [batch], shape="diag", fisher_type=fisher_type, progress=False)


@pytest.mark.parametrize("option,value", [
    ("n_samples", True), ("max_batches", 1.5), ("max_batches", "2"), ("seed", None), ("max_factor_ratio", "10"),
])
def test_fisher_options_of_the_wrong_type_are_refused_naming_the_option(option: str, value: object) -> None:
    from hf_kfac import FisherConfig

    with pytest.raises(ValueError, match=rf"^{option} must be"):
        FisherConfig(**{option: value})


def test_exclude_patterns_that_are_not_strings_are_refused() -> None:
    from hf_kfac import FisherConfig

    with pytest.raises(TypeError, match="exclude must be a list of fnmatch patterns"):
        FisherConfig(exclude=[3])
