"""Bad input and faults: each fails early, with a message that names the problem and the fix."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from trainer_fixtures import batches_of, make_dataset, make_model, make_rows, one_thread  # noqa: E402

import hf_kfac.serialization as serialization  # noqa: E402
import hf_kfac.trainer as trainer_module  # noqa: E402
from hf_kfac import Prior, PriorFileError, estimate_fisher  # noqa: E402
from hf_kfac.trainer import ContinualTrainer  # noqa: E402
from hf_kfac.trainer_config import ContinualConfig  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)


def _args(out: Path, **kw) -> ContinualConfig:
    base = dict(
        output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True, per_device_train_batch_size=4,
        max_steps=2, save_strategy="no", learning_rate=1e-2, seed=0, penalty="kfac", penalty_lambda=0.1,
        fisher_type="empirical",
    )
    base.update(kw)
    return ContinualConfig(**base)


def _prior_for(model, shape: str = "kfac") -> Prior:
    prior = Prior(shape=shape)
    curv = None if shape == "identity" else estimate_fisher(
        model, batches_of(make_rows("seq", 4), 4), shape=shape, fisher_type="empirical", progress=False
    )
    prior.add_task(model, curv, "a", n_examples=4)
    return prior


def _no_estimation(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("the Fisher must not be estimated")

    monkeypatch.setattr(trainer_module, "estimate_fisher", boom)


# ----------------------------------------------------------------- mismatched priors
def _first_mismatch(prior: Prior, model: torch.nn.Module) -> str:
    params = dict(model.named_parameters())
    return next(n for n, shape in prior.param_shapes.items() if n not in params or list(params[n].shape) != shape)


@pytest.mark.parametrize(
    "other,prefix,words",
    [
        (dict(vocab_size=50), "bert.embeddings.word_embeddings.weight", ["[40, 8]", "[50, 8]"]),
        (dict(num_hidden_layers=3), "bert.encoder.layer.2.", ["does not have"]),
        (dict(num_labels=5), "classifier.", ["[5"]),
    ],
)
def test_a_prior_of_another_model_names_the_first_mismatching_parameter(
    other: dict, prefix: str, words: list[str], tmp_path: Path
) -> None:
    foreign = make_model("seq", **other)
    prior = _prior_for(foreign)
    prior.save_pretrained(tmp_path / "foreign" / "fisher")
    model = make_model("seq")
    for given in (prior, str(tmp_path / "foreign"), str(tmp_path / "foreign" / "fisher")):
        with pytest.raises(PriorFileError) as e:
            ContinualTrainer(model=model, args=_args(tmp_path / "out"), prior=given)
        msg = str(e.value)
        first = _first_mismatch(given if isinstance(given, Prior) else Prior.from_pretrained(given), model)
        assert first.startswith(prefix) and repr(first) in msg and all(w in msg for w in words), msg


def test_a_prior_of_another_penalty_or_accumulation_is_refused(tmp_path: Path) -> None:
    model = make_model("seq")
    with pytest.raises(ValueError, match=r"shape 'kfac' \(penalty='kfac'\).*penalty='ewc'"):
        ContinualTrainer(model=model, args=_args(tmp_path, penalty="ewc"), prior=_prior_for(model))
    with pytest.raises(ValueError, match="prior_accumulation='merge'.*'separate'"):
        ContinualTrainer(model=model, args=_args(tmp_path, prior_accumulation="merge"), prior=_prior_for(model))
    with pytest.raises(ValueError, match="prior_task_weighting='uniform'"):
        ContinualTrainer(model=model, args=_args(tmp_path, prior_task_weighting="uniform"), prior=_prior_for(model))
    # damping and decay are penalty-time settings: overriding them is allowed
    t = ContinualTrainer(model=model, args=_args(tmp_path, prior_damping=0.5, prior_decay=0.9), prior=_prior_for(model))
    assert t.prior.config.damping == 0.5 and t.prior.config.decay == 0.9


@pytest.mark.parametrize("shape", ["diag", "kfac"])
def test_overriding_the_damping_of_a_used_prior_changes_its_penalty(shape: str, tmp_path: Path) -> None:
    """The override must reach the penalty even if the prior's terms were already built (cached)."""
    model = make_model("seq")
    given, fresh = _prior_for(model, shape), Prior(shape=shape, damping=0.5)
    curv = estimate_fisher(model, batches_of(make_rows("seq", 4), 4), shape=shape, fisher_type="empirical",
                           progress=False)
    fresh.add_task(model, curv, "a", n_examples=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    undamped = given.penalty(model, 1.0)  # builds and caches the undamped terms
    penalty = "ewc" if shape == "diag" else "kfac"
    t = ContinualTrainer(model=model, args=_args(tmp_path, penalty=penalty, penalty_lambda=1.0, prior_damping=0.5),
                         prior=given)
    damped = t.penalty_value()
    torch.testing.assert_close(damped, fresh.penalty(model, 1.0), rtol=1e-5, atol=1e-8)
    assert damped > undamped * 1.5


def test_bad_arguments_to_the_trainer(tmp_path: Path) -> None:
    model = make_model("seq")
    with pytest.raises(TypeError, match="ContinualConfig"):
        ContinualTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    with pytest.raises(TypeError, match="folder, a Hub repo id or a hf_kfac.Prior"):
        ContinualTrainer(model=model, args=_args(tmp_path), prior=3.5)
    with pytest.raises(PriorFileError, match="no prior folder"):
        ContinualTrainer(model=model, args=_args(tmp_path), prior=str(tmp_path / "missing" / "x"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(PriorFileError, match="holds no hf_kfac prior"):
        ContinualTrainer(model=model, args=_args(tmp_path), prior=str(tmp_path / "plain"))
    with pytest.raises(TypeError, match="predictive_fn"):
        ContinualTrainer(model=model, args=_args(tmp_path), predictive_fn="logits")


# ------------------------------------------------------------------------ consolidate
def test_consolidate_on_an_empty_dataset_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_estimation(monkeypatch)
    model = make_model("seq")
    trainer = ContinualTrainer(model=model, args=_args(tmp_path), train_dataset=make_dataset("seq", 4))
    empty = make_dataset("seq", 4).select([])
    with pytest.raises(ValueError, match="empty dataset"):
        trainer.consolidate(dataset=empty)
    with pytest.raises(ValueError, match="empty dataset"):
        trainer.consolidate(dataset=[])
    assert trainer.prior is None and not (tmp_path / "fisher").exists()


def test_consolidate_refuses_bad_requests_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_estimation(monkeypatch)
    model = make_model("seq")
    ds = make_dataset("seq", 4)
    none = ContinualTrainer(model=model, args=_args(tmp_path, penalty="none", penalty_lambda=0.0), train_dataset=ds)
    with pytest.raises(ValueError, match="penalty='none'"):
        none.consolidate()
    trainer = ContinualTrainer(model=model, args=_args(tmp_path), train_dataset=None)
    with pytest.raises(ValueError, match="has no data"):
        trainer.consolidate()
    with pytest.raises(ValueError, match="JSON-serialisable"):
        trainer.consolidate(dataset=ds, metadata={"model": model})
    with pytest.raises(ValueError, match="n_examples=0"):
        trainer.consolidate(dataset=ds, n_examples=0)
    with pytest.raises(TypeError, match=r"task_name=3 is not valid: it must be a non-empty string"):
        trainer.consolidate(dataset=ds, task_name=3)
    assert trainer.prior is None


# ------------------------------------------------------------------------ checkpoints
def _corrupt_safetensors(folder: Path) -> None:
    f = next(folder.glob("prior*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-4:] = b"\x00\xff\x00\xff"
    f.write_bytes(bytes(data))


def test_resuming_from_a_checkpoint_with_a_corrupted_prior_fails_clearly(tmp_path: Path) -> None:
    model = make_model("seq")
    args = _args(tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    ContinualTrainer(model=model, args=args, train_dataset=make_dataset("seq", 8), prior=_prior_for(model)).train()
    _corrupt_safetensors(tmp_path / "checkpoint-1" / "fisher")
    fresh = ContinualTrainer(model=make_model("seq", seed=3), args=args, train_dataset=make_dataset("seq", 8))
    with pytest.raises(PriorFileError, match="corrupted") as e:
        fresh.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert "checkpoint-1" in str(e.value)
    (tmp_path / "checkpoint-2" / "fisher" / "prior_config.json").write_text("{ not json")
    with pytest.raises(PriorFileError, match="not valid JSON"):
        fresh.train(resume_from_checkpoint=True)


def _failing_save_file(monkeypatch: pytest.MonkeyPatch, fail_on_call: int) -> list[int]:
    """Make the n-th safetensors write inside a prior save write half a file, then fail."""
    real = serialization.save_file
    calls: list[int] = []

    def flaky(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        calls.append(1)
        if len(calls) == fail_on_call:
            Path(filename).write_bytes(b"\x00" * 17)
            raise OSError("No space left on device (simulated)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(serialization, "save_file", flaky)
    return calls


def _same_prior(a: Prior, b: Prior) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_an_interrupted_checkpoint_save_leaves_the_previous_prior_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("seq")
    prior = _prior_for(model)
    args = _args(tmp_path, save_strategy="steps", save_steps=2, max_steps=4)
    trainer = ContinualTrainer(model=model, args=args, train_dataset=make_dataset("seq", 8), prior=prior)
    _failing_save_file(monkeypatch, fail_on_call=2)  # checkpoint-2 saves, checkpoint-4 breaks
    with pytest.raises(OSError, match="simulated"):
        trainer.train()
    monkeypatch.undo()
    _same_prior(Prior.from_pretrained(tmp_path / "checkpoint-2", model=model), prior)
    broken = tmp_path / "checkpoint-4"
    assert not (broken / "fisher").exists() and not (broken / "model.safetensors").exists()
    assert not [p for p in broken.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    # resume_from_checkpoint=True skips the incomplete checkpoint-4 and restores the prior of checkpoint-2
    fresh = ContinualTrainer(model=make_model("seq", seed=9), args=args, train_dataset=make_dataset("seq", 8))
    fresh.train(resume_from_checkpoint=True)
    _same_prior(fresh.prior, prior)


def test_an_interrupted_save_model_keeps_the_previous_prior(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("seq")
    trainer = ContinualTrainer(model=model, args=_args(tmp_path), train_dataset=make_dataset("seq", 8))
    trainer.consolidate(task_name="a")
    trainer.save_model()
    before = Prior.from_pretrained(tmp_path, model=model)
    trainer.consolidate(task_name="b")  # in memory: 2 tasks; on disk too (consolidate saves)
    _failing_save_file(monkeypatch, fail_on_call=1)
    with pytest.raises(OSError, match="simulated"):
        trainer.save_model()
    monkeypatch.undo()
    after = Prior.from_pretrained(tmp_path, model=model)
    assert [t.name for t in after.tasks] == ["a", "b"]  # the last complete save, not a torn one
    assert len(before.tasks) == 1
    _failing_save_file(monkeypatch, fail_on_call=1)
    with pytest.raises(OSError, match="simulated"):
        trainer.consolidate(task_name="c")
    monkeypatch.undo()
    _same_prior(Prior.from_pretrained(tmp_path, model=model), after)


# ----------------------------------------------------------------------- parallelism
class _StateWithPlugin:
    """Accelerate's state as DeepSpeed would leave it: the real state plus a ``deepspeed_plugin``."""

    def __init__(self, real: Any, plugin: Any) -> None:
        self._real, self.deepspeed_plugin = real, plugin

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _plugin(kind: str) -> Any:
    from types import SimpleNamespace

    if kind == "attr-3":
        return SimpleNamespace(zero_stage=3)
    if kind == "config-3":  # older accelerate: the stage only in the DeepSpeed config dict
        return SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}})
    if kind == "attr-2":
        return SimpleNamespace(zero_stage=2)
    if kind == "config-1":
        return SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 1}})
    return SimpleNamespace()  # stage unknown


def _patch_accelerator(monkeypatch: pytest.MonkeyPatch, flag: str, plugin: Any) -> None:
    original = Trainer.create_accelerator_and_postprocess

    def patched(self: Trainer) -> None:
        original(self)
        setattr(self, flag, True)
        if plugin is not None:
            self.accelerator.state = _StateWithPlugin(self.accelerator.state, plugin)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", patched)


@pytest.mark.parametrize(
    "flag,plugin,name",
    [("is_fsdp_enabled", None, "FSDP"), ("is_deepspeed_enabled", "attr-3", "DeepSpeed ZeRO-3"),
     ("is_deepspeed_enabled", "config-3", "DeepSpeed ZeRO-3"), ("is_deepspeed_enabled", "unknown", r"DeepSpeed ZeRO-\?")],
)
def test_sharded_parameters_are_refused(flag: str, plugin: str | None, name: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_accelerator(monkeypatch, flag, None if plugin is None else _plugin(plugin))
    model = make_model("seq")
    with pytest.raises(ValueError, match=f"{name} is not supported with penalty='kfac'.*partial tensors"):
        ContinualTrainer(model=model, args=_args(tmp_path))
    plain = ContinualTrainer(model=model, args=_args(tmp_path, penalty="none", penalty_lambda=None))
    plain.args.penalty = "kfac"  # even if the penalty is switched on afterwards, consolidation stays refused
    with pytest.raises(ValueError, match="not supported under"):
        plain.consolidate(dataset=make_dataset("seq", 4))


@pytest.mark.parametrize("plugin,stage", [("attr-2", 2), ("config-1", 1)])
def test_zero_1_and_2_are_allowed_with_a_warning(plugin: str, stage: int, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _patch_accelerator(monkeypatch, "is_deepspeed_enabled", _plugin(plugin))
    with caplog.at_level("WARNING", logger="hf_kfac.trainer"):
        trainer = ContinualTrainer(model=make_model("seq"), args=_args(tmp_path))
    assert trainer._unsupported_parallelism() is None
    assert f"ZeRO-{stage} is untested" in caplog.text
