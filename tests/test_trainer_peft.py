"""ContinualTrainer on a PEFT (LoRA) model: the prior covers exactly the adapter's trainable parameters.

The reference for the update is the same as in test_trainer_scaling: plain SGD, so θ_before − θ_after
= lr · ∇[task loss + λ·P], with P written out as explicit quadratic forms over the prior's factors
(trainer_fixtures.hand_penalty) and differentiated by torch.autograd.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from trainer_fixtures import (  # noqa: E402
    expected_gradient,
    make_dataset,
    make_model,
    make_rows,
    one_thread,
    perturb,
    sgd_args,
    state,
    update_as_gradient,
)

from hf_kfac import Prior  # noqa: E402
from hf_kfac.prior import PriorFileError  # noqa: E402
from hf_kfac.trainer import ContinualTrainer  # noqa: E402

LR = 0.5
_one_thread = pytest.fixture(autouse=True)(one_thread)


def _lora(model: nn.Module) -> nn.Module:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value", "dense"], modules_to_save=["classifier"],
                             lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("penalty", ["kfac", "ewc"])
def test_lora_prior_covers_the_adapter_and_the_second_task_update_includes_its_penalty(
    penalty: str, tmp_path: Path
) -> None:
    model = _lora(make_model("seq"))
    trainer = ContinualTrainer(model=model, args=sgd_args(str(tmp_path / "a"), penalty=penalty, max_steps=2),
                               train_dataset=make_dataset("seq", 8, seed=1))
    trainer.train()
    trainer.consolidate(task_name="a")
    prior = trainer.prior
    assert set(prior.param_shapes) == _trainable(model)  # LoRA A/B and the classifier copy, nothing frozen
    assert any(".lora_A." in n for n in prior.param_shapes)
    if penalty == "kfac":
        assert any(".lora_B." in m for m in prior.slots[0].curvature.kfac)

    perturb(model, seed=3)
    base = copy.deepcopy(model)
    before = state(model)
    lam = 5.0
    second = ContinualTrainer(model=model, args=sgd_args(str(tmp_path / "b"), penalty=penalty, penalty_lambda=lam),
                              train_dataset=make_dataset("seq", 8, seed=2), prior=prior)
    second.train()
    got = update_as_gradient(before, model, LR)
    rows = make_rows("seq", 8, seed=2)
    want = expected_gradient(copy.deepcopy(base), "seq", rows, prior, lam)
    task_only = expected_gradient(base, "seq", rows, None, 0.0)
    assert set(want) == _trainable(base)
    pooler_b = "base_model.model.bert.pooler.dense.lora_B.default.weight"
    assert float((want[pooler_b] - task_only[pooler_b]).norm()) > 0.01 * float(want[pooler_b].norm())  # P matters
    for k, w in want.items():  # float32 round-off of (θ_before − θ_after) / lr: about 1e-7 absolute
        assert float((got[k] - w).norm()) <= 2e-5 * float(w.norm()) + 1e-6, k
    frozen = [k for k in got if k not in want]
    assert frozen and all(float(got[k].abs().max()) == 0.0 for k in frozen)  # the base model never moves


def test_a_saved_lora_model_and_prior_load_back_to_continue(tmp_path: Path) -> None:
    model = _lora(make_model("seq"))
    trainer = ContinualTrainer(model=model, args=sgd_args(str(tmp_path / "a"), max_steps=2),
                               train_dataset=make_dataset("seq", 8, seed=1))
    trainer.train()
    trainer.consolidate(task_name="a")
    trainer.save_model()
    trainer.create_model_card()  # after the save, as push_to_hub does (PEFT's own README is replaced)
    card = (tmp_path / "a" / "README.md").read_text(encoding="utf-8")
    assert "PeftModel.from_pretrained(" in card and "is_trainable=True" in card

    frozen = peft.PeftModel.from_pretrained(make_model("seq"), str(tmp_path / "a"))  # the default: not trainable
    with pytest.raises(ValueError, match="is_trainable=True"):
        ContinualTrainer(model=frozen, args=sgd_args(str(tmp_path / "x")), train_dataset=make_dataset("seq", 8),
                         prior=str(tmp_path / "a")).train()

    again = peft.PeftModel.from_pretrained(make_model("seq"), str(tmp_path / "a"), is_trainable=True)
    loaded = Prior.from_pretrained(str(tmp_path / "a"))
    assert set(loaded.param_shapes) == _trainable(again)
    params = dict(again.named_parameters())
    assert float(loaded.penalty(again, 1.0)) == pytest.approx(0.0, abs=1e-6)  # at its anchor
    for name in loaded.param_shapes:
        torch.testing.assert_close(params[name].detach(), loaded.slots[0].anchor[name])


def test_a_full_model_prior_on_a_lora_model_is_refused_naming_peft(tmp_path: Path) -> None:
    full = make_model("seq")
    trainer = ContinualTrainer(model=full, args=sgd_args(str(tmp_path / "a"), max_steps=1),
                               train_dataset=make_dataset("seq", 8, seed=1))
    trainer.train()
    trainer.consolidate(task_name="a")
    with pytest.raises(PriorFileError, match="PEFT model.*start a new prior for the adapter"):
        trainer.prior.check_compatible(_lora(full))


def test_dora_kfac_input_factor_is_that_of_plain_lora() -> None:
    """DoRA recomputes its weight norm as lora_B(lora_A(I)) on every forward, detached: those identity rows
    reach no prediction, so lora_A's input factor A must be the one of plain LoRA, whose inputs are the same."""
    from hf_kfac import estimate_fisher
    from trainer_fixtures import batches_of

    def build(dora: bool) -> nn.Module:
        config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query"], lora_dropout=0.0,
                                 use_dora=dora)
        model = peft.get_peft_model(make_model("seq"), config)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_A." in n or ".lora_B." in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        return model

    batches = batches_of(make_rows("seq", 8, seed=1), 4)
    lora, dora = (estimate_fisher(build(d), batches, shape="kfac", fisher_type="empirical", progress=False)
                  for d in (False, True))
    name = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default"
    torch.testing.assert_close(dora.kfac[name].A, lora.kfac[name].A, rtol=1e-5, atol=1e-6)
