"""ContinualTrainer end to end: train, consolidate, save, continue, checkpoints, resume, push, any model."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    TrainerCallback,
    default_data_collator,
)

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from trainer_fixtures import (  # noqa: E402
    batches_of,
    make_dataset,
    make_model,
    make_rows,
    one_thread,
    perturb,
    state,
)

from hf_kfac import Curvature, Prior, PredictiveOutput, estimate_fisher  # noqa: E402
from hf_kfac.trainer import ContinualTrainer  # noqa: E402
from hf_kfac.trainer_config import ContinualConfig  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)


def _args(out: Path, **kw) -> ContinualConfig:
    base = dict(
        output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True, per_device_train_batch_size=4,
        max_steps=2, save_strategy="no", learning_rate=1e-2, logging_steps=1, seed=0, penalty="kfac",
        penalty_lambda=0.05, fisher_type="empirical", dataloader_num_workers=0,
    )
    base.update(kw)
    return ContinualConfig(**base)


def _assert_same_curvature(got: Curvature, want: Curvature, rtol: float = 1e-5) -> None:
    assert set(got.kfac) == set(want.kfac) and set(got.diag) == set(want.diag)
    assert got.n_examples == want.n_examples
    for k, b in want.kfac.items():
        torch.testing.assert_close(got.kfac[k].A.cpu(), b.A.cpu(), rtol=rtol, atol=1e-7, msg=k)
        torch.testing.assert_close(got.kfac[k].G.cpu(), b.G.cpu(), rtol=rtol, atol=1e-7, msg=k)
    for k, d in want.diag.items():
        torch.testing.assert_close(got.diag[k].cpu(), d.cpu(), rtol=rtol, atol=1e-9, msg=k)


def _direct_fisher(model: nn.Module, rows: dict, bs: int, **kw) -> Curvature:
    """The Fisher by hand: a plain DataLoader over the same rows, in order, the default collator."""
    ds = make_dataset_from_rows(rows)
    loader = DataLoader(ds, batch_size=bs, shuffle=False, collate_fn=default_data_collator)
    return estimate_fisher(model, loader, progress=False, **kw)


def make_dataset_from_rows(rows: dict) -> Any:
    import datasets

    return datasets.Dataset.from_dict(rows)


def test_two_tasks_fisher_is_the_direct_estimate_anchor_is_the_weights_checkpoints_hold_the_prior_task_two_appends(
    tmp_path: Path,
) -> None:
    """Train and consolidate task A, then continue on task B from the saved folder: the consolidated Fisher
    equals a direct estimate on A's rows, the anchor equals the trained weights bit for bit, the record holds
    the task's name, size and metadata, every checkpoint of task B holds the prior, and consolidating B
    appends a second task to it."""
    rows_a, rows_b = make_rows("seq", 10, seed=1), make_rows("seq", 9, seed=2)
    task_a, task_b = make_dataset_from_rows(rows_a), make_dataset_from_rows(rows_b)
    out_a, out_b = tmp_path / "el-disease", tmp_path / "el-drugs"

    model = make_model("seq", dropout=0.1)
    trainer = ContinualTrainer(model=model, args=_args(out_a), train_dataset=task_a)
    trainer.train()
    record = trainer.consolidate(task_name="diseases", metadata={"accuracy": 0.9})
    assert (out_a / "fisher" / "prior_config.json").is_file()  # saved beside the model at once
    trainer.save_model()
    assert (out_a / "model.safetensors").is_file() and (out_a / "config.json").is_file()

    # the consolidated Fisher is the one of the trained model on task A's data, batch by batch
    prior = trainer.prior
    assert prior is not None and prior.num_tasks == 1 and prior.config.shape == "kfac"
    want = _direct_fisher(model, rows_a, 4, shape="kfac", fisher_type="empirical")
    _assert_same_curvature(prior.slots[0].curvature, want)
    for k, p in model.named_parameters():
        assert torch.equal(prior.slots[0].anchor[k], p.detach().cpu().float()), k
    assert record.name == "diseases" and record.n_examples == 10 and record.date
    assert record.metadata["penalty"] == "kfac" and record.metadata["lambda"] == 0.05
    assert record.metadata["fisher_type"] == "empirical" and record.metadata["accuracy"] == 0.9
    assert record.fisher["shape"] == "kfac" and record.fisher["fisher_type"] == "empirical"

    # months later: new data, old data gone
    model_b = AutoModelForSequenceClassification.from_pretrained(out_a)
    args_b = _args(out_b, save_strategy="steps", save_steps=1)
    trainer_b = ContinualTrainer(model=model_b, args=args_b, train_dataset=task_b, prior=str(out_a))
    assert trainer_b.prior.num_tasks == 1
    assert float(trainer_b.penalty_value().detach()) == 0.0  # the loaded model sits at the anchor
    trainer_b.train()
    assert float(trainer_b.penalty_value().detach()) > 0.0
    for step in (1, 2):  # every checkpoint holds the prior
        saved = Prior.from_pretrained(out_b / f"checkpoint-{step}", model=model_b)
        assert [t.name for t in saved.tasks] == ["diseases"]
    trainer_b.consolidate(task_name="drugs")
    trainer_b.save_model()
    final = Prior.from_pretrained(out_b, model=model_b)
    assert [t.name for t in final.tasks] == ["diseases", "drugs"]
    assert [t.n_examples for t in final.tasks] == [10, 9]
    # the subfolder itself is accepted too
    assert ContinualTrainer(model=model_b, args=_args(tmp_path / "c"), prior=str(out_b / "fisher")).prior.num_tasks == 2


def test_consolidate_uses_the_collator_batch_size_and_limits(tmp_path: Path) -> None:
    """Unpadded rows need the trainer's collator; limits count examples over the whole run."""
    rows = make_rows("tok", 10, seed=3)
    lengths = [sum(m) for m in rows["attention_mask"]]
    ragged = {k: [v[i][: lengths[i]] for i in range(10)] for k, v in rows.items()}
    seen: list[int] = []

    def pad_collator(features: list[dict]) -> dict:
        seen.append(len(features))
        width = max(len(f["input_ids"]) for f in features)
        out = {}
        for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            out[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features])
        return out

    model = make_model("tok")
    ds = make_dataset_from_rows(ragged)
    args = _args(tmp_path, fisher_batch_size=3)
    trainer = ContinualTrainer(model=model, args=args, train_dataset=ds, data_collator=pad_collator)
    rec = trainer.consolidate()
    assert seen == [3, 3, 3, 1] and rec.metadata["n_fisher_examples"] == 10 and rec.name == "task-1"
    want = estimate_fisher(model, [pad_collator([ds[i] for i in range(j, min(j + 3, 10))]) for j in (0, 3, 6, 9)],
                           shape="kfac", fisher_type="empirical", progress=False)
    _assert_same_curvature(trainer.prior.slots[0].curvature, want)

    seen.clear()
    args = _args(tmp_path / "lim", fisher_batch_size=3, fisher_max_batches=2, penalty="ewc")
    trainer = ContinualTrainer(model=model, args=args, train_dataset=ds, data_collator=pad_collator)
    rec = trainer.consolidate(n_examples=1000)
    assert seen == [3, 3] and rec.metadata["n_fisher_examples"] == 6 and rec.n_examples == 1000
    assert trainer.prior.slots[0].curvature.n_examples == 6 and not trainer.prior.slots[0].curvature.kfac

    seen.clear()
    args = _args(tmp_path / "lim2", fisher_batch_size=4, fisher_max_examples=5, penalty="ewc")
    trainer = ContinualTrainer(model=model, args=args, train_dataset=ds, data_collator=pad_collator)
    rec = trainer.consolidate()
    assert seen == [4, 1] and rec.metadata["n_fisher_examples"] == 5 and rec.n_examples == 10


