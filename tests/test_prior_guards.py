"""A prior that would not load never replaces one that does, and a refused task changes nothing.

Checked against things the code under test does not compute: the files of a good prior on disk
(their bytes, before and after a refused add_task or save), the prior read back from them, and
penalty values built by hand as dense quadratic forms ½ Δᵀ (F + D) Δ with torch.kron.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from oracles import column_major
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from trainer_fixtures import batches_of, make_model, make_rows, one_thread, perturb  # noqa: E402

from hf_kfac import FisherConfig, Prior, PriorFileError, estimate_fisher  # noqa: E402
from hf_kfac.model_card import render_model_card  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)


def _fisher(model: nn.Module, shape: str, seed: int = 3, n: int = 6) -> Any:
    return estimate_fisher(model, batches_of(make_rows("seq", n, seed=seed), 3), shape=shape,
                           fisher_type="empirical", progress=False)


def _bare(curv: Any) -> Any:
    """The curvature without the options it was estimated with, as one built by hand."""
    curv.fisher_config = None
    return curv


def _prior_with_task_a(shape: str, accumulation: str = "separate", **kw: Any) -> tuple[Prior, nn.Module]:
    model = make_model("seq", seed=0)
    prior = Prior(shape=shape, accumulation=accumulation, damping=0.1, **kw)
    prior.add_task(model, None if shape == "identity" else _fisher(model, shape), "a", n_examples=6)
    return prior, model


def _files(folder: Path) -> dict[str, bytes]:
    """Every file beside and under ``folder``'s parent, with its bytes (leftovers of a save included)."""
    return {str(p.relative_to(folder.parent)): p.read_bytes() for p in sorted(folder.parent.rglob("*")) if p.is_file()}


def _same_prior(got: Prior, want: Prior) -> None:
    """Equal tensors bit for bit, and the same config (tasks, slots, shapes)."""
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert got.config_dict() == want.config_dict()


def _snapshot(prior: Prior) -> tuple:
    sd = {k: v.clone() for k, v in prior.state_dict().items()}
    return sd, copy.deepcopy(prior.config_dict()), [id(s) for s in prior.slots]


def _assert_unchanged(prior: Prior, before: tuple) -> None:
    sd, cfg, slot_ids = before
    now = prior.state_dict()
    assert now.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(now[k], v), k
    assert prior.config_dict() == cfg
    assert [id(s) for s in prior.slots] == slot_ids


# ------------------------------------------------------------------ 1. add_task refuses what would not load
@pytest.mark.parametrize("accumulation", ["separate", "merge"])
@pytest.mark.parametrize("shape", ["diag", "kfac", "identity"])
def test_a_head_that_changed_shape_is_refused_at_add_task_and_the_saved_prior_still_loads_bit_for_bit(
    tmp_path: Path, shape: str, accumulation: str
) -> None:
    """Task b is the same encoder with a 5-label head where task a had 3 labels: add_task refuses it naming
    the head's parameter and the fixes, changes nothing, and a save afterwards writes the one-task prior."""
    prior, _ = _prior_with_task_a(shape, accumulation)
    folder = tmp_path / "fisher"
    prior.save_pretrained(folder)
    saved = Prior.from_pretrained(folder)
    before = _snapshot(prior)
    five = make_model("seq", seed=1, num_labels=5)
    curv = None if shape == "identity" else _fisher(five, shape, seed=4)
    with pytest.raises(ValueError, match=r"parameter 'classifier\.(weight|bias)' has shape \[5.*\] in the model but "
                                         r"\[3.*\] in the prior: a parameter covered by the prior changed shape.*"
                                         r"new name.*exclude") as refused:
        prior.add_task(five, curv, "b", n_examples=6)
    assert not isinstance(refused.value, RuntimeError)
    _assert_unchanged(prior, before)
    prior.save_pretrained(folder)
    _same_prior(Prior.from_pretrained(folder), saved)
    assert prior.num_tasks == 1 and "tasks=[a]" in repr(prior)


