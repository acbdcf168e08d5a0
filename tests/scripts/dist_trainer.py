"""Worker for the 2-process ContinualTrainer tests (torchrun, gloo, ``use_cpu=True``).

``torchrun --nproc_per_node 2 tests/scripts/dist_trainer.py WORK_DIR`` reads ``WORK_DIR/plan.json``
(written by tests/test_trainer_distributed.py):

- ``steps``: one SGD step per entry (model + prior folder, rows, GA, batch size,
  average_tokens_across_devices); rank 0 writes the updated weights to ``<name>.safetensors``.
- ``consolidate``: train two steps, consolidate on (uneven) shards, save_model to ``cons/``.

Rank 0 writes every file; every rank prints its distributed type.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_fixtures import leave_process_group, sgd_args  # noqa: E402


def main() -> None:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, BertLMHeadModel

    from hf_kfac.trainer import ContinualTrainer

    torch.set_num_threads(1)
    work = sys.argv[1]
    with open(os.path.join(work, "plan.json")) as f:
        plan = json.load(f)
    from hf_kfac.el.models import ELClassifier

    classes = {"seq": AutoModelForSequenceClassification, "lm": BertLMHeadModel, "tok": AutoModelForTokenClassification,
               "el": ELClassifier}
    trainer = None
    for step in plan["steps"]:
        model = classes[step["kind"]].from_pretrained(step["model"])
        ds = datasets.Dataset.from_dict(step["rows"])
        args = sgd_args(
            os.path.join(work, "runs", step["name"]),
            gradient_accumulation_steps=step["ga"],
            per_device_train_batch_size=step["bs"],
            average_tokens_across_devices=step["avg"],
            penalty_lambda=step["lam"],
        )
        trainer = ContinualTrainer(model=model, args=args, train_dataset=ds, prior=step["model"])
        trainer.train()
        if trainer.is_world_process_zero():
            save_file({k: p.detach().contiguous() for k, p in model.named_parameters()}, os.path.join(work, step["name"] + ".safetensors"))
        print(f"{step['name']}: accepts_loss_kwargs={trainer.model_accepts_loss_kwargs}", flush=True)

    cons = plan.get("consolidate")
    if cons:
        model = classes[cons["kind"]].from_pretrained(cons["model"])
        args = sgd_args(
            os.path.join(work, "cons"), max_steps=2, per_device_train_batch_size=2, learning_rate=0.05,
            fisher_type="empirical", fisher_batch_size=2, penalty_lambda=0.5, logging_steps=1,
        )
        ds = datasets.Dataset.from_dict(cons["rows"])
        trainer = ContinualTrainer(model=model, args=args, train_dataset=ds)
        trainer.train()
        trainer.consolidate(task_name="two-procs")
        trainer.save_model()
    assert trainer is not None
    print(f"rank {trainer.args.process_index} of {trainer.args.world_size} distributed_type={trainer.accelerator.distributed_type.value}", flush=True)
    leave_process_group()


if __name__ == "__main__":
    main()