def test_iterable_datasets_are_consolidated_too(tmp_path: Path) -> None:
    rows = make_rows("seq", 10, seed=6)
    model = make_model("seq")
    args = _args(tmp_path, fisher_batch_size=4)
    trainer = ContinualTrainer(model=model, args=args)
    streamed = make_dataset_from_rows(rows).to_iterable_dataset()
    rec = trainer.consolidate(dataset=streamed, task_name="stream")
    assert rec.n_examples == 10 and rec.metadata["n_fisher_examples"] == 10
    _assert_same_curvature(trainer.prior.slots[0].curvature, _direct_fisher(model, rows, 4, shape="kfac", fisher_type="empirical"))
    limited = ContinualTrainer(model=model, args=_args(tmp_path / "lim", fisher_batch_size=4, fisher_max_examples=6))
    rec = limited.consolidate(dataset=streamed, n_examples=500)
    assert rec.n_examples == 500 and rec.metadata["n_fisher_examples"] == 6  # the first 6 of the stream
    first6 = {k: v[:6] for k, v in rows.items()}
    _assert_same_curvature(limited.prior.slots[0].curvature, _direct_fisher(model, first6, 4, shape="kfac", fisher_type="empirical"))
    l2 = ContinualTrainer(model=model, args=_args(tmp_path / "l2", penalty="l2"))
    with pytest.raises(ValueError, match="n_examples"):
        l2.consolidate(dataset=streamed)


