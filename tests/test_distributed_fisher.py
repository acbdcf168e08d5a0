"""Two processes with half the data each give the Fisher of one process with all of it."""

from __future__ import annotations

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun with the gloo backend on CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    from dist_fisher import make_model_and_data

    proc = torchrun(ROOT / "tests" / "scripts" / "dist_fisher.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MULTI_CPU" in proc.stdout
    model, batches = make_model_and_data()
    _assert_same_fisher(model, batches, tmp_path, "shards")


def _assert_same_fisher(model: torch.nn.Module, batches: list[dict], out: Path, mode: str) -> None:
    from dist_fisher import CONFIGS, flat

    from hf_kfac import estimate_fisher

    for shape, ft, approx in CONFIGS:
        single = flat(estimate_fisher(model, batches, shape=shape, fisher_type=ft, kfac_approx=approx, progress=False))
        multi = load_file(str(out / f"{mode}-{shape}-{ft}-{approx}.safetensors"))
        assert single.keys() == multi.keys()
        for k in single:
            torch.testing.assert_close(multi[k], single[k], rtol=1e-5, atol=1e-8, msg=f"{shape}/{ft}/{approx}: {k}")


@pytest.mark.slow
def test_an_accelerate_prepared_loader_counts_each_example_once(tmp_path: Path) -> None:
    """Accelerate's default loader tops the last round of batches up with repeats of the first examples
    (7 examples, 2 processes x batch 2: one repeat); the Fisher must be the one of the 7 examples."""
    from dist_fisher import accelerate_rows, make_model_and_data

    proc = torchrun(ROOT / "tests" / "scripts" / "dist_fisher.py", str(tmp_path), "accelerate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 batch sizes [2, 2]" in proc.stdout and "rank 1 batch sizes [2, 2]" in proc.stdout  # 8 rows seen
    model, _ = make_model_and_data()
    rows = accelerate_rows()
    one_batch = [{k: torch.stack([r[k] for r in rows]) for k in rows[0]}]
    _assert_same_fisher(model, one_batch, tmp_path, "accelerate")


@pytest.mark.slow
def test_an_error_on_one_process_stops_every_process() -> None:
    """Without it, the other process would wait in the next all-reduce until gloo's 30-min timeout."""
    proc = torchrun(ROOT / "tests" / "scripts" / "dist_fisher_error.py", "label", timeout=180)
    out = proc.stdout
    assert proc.returncode != 0
    assert "rank 1 raised ValueError" in out and "label 7" in out, out + proc.stderr[-2000:]
    assert "rank 0 raised RuntimeError: 1 other process(es) failed" in out, out + proc.stderr[-2000:]
    assert "finished" not in out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plan", "shapes"], ids=["plans-differ-with-equal-counts", "parameter-shapes-differ"])
def test_processes_whose_statistics_would_not_line_up_are_refused_not_reduced(mode: str) -> None:
    """``plan``: rank 0 hands `query` to the exact path and rank 1 `key` (same sizes, different owners).
    ``shapes``: same names, other sizes (reducing the buffers would abort gloo, "data size doesn't match")."""
    proc = torchrun(ROOT / "tests" / "scripts" / "dist_fisher_error.py", mode, timeout=180)
    out = proc.stdout
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} raised RuntimeError: processes disagree on which parameters (or parameter shapes)" in out, \
            out + proc.stderr[-2000:]
    assert "finished" not in out


@pytest.mark.slow
def test_a_process_with_nothing_to_estimate_stops_every_process_at_once() -> None:
    """Refused before the first batch on rank 1: rank 0 must hear of it rather than wait in a collective."""
    proc = torchrun(ROOT / "tests" / "scripts" / "dist_fisher_error.py", "frozen", timeout=120)
    out = proc.stdout
    assert "rank 1 raised ValueError: the model has no trainable parameter" in out, out + proc.stderr[-2000:]
    assert "rank 0 raised RuntimeError: 1 other process(es) have no trainable parameter" in out, out + proc.stderr[-2000:]
