"""Worker for the 2-process test: each rank estimates the Fisher on its half of the data.

Run with ``torchrun --nproc_per_node 2 tests/scripts/dist_fisher.py OUT_DIR [shards|accelerate]``;
rank 0 writes the factors of every configuration to ``OUT_DIR/<mode>-<shape>-<fisher_type>-<approx>.safetensors``.
``shards``: each rank takes every other batch. ``accelerate``: a DataLoader of 7 examples prepared by
``Accelerator``, whose last batches are topped up with repeated examples.
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import PartialState
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from oracles import tiny_bert_config  # noqa: E402
from trainer_fixtures import leave_process_group  # noqa: E402
from transformers import BertForTokenClassification  # noqa: E402

from hf_kfac import estimate_fisher  # noqa: E402


def make_model_and_data() -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_bert_config())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (8, 6), generator=g)
    am = torch.ones_like(ids)
    for i in range(8):
        am[i, 2 + i % 4 :] = 0
    ids[am == 0] = 0
    labels = torch.randint(0, 3, (8, 6), generator=g)
    labels[am == 0] = -100
    return model, [{"input_ids": ids[i : i + 2], "attention_mask": am[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, 8, 2)]


CONFIGS = [("kfac", "empirical", "expand"), ("kfac", "exact", "reduce"), ("diag", "empirical", "expand")]


def flat(curv) -> dict[str, torch.Tensor]:
    out = {f"kfac.{k}.A": b.A for k, b in curv.kfac.items()}
    out.update({f"kfac.{k}.G": b.G for k, b in curv.kfac.items()})
    out.update({f"diag.{k}": v for k, v in curv.diag.items()})
    out["n_examples"] = torch.tensor(float(curv.n_examples))
    return {k: v.contiguous() for k, v in out.items()}


def accelerate_rows() -> list[dict]:
    """The first 7 examples, one dict each: 7 = 4 + 3 fills Accelerate's second round of 2 x 2 with one repeat."""
    _, batches = make_model_and_data()
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]
    return rows[:7]


def main() -> None:
    state = PartialState(cpu=True)
    model, batches = make_model_and_data()
    mode = sys.argv[2] if len(sys.argv) > 2 else "shards"
    if mode == "accelerate":  # Accelerator.prepare's loader: even_batches tops the last batches up with repeats
        from accelerate import Accelerator
        from torch.utils.data import DataLoader

        mine = Accelerator(cpu=True).prepare(DataLoader(accelerate_rows(), batch_size=2))
        sizes = [int(b["input_ids"].shape[0]) for b in mine]
        print(f"rank {state.process_index} batch sizes {sizes}", flush=True)
    else:
        mine = batches[state.process_index :: state.num_processes]
    for shape, ft, approx in CONFIGS:
        curv = estimate_fisher(model, mine, shape=shape, fisher_type=ft, kfac_approx=approx, progress=False)
        if state.is_main_process:
            save_file(flat(curv), os.path.join(sys.argv[1], f"{mode}-{shape}-{ft}-{approx}.safetensors"))
    print(f"rank {state.process_index} distributed_type={state.distributed_type}")
    leave_process_group()


if __name__ == "__main__":
    main()