@pytest.mark.parametrize("case", ["identity", "diag-fisher-before-divergence", "float64-beyond-float32"])
def test_a_non_finite_weight_is_refused_as_an_anchor_and_the_prior_on_disk_still_loads(tmp_path: Path, case: str) -> None:
    """A weight that is NaN/inf (or finite in float64 but inf in the float32 anchor) cannot be an anchor: the
    loader refuses it, so add_task refuses it first, naming the parameter."""
    shape = "identity" if case != "diag-fisher-before-divergence" else "diag"
    prior, model = _prior_with_task_a(shape)
    prior.save_pretrained(tmp_path / "p")
    on_disk = _files(tmp_path / "p")
    before = _snapshot(prior)
    curv = _fisher(model, "diag") if shape == "diag" else None  # estimated while the weights were finite
    with torch.no_grad():
        if case == "float64-beyond-float32":
            model.double()
            model.classifier.bias[0] = 1e300
        else:
            model.classifier.bias[0] = math.inf if case == "identity" else math.nan
    with pytest.raises(ValueError, match=r"parameter 'classifier\.bias' of the model holds NaN or inf.*task 'b'.*finite"):
        prior.add_task(model, curv, "b", n_examples=6)
    _assert_unchanged(prior, before)
    assert _files(tmp_path / "p") == on_disk
    prior.save_pretrained(tmp_path / "p")
    _same_prior(Prior.from_pretrained(tmp_path / "p"), prior)


def test_task_names_counts_and_metadata_the_loader_would_refuse_are_refused_before_anything_changes(tmp_path: Path) -> None:
    """name=0 (the loader wants a string), a negative or fractional n_examples, metadata that is not JSON: each is
    refused at add_task; integer-valued counts of other types (a torch scalar) are taken as plain ints."""
    prior, model = _prior_with_task_a("diag")
    curv = _fisher(model, "diag", seed=5)
    before = _snapshot(prior)
    with pytest.raises(TypeError, match=r"task name must be a string, got int 0.*name=str"):
        prior.add_task(model, curv, 0, n_examples=6)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"n_examples of task 'b' must be >= 0"):
        Prior(shape="diag", task_weighting="uniform").add_task(model, curv, "b", n_examples=-3)
    with pytest.raises(TypeError, match=r"n_examples of task 'b' must be an integer"):
        prior.add_task(model, curv, "b", n_examples=5.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"metadata of task 'b' must be JSON-serialisable"):
        prior.add_task(model, curv, "b", n_examples=6, metadata={"callback": object()})
    _assert_unchanged(prior, before)
    rec = prior.add_task(model, curv, "b", n_examples=torch.tensor(5))  # type: ignore[arg-type]
    assert type(rec.n_examples) is int and rec.n_examples == 5
    prior.save_pretrained(tmp_path / "p")
    assert [t.name for t in Prior.from_pretrained(tmp_path / "p").tasks] == ["a", "b"]


# ------------------------------------------------------------------ 1. save refuses a state that would not load
def _int_name(p: Prior) -> None:
    p.tasks[0].name = 0  # type: ignore[assignment]


def _nan_anchor(p: Prior) -> None:
    p.slots[0].anchor["classifier.bias"][0] = math.nan


def _wrong_recorded_shape(p: Prior) -> None:
    p.param_shapes["classifier.bias"] = [5]


def _anchor_of_another_shape(p: Prior) -> None:
    p.slots[0].anchor["classifier.bias"] = torch.zeros(5)


def _inf_curvature(p: Prior) -> None:
    curv = p.slots[0].curvature
    assert curv is not None
    name = next(iter(curv.diag)) if curv.diag else None
    if name is not None:
        curv.diag[name][0] = math.inf
    else:
        next(iter(curv.kfac.values())).G[0, 0] = math.inf


def _negative_damping(p: Prior) -> None:
    p.config.damping = -1.0


def _unserialisable_metadata(p: Prior) -> None:
    p.tasks[0].metadata["callback"] = object()


