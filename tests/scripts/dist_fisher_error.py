"""Worker for the 2-process failure test: rank 1's batch holds a label the model cannot predict.

Run with ``torchrun --nproc_per_node 2 tests/scripts/dist_fisher_error.py``. Every rank must stop
with an error, without waiting for the failed one in a collective.
"""

from __future__ import annotations

import os
import sys

from accelerate import PartialState

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dist_fisher import make_model_and_data  # noqa: E402

from hf_kfac import estimate_fisher  # noqa: E402


def main() -> None:
    state = PartialState(cpu=True)
    model, batches = make_model_and_data()
    mine = batches[state.process_index :: state.num_processes]
    if state.process_index == 1:
        mine[0]["labels"][0, 0] = 7  # 3 classes
    try:
        estimate_fisher(model, mine, shape="kfac", fisher_type="empirical", progress=False)
    except Exception as e:  # noqa: BLE001 - reported for the test to read
        print(f"rank {state.process_index} raised {type(e).__name__}: {e}", flush=True)
        sys.exit(3)
    print(f"rank {state.process_index} finished", flush=True)


if __name__ == "__main__":
    main()
