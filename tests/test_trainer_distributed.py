"""Two processes (torchrun, gloo, CPU DDP) train and consolidate like one process with all the data."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from trainer_fixtures import (  # noqa: E402
    expected_gradient,
    make_model,
    make_prior,
    make_rows,
    max_rel_error,
    one_thread,
    perturb,
    sgd_args,
    state,
)

from hf_kfac import Prior  # noqa: E402
from hf_kfac.trainer import ContinualTrainer  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)
LR = 0.5  # sgd_args' learning rate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(work: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(ROOT / "tests" / "scripts" / "dist_trainer.py"), str(work),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_two_processes_step_like_one_and_consolidate_like_one(tmp_path: Path) -> None:
    """One launch, two checks.

    1. One SGD step under DDP (2 processes × batch × GA = the 8 examples) moves the weights by
       −lr ∇(L + λP), with L over all 8 examples, for: a causal LM whose loss is normalised by the
       token count (average_tokens_across_devices on and off, GA 1 and 2) and a BERT head whose
       loss is a per-batch mean. The penalty's gradient is λ∇P once, not twice (2 processes) nor
       half (DDP's average). Also an entity linker on its second task, whose prior covers the first
       task's head, which the forward does not use (DDP's find_unused_parameters is on by default).
    2. Train, consolidate on disjoint, uneven shards (7 examples, batches of 2), save: the prior
       equals the one a single process consolidates on all 7 examples at the saved weights.
    """
    lam = 0.7
    plan: dict = {"steps": []}
    expected: dict[str, tuple[dict, dict]] = {}
    for kind, ragged in (("lm", True), ("lm", False), ("seq", True)):
        base = make_model(kind)
        prior = make_prior(base, kind)
        perturb(base)
        folder = tmp_path / f"model-{kind}-{ragged}"
        base.save_pretrained(folder)
        prior.save_pretrained(folder / "fisher")
        rows = make_rows(kind, 8, ragged=ragged)
        want = expected_gradient(copy.deepcopy(base), kind, rows, prior, lam)
        configs = [(1, 4, True), (2, 2, True)] if ragged else [(2, 2, False)]
        if kind == "seq":
            configs = [(2, 2, True)]
        for ga, bs, avg in configs:
            name = f"{kind}-{'ragged' if ragged else 'even'}-ga{ga}-avg{int(avg)}"
            plan["steps"].append(dict(name=name, kind=kind, model=str(folder), rows=rows, ga=ga, bs=bs, avg=avg, lam=lam))
            expected[name] = (state(base), want)
    # an entity linker's second task: the forward uses head B only, the prior covers head A (which DDP,
    # finding it unused, marks ready after the forward: the penalty must not reach it through autograd)
    from oracles import tiny_bert_config

    from hf_kfac.el.models import ELClassifier

    torch.manual_seed(0)
    el = ELClassifier.from_encoder_config(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    el.add_task_head("A", ["a0", "a1", "a2"])
    prior = make_prior(el, "seq")
    el.add_task_head("B", ["b0", "b1", "b2"])
    perturb(el)
    folder = tmp_path / "model-el"
    el.save_pretrained(folder)
    prior.save_pretrained(folder / "fisher")
    rows = make_rows("seq", 8)
    plan["steps"].append(dict(name="el-unused-head-ga2", kind="el", model=str(folder), rows=rows, ga=2, bs=2, avg=True,
                              lam=lam))
    expected["el-unused-head-ga2"] = (state(el), expected_gradient(copy.deepcopy(el), "seq", rows, prior, lam))
    assert expected["el-unused-head-ga2"][1]["heads.A.weight"].abs().max() > 0  # head A moves by the penalty alone

    tok = make_model("tok")
    tok.save_pretrained(tmp_path / "model-tok")
    cons_rows = make_rows("tok", 7, seed=11)
    plan["consolidate"] = dict(kind="tok", model=str(tmp_path / "model-tok"), rows=cons_rows)
    (tmp_path / "plan.json").write_text(json.dumps(plan))

    proc = _torchrun(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("distributed_type=MULTI_CPU") == 2, proc.stdout[-2000:]
    assert "seq-ragged-ga2-avg1: accepts_loss_kwargs=False" in proc.stdout
    assert "lm-ragged-ga1-avg1: accepts_loss_kwargs=True" in proc.stdout

    # 1. the update of every configuration is −lr ∇(L + λP) over the 8 examples
    for name, (before, want) in expected.items():
        after = load_file(str(tmp_path / f"{name}.safetensors"))
        got = {k: (before[k] - after[k]) / LR for k in before}
        err, worst = max_rel_error(got, want)
        assert err < 5e-5, f"{name}: {worst} off by {err:.2e}"

    # 2. the 2-process prior equals a 1-process consolidation on all the data at the same weights
    from transformers import AutoModelForTokenClassification

    import datasets

    saved = Prior.from_pretrained(tmp_path / "cons")
    assert [t.name for t in saved.tasks] == ["two-procs"] and saved.tasks[0].n_examples == 7
    assert saved.tasks[0].metadata["num_processes"] == 2 and saved.tasks[0].metadata["n_fisher_examples"] == 7
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "cons")
    args = sgd_args(str(tmp_path / "single"), fisher_type="empirical", fisher_batch_size=2, penalty_lambda=0.5)
    single = ContinualTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(cons_rows))
    single.consolidate(task_name="one-proc")
    want_sd, got_sd = single.prior.state_dict(), saved.state_dict()
    assert want_sd.keys() == got_sd.keys()
    for k in want_sd:
        torch.testing.assert_close(got_sd[k], want_sd[k], rtol=1e-5, atol=1e-7, msg=k)
    assert any(".kfac." in k for k in want_sd) and any(".diag." in k for k in want_sd)