def _float16_anchor(p: Prior) -> None:
    p.slots[0].anchor["classifier.bias"] = p.slots[0].anchor["classifier.bias"].half()


BREAKERS: list[tuple[str, Callable[[Prior], None], str]] = [
    ("int-task-name", _int_name, r"`tasks\[0\]\.name` should be a string"),
    ("nan-anchor", _nan_anchor, r"'slots\.0\.anchor\.classifier\.bias' holds NaN or inf"),
    ("recorded-shape", _wrong_recorded_shape, r"'slots\.0\.anchor\.classifier\.bias' has shape \[3\].*implies \[5\]"),
    ("anchor-shape", _anchor_of_another_shape, r"'slots\.0\.anchor\.classifier\.bias' has shape \[5\].*implies \[3\]"),
    ("inf-curvature", _inf_curvature, r"holds NaN or inf"),
    ("negative-damping", _negative_damping, r"`prior` is invalid \(damping must be a finite float >= 0"),
    ("metadata", _unserialisable_metadata, r"cannot be written as JSON"),
    ("float16-anchor", _float16_anchor, r"has dtype float16, but a prior stores it as float32"),
]


@pytest.mark.parametrize("shape", ["diag", "kfac"])
@pytest.mark.parametrize("case,breaker,message", BREAKERS, ids=[b[0] for b in BREAKERS])
def test_save_refuses_a_prior_the_loader_would_refuse_and_leaves_the_folder_bit_for_bit(
    tmp_path: Path, shape: str, case: str, breaker: Callable[[Prior], None], message: str
) -> None:
    """The in-memory prior broken by hand in one way the loader checks: save_pretrained raises before it
    replaces anything, so the folder keeps its files byte for byte (no leftovers beside it) and still loads."""
    prior, _ = _prior_with_task_a(shape)
    folder = tmp_path / "fisher"
    prior.save_pretrained(folder)
    good = Prior.from_pretrained(folder)
    on_disk = _files(folder)
    breaker(prior)
    with pytest.raises(PriorFileError, match=rf"refusing to save the prior to .*nothing was written.*would not load back.*{message}"):
        prior.save_pretrained(folder)
    assert _files(folder) == on_disk
    _same_prior(Prior.from_pretrained(folder), good)


def test_save_refuses_a_broken_prior_into_a_new_folder_too(tmp_path: Path) -> None:
    """No folder (not even its parent) is created for a prior that would not load."""
    prior, _ = _prior_with_task_a("diag")
    _nan_anchor(prior)
    with pytest.raises(PriorFileError, match="would not load back"):
        prior.save_pretrained(tmp_path / "new" / "fisher")
    assert not (tmp_path / "new").exists()


def test_a_compact_prior_whose_anchor_is_a_reference_is_checked_and_saved(tmp_path: Path) -> None:
    """The anchors of slots stored by reference are checked in memory; a good one saves and loads with the model."""
    prior, model = _prior_with_task_a("kfac", storage="compact")
    model.save_pretrained(tmp_path)
    prior.save_pretrained(tmp_path / "fisher", model=model)
    assert "anchor_ref" in prior.config_dict(prior.anchor_references(model))["slots"][0]
    _same_prior(Prior.from_pretrained(tmp_path, model=model), prior)
    on_disk = _files(tmp_path / "fisher")
    next(iter(prior.slots[0].curvature.kfac.values())).G.eigvals[0] = math.nan
    with pytest.raises(PriorFileError, match="would not load back.*NaN or inf"):
        prior.save_pretrained(tmp_path / "fisher", model=model)
    assert _files(tmp_path / "fisher") == on_disk