def test_l2_consolidation_estimates_no_fisher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hf_kfac.trainer as trainer_module

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("an L2 prior must not estimate a Fisher")

    monkeypatch.setattr(trainer_module, "estimate_fisher", boom)
    model = make_model("seq")
    trainer = ContinualTrainer(model=model, args=_args(tmp_path, penalty="l2"), train_dataset=make_dataset("seq", 6))
    rec = trainer.consolidate(task_name="a")
    assert trainer.prior.config.shape == "identity" and rec.n_examples == 6
    assert trainer.prior.slots[0].curvature is None
    assert Prior.from_pretrained(tmp_path).config.shape == "identity"


@pytest.mark.parametrize("kind", ["tok", "mlm", "lm"])
def test_token_level_models_work_out_of_the_box(kind: str, tmp_path: Path) -> None:
    """Token classification and masked LM (-100 ignored) and causal LM (shifted) need no hook."""
    rows = make_rows(kind, 6, seed=4)
    model = make_model(kind)
    args = _args(tmp_path, max_steps=1, fisher_batch_size=4, kfac_max_factor_ratio=100.0)
    trainer = ContinualTrainer(model=model, args=args, train_dataset=make_dataset_from_rows(rows))
    trainer.train()
    trainer.consolidate()
    want = _direct_fisher(model, rows, 4, shape="kfac", fisher_type="empirical", max_factor_ratio=100.0)
    _assert_same_curvature(trainer.prior.slots[0].curvature, want)


