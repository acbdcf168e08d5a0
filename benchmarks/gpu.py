"""GPU benchmark: penalty overhead and Fisher estimation cost under fp32, bf16 and fp16 autocast.

Run on a CUDA machine from the repository root::

    python benchmarks/gpu.py                     # writes benchmarks/results_gpu.{json,md}
    python benchmarks/gpu.py --out /tmp/bench --models bert_base

What is measured (every ratio is the median of per-round ratios, variants alternating inside
one run, each timing bracketed by ``torch.cuda.synchronize()``):

1. Training step (forward, backward, AdamW step, zero_grad) on one B × T batch, plain vs with
   ``prior.penalty(model, λ)`` added to the loss, for a K-FAC (full format) and a diagonal (EWC)
   prior, under fp32 (TF32 off), bf16 and fp16 autocast. overhead = step_with / step_plain − 1.
2. ``estimate_fisher`` (K-FAC MC, diagonal MC) over N batches vs a plain forward + backward over
   the same batches, fp32 and bf16 autocast.
3. Agreement of K-FAC factors estimated under bf16 / fp16 autocast with the fp32 ones:
   max over layers of ‖F_amp − F_fp32‖_F / ‖F_fp32‖_F (factors that are zero in exact arithmetic,
   the attention keys' G, are left out).
4. Peak GPU memory of a training step with and without the K-FAC penalty.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, load_model, log, median_ratio  # noqa: E402  (the CPU benchmark's models and helpers)

from hf_kfac import Prior, estimate_fisher  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_batches(n: int, batch: int, seq: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random token ids (1000..29999) with ragged lengths, 4 random classes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 30000, (batch, seq), generator=g)
        lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": (ids * mask).cuda(), "attention_mask": mask.cuda(),
                    "labels": torch.randint(0, 4, (batch,), generator=g).cuda()})
    return out


def cuda_timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def rotate(names: list[str], r: int) -> list[str]:
    return names[r % len(names):] + names[: r % len(names)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_model(which: str, batch: int, seq: int, rounds: int) -> dict[str, Any]:
    model = load_model(which).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{which}: {n_params / 1e6:.1f} M parameters, batch {batch}x{seq}")
    fisher_batches = make_batches(4, batch, seq, seed=1)
    # the priors: one task, K-FAC and diagonal MC Fishers of the model as loaded
    t0 = time.perf_counter()
    kfac = Prior(shape="kfac", accumulation="merge")
    kfac.add_task(model, estimate_fisher(model, fisher_batches, shape="kfac", fisher_type="mc", progress=False), "a")
    diag = Prior(shape="diag", accumulation="merge")
    diag.add_task(model, estimate_fisher(model, fisher_batches, shape="diag", fisher_type="mc", progress=False), "a")
    log(f"  priors built in {time.perf_counter() - t0:.1f} s")
    res: dict[str, Any] = {"params_M": round(n_params / 1e6, 1), "batch": f"{batch}x{seq}", "rounds": rounds}

    # 1 + 4: training steps
    step_batch = make_batches(1, batch, seq, seed=2)[0]
    steps: dict[str, Any] = {}
    for prec, dtype in DTYPES.items():
        work = copy.deepcopy(model)
        opt = torch.optim.AdamW(work.parameters(), lr=2e-5)
        variants: dict[str, Prior | None] = {"plain": None, "kfac": kfac, "ewc": diag}

        def step(prior: Prior | None) -> None:
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                loss = work(**step_batch).loss
            if prior is not None:
                loss = loss + prior.penalty(work, 1.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        work.train()
        for p in variants.values():  # warm-up: caches, Adam state, ΔW ≠ 0
            step(p)
            step(p)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(rounds):
            for k in rotate(list(variants), r):
                times[k].append(cuda_timed(lambda: step(variants[k])))
        peak = {}
        for k in ("plain", "kfac"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(variants[k])
            torch.cuda.synchronize()
            peak[k] = torch.cuda.max_memory_allocated() / 2**20
        steps[prec] = {"step_ms": {k: round(1e3 * statistics.median(v), 2) for k, v in times.items()},
                       "overhead": {k: round(median_ratio(times, k, "plain") - 1, 4) for k in ("kfac", "ewc")},
                       "peak_MiB": {k: round(v, 1) for k, v in peak.items()}}
        log(f"  step {prec}: {steps[prec]}")
        del work, opt
    res["steps"] = steps
    res["bf16_speedup_plain"] = round(steps["fp32"]["step_ms"]["plain"] / steps["bf16"]["step_ms"]["plain"], 2)

    # 2: estimation cost
    model.eval()
    est: dict[str, Any] = {}
    for prec in ("fp32", "bf16"):
        dtype = DTYPES[prec]

        def plain() -> None:
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                losses = [model(**b).loss for b in fisher_batches]
            for loss in losses:
                loss.backward()
            model.zero_grad(set_to_none=True)

        variants_e: dict[str, Callable[[], Any]] = {
            "plain": plain,
            "kfac-mc": lambda: estimate_fisher(model, fisher_batches, shape="kfac", fisher_type="mc",
                                               autocast_dtype=dtype, progress=False),
            "diag-mc": lambda: estimate_fisher(model, fisher_batches, shape="diag", fisher_type="mc",
                                               autocast_dtype=dtype, progress=False),
        }
        for f in variants_e.values():
            f()
        times_e: dict[str, list[float]] = {k: [] for k in variants_e}
        for r in range(max(3, rounds // 4)):
            for k in rotate(list(variants_e), r):
                times_e[k].append(cuda_timed(variants_e[k]))
        est[prec] = {"plain_ms": round(1e3 * statistics.median(times_e["plain"]), 2),
                     "ratio": {k: round(median_ratio(times_e, k, "plain"), 2) for k in ("kfac-mc", "diag-mc")}}
        log(f"  estimation {prec}: {est[prec]}")
    res["estimation"] = est

    # 3: factor agreement under autocast (empirical Fisher: no sampling, so only rounding differs)
    ref = estimate_fisher(model, fisher_batches, shape="kfac", fisher_type="empirical", progress=False)
    g_scale = max(float(b.G.abs().max()) for b in ref.kfac.values())
    agree = {}
    for prec in ("bf16", "fp16"):
        amp = estimate_fisher(model, fisher_batches, shape="kfac", fisher_type="empirical",
                              autocast_dtype=DTYPES[prec], progress=False)
        worst_a = max(rel(amp.kfac[n].A, b.A) for n, b in ref.kfac.items())
        worst_g = max(rel(amp.kfac[n].G, b.G) for n, b in ref.kfac.items() if float(b.G.abs().max()) >= 1e-6 * g_scale)
        finite = all(bool(torch.isfinite(amp.kfac[n].G).all()) for n in ref.kfac)
        agree[prec] = {"max_rel_A": round(worst_a, 5), "max_rel_G": round(worst_g, 5), "finite": finite}
        log(f"  factors {prec} vs fp32: {agree[prec]}")
    res["factor_agreement"] = agree
    return res


def to_markdown(out: dict[str, Any]) -> str:
    lines = [f"# GPU benchmark ({out['device']}, torch {out['torch']})", "",
             "Step overhead = median(step with penalty / plain step) − 1; estimation = median(estimate_fisher /"
             " plain forward+backward over the same batches).", ""]
    for which, r in out["models"].items():
        lines += [f"## {which} ({r['params_M']} M parameters, batch {r['batch']}, {r['rounds']} rounds)", "",
                  "| precision | plain step ms | K-FAC overhead | EWC overhead | peak MiB plain / K-FAC |",
                  "| --- | --- | --- | --- | --- |"]
        for prec, s in r["steps"].items():
            lines.append(f"| {prec} | {s['step_ms']['plain']} | {100 * s['overhead']['kfac']:+.1f}% | "
                         f"{100 * s['overhead']['ewc']:+.1f}% | {s['peak_MiB']['plain']:.0f} / {s['peak_MiB']['kfac']:.0f} |")
        lines += ["", "| precision | plain fwd+bwd ms (4 batches) | K-FAC MC estimate / plain | diag MC estimate / plain |",
                  "| --- | --- | --- | --- |"]
        for prec, e in r["estimation"].items():
            lines.append(f"| {prec} | {e['plain_ms']} | {e['ratio']['kfac-mc']}× | {e['ratio']['diag-mc']}× |")
        lines += ["", "| autocast | max rel. error A | max rel. error G | all finite |", "| --- | --- | --- | --- |"]
        for prec, a in r["factor_agreement"].items():
            lines.append(f"| {prec} | {a['max_rel_A']} | {a['max_rel_G']} | {a['finite']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "bert_base"], choices=["minilm", "bert_base"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device; the CPU benchmark is benchmarks/run.py")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "models": {}}
    for which in a.models:
        try:
            out["models"][which] = bench_model(which, a.batch, a.seq, a.rounds)
        except ImportError as e:
            log(f"{which}: skipped ({e})")
    folder = Path(a.out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("results_gpu.json", json.dumps(out, indent=2)), ("results_gpu.md", to_markdown(out))):
        tmp = folder / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, folder / name)
    print(to_markdown(out))


if __name__ == "__main__":
    main()
