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
    from dist_fisher import CONFIGS, flat, make_model_and_data

    from hf_kfac import estimate_fisher

    proc = torchrun(ROOT / "tests" / "scripts" / "dist_fisher.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MULTI_CPU" in proc.stdout
    model, batches = make_model_and_data()
    for shape, ft, approx in CONFIGS:
        single = flat(estimate_fisher(model, batches, shape=shape, fisher_type=ft, kfac_approx=approx, progress=False))
        multi = load_file(str(tmp_path / f"{shape}-{ft}-{approx}.safetensors"))
        assert single.keys() == multi.keys()
        for k in single:
            torch.testing.assert_close(multi[k], single[k], rtol=1e-5, atol=1e-8, msg=f"{shape}/{ft}/{approx}: {k}")


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
def test_processes_whose_plans_differ_with_equal_counts_are_refused() -> None:
    """Rank 0 hands `query` to the exact path and rank 1 `key`: same sizes, different owners."""
    proc = torchrun(ROOT / "tests" / "scripts" / "dist_fisher_error.py", "plan", timeout=180)
    out = proc.stdout
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} raised RuntimeError: processes disagree" in out, out + proc.stderr[-2000:]
    assert "finished" not in out