class _Scorer(nn.Module):
    """A non-transformers model: returns a dict with `loss` and `scores` (no `logits`)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        scores = self.body(x)
        out = {"scores": scores}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(scores, labels)
        return out


def test_custom_model_through_predictive_fn(tmp_path: Path) -> None:
    import datasets

    g = torch.Generator().manual_seed(0)
    ds = datasets.Dataset.from_dict({"x": torch.randn(12, 5, generator=g).tolist(), "labels": torch.randint(0, 4, (12,), generator=g).tolist()})
    torch.manual_seed(0)
    model = _Scorer()
    calls = []

    def predictive_fn(m: nn.Module, batch: dict) -> PredictiveOutput:
        calls.append(1)
        return PredictiveOutput(m(batch["x"])["scores"], batch["labels"])

    with pytest.raises(TypeError, match="predictive_fn"):
        ContinualTrainer(model=copy.deepcopy(model), args=_args(tmp_path / "no"), train_dataset=ds).consolidate()
    trainer = ContinualTrainer(model=model, args=_args(tmp_path), train_dataset=ds, predictive_fn=predictive_fn)
    trainer.train()
    trainer.consolidate()
    assert calls
    batches = [{"x": torch.tensor(ds["x"][i : i + 4]), "labels": torch.tensor(ds["labels"][i : i + 4])} for i in (0, 4, 8)]
    want = estimate_fisher(model, batches, shape="kfac", fisher_type="empirical", predictive_fn=predictive_fn, progress=False)
    _assert_same_curvature(trainer.prior.slots[0].curvature, want)
    trainer.save_model()
    assert (tmp_path / "fisher" / "prior_config.json").is_file() and (tmp_path / "model.safetensors").is_file()


def test_bf16_mixed_precision_keeps_the_prior_float32(tmp_path: Path) -> None:
    seen = []

    def spy(m: nn.Module, batch: dict) -> PredictiveOutput:
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        from hf_kfac.curvature import default_predictive_fn

        return default_predictive_fn(m, batch)

    base = make_model("seq")
    rows = make_rows("seq", 8)
    prior = Prior(shape="kfac", damping=1e-3)
    prior.add_task(base, estimate_fisher(base, batches_of(rows, 4), shape="kfac", fisher_type="empirical", progress=False), "a")
    perturb(base)
    args = _args(tmp_path, bf16=True, penalty_lambda=0.5, max_steps=2)
    trainer = ContinualTrainer(model=base, args=args, train_dataset=make_dataset_from_rows(rows), prior=prior, predictive_fn=spy)
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    logs = [x for x in trainer.state.log_history if "loss" in x]
    assert logs and all(torch.isfinite(torch.tensor(x["loss"])) and x["loss_penalty"] > 0 for x in logs)
    trainer.consolidate()
    assert seen and all(on and dt == torch.bfloat16 for on, dt in seen)
    assert all(t.dtype == torch.float32 for t in trainer.prior.state_dict().values())
    files = list((tmp_path / "fisher").glob("*.safetensors"))
    assert files and all(t.dtype == torch.float32 for f in files for t in load_file(f).values())
    assert trainer.penalty_value().dtype == torch.float32


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_restores_the_prior_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # task A
    model_a = make_model("seq", dropout=0.1)
    args_a = _args(tmp_path / "a", max_steps=2, fisher_type="mc")
    trainer_a = ContinualTrainer(model=model_a, args=args_a, train_dataset=make_dataset("seq", 8, seed=1))
    trainer_a.train()
    trainer_a.consolidate(task_name="A")
    trainer_a.save_model()
    task_b = make_dataset("seq", 12, seed=2)

    def args_b(out: Path) -> ContinualConfig:
        return _args(out, max_steps=6, save_strategy="steps", save_steps=3, penalty_lambda=2.0, learning_rate=0.05)

    # uninterrupted
    model_u = BertForSequenceClassification.from_pretrained(tmp_path / "a")
    ContinualTrainer(model=model_u, args=args_b(tmp_path / "u"), train_dataset=task_b, prior=str(tmp_path / "a")).train()
    # interrupted after the checkpoint at step 3
    model_i = BertForSequenceClassification.from_pretrained(tmp_path / "a")
    stopped = ContinualTrainer(
        model=model_i, args=args_b(tmp_path / "i"), train_dataset=task_b, prior=str(tmp_path / "a"), callbacks=[_StopAt(3)]
    )
    stopped.train()
    assert stopped.state.global_step == 3
    ckpt = tmp_path / "i" / "checkpoint-3"
    assert (ckpt / "fisher" / "prior_config.json").is_file()
    # resumed by a fresh trainer that is not given the prior, on a model with other weights
    fresh = make_model("seq", seed=123, dropout=0.1)
    resumed = ContinualTrainer(model=fresh, args=args_b(tmp_path / "i"), train_dataset=task_b)
    assert resumed.prior is None
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.prior is not None and [t.name for t in resumed.prior.tasks] == ["A"]
    original = trainer_a.prior.state_dict()
    assert resumed.prior.state_dict().keys() == original.keys()
    assert all(torch.equal(resumed.prior.state_dict()[k], v) for k, v in original.items())  # anchors and factors, exactly
    assert resumed.state.global_step == 6
    want, got = state(model_u), state(fresh)
    for k in want:
        # attention key biases have zero gradient in exact arithmetic (softmax ignores a constant per
        # query), so Adam turns their round-off gradients into updates of order lr: compare loosely
        atol = 1e-4 if "key.bias" in k else 1e-6
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=atol, msg=k)

    # a save killed just before its final rename leaves the complete prior only in its hidden
    # temporary folder: resume puts it in place
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "i", killed, ignore=shutil.ignore_patterns("checkpoint-6"))
    (killed / "checkpoint-3" / "fisher").rename(killed / "checkpoint-3" / ".fisher.tmp-k1ll3d")
    again = make_model("seq", seed=123, dropout=0.1)
    ContinualTrainer(model=again, args=args_b(killed), train_dataset=task_b).train(
        resume_from_checkpoint=str(killed / "checkpoint-3"))
    assert (killed / "checkpoint-3" / "fisher" / "prior_config.json").is_file()
    for k in want:
        torch.testing.assert_close(state(again)[k], want[k], rtol=1e-5, atol=1e-4 if "key.bias" in k else 1e-6, msg=k)

    # control: the same resume without the prior in the checkpoint ends elsewhere
    bare = tmp_path / "bare"
    shutil.copytree(tmp_path / "i", bare, ignore=shutil.ignore_patterns("checkpoint-6"))
    shutil.rmtree(bare / "checkpoint-3" / "fisher")
    other = make_model("seq", seed=123, dropout=0.1)
    ContinualTrainer(model=other, args=args_b(bare), train_dataset=task_b).train(resume_from_checkpoint=str(bare / "checkpoint-3"))
    diff = max(float((state(other)[k] - want[k]).abs().max()) for k in want if "key.bias" not in k)
    assert diff > 1e-3


def test_mid_training_pushes_carry_the_prior(hub_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.utils.hub as hf_hub_utils

    monkeypatch.setattr(hf_hub_utils, "_hf_api", None)  # the Trainer's shared client, bound to the test server
    base = make_model("seq")
    rows = make_rows("seq", 8)
    prior = Prior(shape="kfac")
    prior.add_task(base, estimate_fisher(base, batches_of(rows, 4), shape="kfac", fisher_type="empirical", progress=False), "A")
    out = tmp_path / "out"
    args = _args(
        out, push_to_hub=True, hub_model_id="test-user/continual", hub_strategy="checkpoint", hub_token=hub_server.token,
        save_strategy="steps", save_steps=1, max_steps=2,
    )
    trainer = ContinualTrainer(model=base, args=args, train_dataset=make_dataset_from_rows(rows), prior=prior)
    trainer.train()
    trainer._finish_current_push()
    files = hub_server.list_files("test-user/continual")
    assert "fisher/prior_config.json" in files, files
    assert "last-checkpoint/fisher/prior_config.json" in files, files
    assert "model.safetensors" in files
    pushed = json.loads(hub_server.read_file("test-user/continual", "fisher/prior_config.json"))
    assert [t["name"] for t in pushed["tasks"]] == ["A"]
    loaded = Prior.from_pretrained("test-user/continual", model=base)
    for k, v in prior.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # a Hub repo id works as prior=, and the revision is passed through
    again = ContinualTrainer(model=base, args=_args(tmp_path / "next"), prior="test-user/continual", prior_revision="main")
    assert [t.name for t in again.prior.tasks] == ["A"]
    from hf_kfac import PriorFileError

    with pytest.raises(PriorFileError, match="revision 'no-such-branch'"):
        ContinualTrainer(model=base, args=_args(tmp_path / "next"), prior="test-user/continual", prior_revision="no-such-branch")


def test_compact_prior_saved_beside_the_model_references_its_weights(tmp_path: Path) -> None:
    """With compact storage, save_model() may store the anchor as a reference to the weights beside it."""
    from hf_kfac import PriorConfig

    model = make_model("seq", hidden_size=16, intermediate_size=32)
    prior = Prior(PriorConfig(shape="kfac", storage="compact"))
    trainer = ContinualTrainer(model=model, args=_args(tmp_path / "a"), train_dataset=make_dataset("seq", 8), prior=prior)
    trainer.consolidate(task_name="A")
    trainer.save_model()
    cfg = json.loads((tmp_path / "a" / "fisher" / "prior_config.json").read_text())
    assert "anchor_ref" in cfg["slots"][0]
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a")
    again = ContinualTrainer(model=loaded, args=_args(tmp_path / "b"), train_dataset=make_dataset("seq", 8), prior=str(tmp_path / "a"))
    assert float(again.penalty_value().detach()) == 0.0
    other = make_model("seq", seed=5, hidden_size=16, intermediate_size=32)
    from hf_kfac import PriorFileError

    with pytest.raises(PriorFileError, match="other weights"):
        ContinualTrainer(model=other, args=_args(tmp_path / "c"), prior=str(tmp_path / "a"))


def test_prior_storage_option_builds_a_compact_prior_and_guards_a_loaded_one(tmp_path: Path) -> None:
    """prior_storage='compact' gives the new prior compact factors; a loaded prior keeps its own format."""
    model = make_model("seq", hidden_size=16, intermediate_size=32)
    trainer = ContinualTrainer(model=model, args=_args(tmp_path / "a", prior_storage="compact"),
                               train_dataset=make_dataset("seq", 8))
    trainer.consolidate(task_name="A")
    assert trainer.prior.config.storage.compact
    trainer.save_model()
    cfg = json.loads((tmp_path / "a" / "fisher" / "prior_config.json").read_text())
    assert cfg["prior"]["storage"]["format"] == "compact"
    assert cfg["slots"][0]["kfac"] and all(b["format"] == "compact" for b in cfg["slots"][0]["kfac"].values())
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="prior_storage='full'.*one storage format"):
        ContinualTrainer(model=loaded, args=_args(tmp_path / "b", prior_storage="full"), prior=str(tmp_path / "a"))
    kept = ContinualTrainer(model=loaded, args=_args(tmp_path / "c"), prior=str(tmp_path / "a"))
    assert kept.prior.config.storage.compact


def test_model_card_tells_the_task_history(tmp_path: Path) -> None:
    model = make_model("seq")
    trainer = ContinualTrainer(model=model, args=_args(tmp_path, penalty="ewc"), train_dataset=make_dataset("seq", 6))
    trainer.consolidate(task_name="diseases")
    trainer.create_model_card(model_name="el-demo")
    text = (tmp_path / "README.md").read_text()
    assert "diseases" in text and "hf_kfac" in text
    # the "Continue training" snippet loads the trained class (with its head), not a bare encoder
    assert f"from transformers import {type(model).__name__}" in text
    assert f'model = {type(model).__name__}.from_pretrained(' in text