# ------------------------------------------------------------------ 2. a refused merge leaves the prior as it was
@pytest.mark.parametrize("fails_in", ["_merge_curvatures", "compress_curvature"])
def test_a_merge_that_fails_midway_leaves_the_prior_as_it_was(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fails_in: str) -> None:
    """Whatever raises while task b is folded in (the merge of the curvatures, the compression of the result),
    the tasks, slots and recorded shapes are those of before, and the prior saves and loads as before."""
    import hf_kfac.prior as prior_module

    prior, model = _prior_with_task_a("kfac", "merge", storage="compact")
    folder = tmp_path / "p"
    prior.save_pretrained(folder)
    saved = Prior.from_pretrained(folder)
    before = _snapshot(prior)
    perturb(model, seed=11)
    curv = _fisher(model, "kfac", seed=9)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(prior_module, fails_in, boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        prior.add_task(model, curv, "b", n_examples=6)
    _assert_unchanged(prior, before)
    monkeypatch.undo()
    prior.save_pretrained(folder)
    _same_prior(Prior.from_pretrained(folder), saved)
    prior.add_task(model, curv, "b", n_examples=6)
    assert prior.num_tasks == 2 and prior.slots[0].tasks == [0, 1]


# ------------------------------------------------------------------ 3. the penalty follows damping and decay
def _dense_penalty(prior: Prior, params: dict[str, Tensor], lam: float) -> Tensor:
    """½ λ Σ_s c_s vec(Δ)ᵀ (F_s + D_s) vec(Δ) in float64 with torch.kron; c_s = γ^{T−1−s} N_s (separate).

    D_s: δ on a diagonal; a K-FAC block's factors damped as (A + π√δ I) ⊗ (G + √δ/π I), π² = (tr A/d_A)/(tr G/d_G).
    """
    delta, gamma, T = float(prior.config.damping), float(prior.config.decay), len(prior.slots)
    total = torch.zeros((), dtype=torch.float64)
    for s, slot in enumerate(prior.slots):
        c = gamma ** (T - 1 - s) * sum(prior.tasks[t].n_examples for t in slot.tasks)
        assert slot.curvature is not None
        for b in slot.curvature.kfac.values():
            A, G = b.A.double(), b.G.double()
            ta, tg = float(torch.trace(A)) / A.shape[0], float(torch.trace(G)) / G.shape[0]
            pi = math.sqrt(ta / tg)
            A = A + pi * math.sqrt(delta) * torch.eye(A.shape[0], dtype=torch.float64)
            G = G + math.sqrt(delta) / pi * torch.eye(G.shape[0], dtype=torch.float64)
            dw = params[b.weight].double() - slot.anchor[b.weight].double()
            db = params[b.bias].double() - slot.anchor[b.bias].double() if b.bias is not None else None
            v = column_major(dw, db)
            total = total + c * (v @ torch.kron(A, G) @ v)
        for name, d in slot.curvature.diag.items():
            diff = params[name].double() - slot.anchor[name].double()
            total = total + c * ((d.double() + delta) * diff * diff).sum()
    return 0.5 * lam * total


@pytest.mark.parametrize("shape", ["kfac", "diag"])
def test_changing_damping_or_decay_after_a_penalty_call_gives_the_hand_computed_penalty(shape: str) -> None:
    """Two tasks; the penalty is evaluated once, then damping and decay are set on prior.config (as a user or
    the trainer's prior_damping/prior_decay does): each later value and gradient equals the dense ½ΔᵀFΔ and its
    autograd gradient with the new settings, not the cached terms of the old ones."""
    model = make_model("seq", seed=0)
    prior = Prior(shape=shape, damping=0.0)
    prior.add_task(model, _fisher(model, shape, seed=3), "a", n_examples=6)
    perturb(model, seed=2)
    prior.add_task(model, _fisher(model, shape, seed=4), "b", n_examples=4)
    perturb(model, seed=5)
    lam = 0.7
    first = float(prior.penalty(model, lam).detach())
    for damping, decay in [(0.3, 1.0), (0.3, 0.25), (0.0, 0.25)]:
        prior.config.damping, prior.config.decay = damping, decay
        params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        want = _dense_penalty(prior, params, lam)
        want.backward()
        model.zero_grad()
        got = prior.penalty(model, lam)
        got.backward()
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5), (damping, decay)
        for n, p in model.named_parameters():
            if params[n].grad is not None and p.grad is not None:
                torch.testing.assert_close(p.grad, params[n].grad, rtol=1e-4, atol=1e-7)
    assert float(want.detach()) != pytest.approx(first, rel=1e-3)


