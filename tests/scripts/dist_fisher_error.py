"""Worker for the 2-process failure tests; the first argument picks what goes wrong.

- ``label``: rank 1's batch holds a label the model cannot predict. Every rank must stop with an
  error, without waiting for the failed one in a collective.
- ``plan``: a forward hook reads the weight of a same-shaped attention projection a second time,
  query's on rank 0 and key's on rank 1, so each rank hands a different module to the exact path. The counts agree but the
  statistics buffers would not line up: every rank must refuse to reduce them.

- ``frozen``: rank 1's model has no trainable parameter. Rank 1 refuses before any batch; rank 0
  must not wait for it.
- ``shapes``: rank 1's intermediate layers are one unit wider: the same parameter names, buffers of
  other sizes. Every rank must refuse to reduce them.

Run with ``torchrun --nproc_per_node 2 tests/scripts/dist_fisher_error.py label|plan|frozen|shapes``.
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import PartialState

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dist_fisher import make_model_and_data  # noqa: E402

from hf_kfac import estimate_fisher  # noqa: E402


def main() -> None:
    state = PartialState(cpu=True)
    model, batches = make_model_and_data()
    mine = batches[state.process_index :: state.num_processes]
    mode = sys.argv[1]
    if mode == "frozen" and state.process_index == 1:
        model.requires_grad_(False)
    if mode == "shapes" and state.process_index == 1:
        from oracles import tiny_bert_config
        from transformers import BertForTokenClassification

        torch.manual_seed(0)
        model = BertForTokenClassification(tiny_bert_config(intermediate_size=tiny_bert_config().intermediate_size + 1))
    if mode == "label" and state.process_index == 1:
        mine[0]["labels"][0, 0] = 7  # 3 classes
    if mode == "plan":
        proj = ("query", "key")[state.process_index]
        module = model.bert.encoder.layer[0].attention.self.get_submodule(proj)
        module.register_forward_hook(lambda m, i, o: o + 0.5 * torch.nn.functional.linear(i[0], m.weight))
    try:
        estimate_fisher(model, mine, shape="kfac", fisher_type="empirical", progress=False)
    except Exception as e:  # noqa: BLE001 - reported for the test to read
        print(f"rank {state.process_index} raised {type(e).__name__}: {e}", flush=True)
        sys.exit(3)
    print(f"rank {state.process_index} finished", flush=True)


if __name__ == "__main__":
    main()