def test_changing_the_compute_dtype_of_a_compact_prior_rebuilds_its_terms() -> None:
    """storage.compute_dtype changed after a penalty call: the value is that of a fresh copy with bfloat16
    products, which differs from the float32 value."""
    prior, model = _prior_with_task_a("kfac", storage={"format": "compact", "rank": 2, "compute_dtype": "float32"})
    perturb(model, seed=4)
    f32 = float(prior.penalty(model, 1.0).detach())
    prior.config.storage.compute_dtype = "bfloat16"
    got = float(prior.penalty(model, 1.0).detach())
    fresh = copy.deepcopy(prior)
    fresh._penalty_cache.clear()
    assert got == float(fresh.penalty(model, 1.0).detach())
    assert got != f32


# ------------------------------------------------------------------ 4. the task record names the Fisher estimated
def _card_row(prior: Prior, i: int = 1) -> str:
    return next(ln for ln in str(render_model_card(prior, repo_id="org/x")).splitlines() if ln.startswith(f"| {i} |"))


def test_the_task_record_and_card_do_not_claim_a_fisher_the_curvature_was_not_estimated_with() -> None:
    """Direct API, a curvature that does not say how it was estimated, default Prior(): the record holds the shape
    read from the curvature and no fisher_type (the card shows "– (diag)", not "mc (diag)"); an L2 task records
    shape identity only."""
    model = make_model("seq", seed=0)
    ewc = Prior(shape="diag")
    ewc.add_task(model, _bare(_fisher(model, "diag")), "diseases", n_examples=6)
    assert ewc.tasks[0].fisher == {"shape": "diag"}
    assert "| – (diag) |" in _card_row(ewc) and "mc" not in _card_row(ewc)
    kfac = Prior(shape="kfac", fisher=FisherConfig(shape="diag", fisher_type="exact"))  # declared, but contradicted
    kfac.add_task(model, _bare(_fisher(model, "kfac")), "k", n_examples=6)
    assert kfac.tasks[0].fisher == {"shape": "kfac"}
    l2 = Prior(shape="identity")
    l2.add_task(model, None, "diseases", n_examples=6)
    assert l2.tasks[0].fisher == {"shape": "identity"}
    assert "| – (identity) |" in _card_row(l2)


def test_the_task_record_keeps_the_fisher_options_given_with_the_curvature_or_the_prior(tmp_path: Path) -> None:
    """A curvature carrying ``fisher_config`` is recorded with it; so is a FisherConfig given to the prior (or
    set as the trainer sets it). A loaded prior's saved options are not assumed for the next direct task."""
    model = make_model("seq", seed=0)
    curv = _fisher(model, "diag")
    curv.fisher_config = FisherConfig(shape="diag", fisher_type="empirical", n_samples=1)  # type: ignore[attr-defined]
    prior = Prior(shape="diag")
    prior.add_task(model, curv, "a", n_examples=6)
    assert prior.tasks[0].fisher["fisher_type"] == "empirical" and "| empirical (diag) |" in _card_row(prior)
    declared = Prior(shape="diag", fisher=FisherConfig(shape="diag", fisher_type="exact"))
    declared.add_task(model, _bare(_fisher(model, "diag")), "a", n_examples=6)
    assert declared.tasks[0].fisher["fisher_type"] == "exact"
    declared.save_pretrained(tmp_path / "p")
    loaded = Prior.from_pretrained(tmp_path / "p")
    assert loaded.tasks[0].fisher["fisher_type"] == "exact"
    loaded.add_task(model, _bare(_fisher(model, "diag", seed=8)), "b", n_examples=6)
    assert loaded.tasks[1].fisher == {"shape": "diag"}
    loaded.fisher = FisherConfig(shape="diag", fisher_type="mc")  # what ContinualTrainer.consolidate does
    loaded.add_task(model, _bare(_fisher(model, "diag", seed=9)), "c", n_examples=6)
    assert loaded.tasks[2].fisher["fisher_type"] == "mc"


def test_a_fisher_estimated_directly_is_recorded_with_the_options_it_was_estimated_with() -> None:
    """estimate_fisher attaches its options to the curvature; the direct API's record and card use them."""
    model = make_model("seq", seed=0)
    curv = estimate_fisher(model, batches_of(make_rows("seq", 6, seed=3), 3), shape="kfac", fisher_type="empirical",
                           kfac_approx="reduce", progress=False)
    assert curv.fisher_config.fisher_type == "empirical"
    assert curv.to("cpu").fisher_config is curv.fisher_config and curv.as_diagonal().fisher_config is curv.fisher_config
    prior = Prior(shape="kfac")
    prior.add_task(model, curv, "a", n_examples=6)
    record = prior.tasks[0].fisher
    assert record["fisher_type"] == "empirical" and record["kfac_approx"] == "reduce" and record["shape"] == "kfac"


# ------------------------------------------------------------------ 5. wrapped models
@pytest.mark.parametrize("wrap,prefix,fix", [
    (torch.compile, "_orig_mod.", r"model\._orig_mod"),
    (nn.DataParallel, "module.", r"model\.module"),
])
def test_a_compiled_or_data_parallel_model_is_diagnosed_as_wrapped_not_another_architecture(
    tmp_path: Path, wrap: Callable[[nn.Module], nn.Module], prefix: str, fix: str
) -> None:
    prior, model = _prior_with_task_a("diag")
    wrapped = wrap(model)
    assert next(n for n, _ in wrapped.named_parameters()).startswith(prefix)
    message = rf"which the model holds as '{prefix}.*wrapped.*not another architecture.*{fix}.*unwrap_model"
    with pytest.raises(PriorFileError, match=message):
        prior.check_compatible(wrapped)
    prior.save_pretrained(tmp_path / "p")
    with pytest.raises(PriorFileError, match=message):
        Prior.from_pretrained(tmp_path / "p", model=wrapped)
    before = _snapshot(prior)
    with pytest.raises(ValueError, match=rf"wrapped by .*{fix}"):
        prior.add_task(wrapped, _fisher(model, "diag"), "b", n_examples=6)
    _assert_unchanged(prior, before)
    prior.check_compatible(model)  # the unwrapped model fits
    with pytest.raises(PriorFileError, match="another architecture"):  # a real mismatch keeps its diagnosis
        prior.check_compatible(nn.Linear(2, 2))


# ------------------------------------------------------------------ 6. compact anchor reference, bf16 model
def test_a_compact_prior_read_with_a_bfloat16_model_says_to_load_it_in_float32_then_cast(tmp_path: Path) -> None:
    """The anchor stored as a reference to float32 weights cannot match a bfloat16 copy: the error says so and
    names the fix; following it (load in float32, then cast) gives the prior saved."""
    prior, model = _prior_with_task_a("kfac", "merge", storage="compact")
    model.save_pretrained(tmp_path)
    prior.save_pretrained(tmp_path / "fisher", model=model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(PriorFileError, match=r"holds bfloat16 weights.*Load the model in float32 to read the prior.*then cast"):
        Prior.from_pretrained(tmp_path, model=bf16)
    other = make_model("seq", seed=3)  # float32 with other weights: the message stays about other weights
    with pytest.raises(PriorFileError, match=r"the model given has other weights"):
        Prior.from_pretrained(tmp_path, model=other)
    loaded = Prior.from_pretrained(tmp_path, model=model)
    model.to(torch.bfloat16)
    _same_prior(loaded, prior)
    assert math.isfinite(float(loaded.penalty(model, 1.0).detach()))
