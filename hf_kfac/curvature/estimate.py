"""Fisher estimation: diagonal (EWC) and K-FAC, from per-layer inputs and output gradients.

For every batch the model runs once in eval mode. Forward hooks keep each hooked module's
input a and output s. For each output-space vector v of :func:`output_vectors`, one call of
``torch.autograd.grad`` returns g = ∂⟨v, z⟩/∂s for every hooked call at once (no parameter
gradients are formed), and the statistics are accumulated from (a, g):

- K-FAC, ``expand`` (M valid positions, N examples):
  A = (1/M) Σ_{n,t} ā_nt ā_ntᵀ,  G = (1/N) Σ_k w_k Σ_{n,t} g_ntk g_ntkᵀ.
- K-FAC, ``reduce``: ā_n = mean_t ā_nt, ĝ_nk = Σ_t g_ntk,
  A = (1/N) Σ_n ā_n ā_nᵀ,  G = (1/N) Σ_k w_k Σ_n ĝ_nk ĝ_nkᵀ.
- Diagonal: the per-example gradient ∇_θ ℓ_nk is formed exactly (Σ_t g_nt ā_ntᵀ for a
  Linear, Σ_t g_nt ⊙ x̂_nt for a LayerNorm, row sums of g for an Embedding, one backward
  pass per example for any other parameter) and F_diag = (1/N) Σ_k w_k Σ_n (∇_θ ℓ_nk)².
  Squaring a mini-batch's summed gradient would add cross-example terms; that never happens.

Positions where the batch's attention mask is 0 are dropped from every sum, and output
positions whose label is -100 give v = 0. Sums and counts are all-reduced over processes
before the division, so the result does not depend on how the data is sharded.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..distributed import all_reduce_sum_, get_rank, is_main_process
from ..enums import FisherType, KFACApprox, Shape
from .blocks import Curvature, KFACBlock
from .config import FisherConfig
from .predictive import PredictiveFn, default_predictive_fn, output_vectors

logger = logging.getLogger(__name__)

_MAX_PER_EXAMPLE_NUMEL = 1 << 22  # per-example gradient chunk: small enough to stay in cache (3x faster than 1 << 24)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass
class _Call:
    """One forward call of a hooked module within the current batch."""

    handler: "_Handler"
    inp: Tensor
    out: Tensor
    mask: Tensor  # (N, P) bool over the call's positions


class _Handler:
    """Accumulates the statistics of one module."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    def on_forward(self, call: _Call, cache: dict) -> None:  # pragma: no cover - overridden
        pass

    def on_backward(self, call: _Call, g: Tensor, w: float, est: "_Estimator") -> None:  # pragma: no cover
        raise NotImplementedError


def _flatten_positions(x: Tensor, n: int) -> Tensor:
    """(N, *positions, D) -> (N, P, D) float32."""
    return x.reshape(n, -1, x.shape[-1]).float()


_GRAM_BLOCK = 192  # target column block of the upper-triangular Gram products
_GRAM_MIN_DIM = 256  # below this one full product is faster than blocks
_GRAM_MAX_BLOCKS = 8  # more, smaller blocks lose more to GEMM efficiency than they save


def _gram_cuts(d: int) -> list[int]:
    """Column partition of a d-wide Gram product (measured on CPU: 384 → 2, 768 → 4, >= 1536 → 8 blocks)."""
    nb = 1 if d < _GRAM_MIN_DIM else min(_GRAM_MAX_BLOCKS, max(2, d // _GRAM_BLOCK))
    return [d * i // nb for i in range(nb + 1)]


def gram_upper_(out: Tensor, x: Tensor, alpha: float = 1.0, overwrite: bool = False) -> Tensor:
    """out += alpha·xᵀx on and above the diagonal (the rest of ``out`` is left unspecified).

    ``overwrite=True``: out = alpha·xᵀx instead (``out`` may hold garbage: BLAS ignores it with
    β = 0), which spares zero-filling large accumulators before their first batch.

    xᵀx is symmetric, so for a wide x only the upper blocks of the column partition are
    formed: with b blocks that is b(b+1)/2 of b² block products (the diagonal blocks are
    computed in full), 36 of 64 for b = 8. :func:`symmetric_from_upper` completes the matrix once at the end.
    """
    cuts = _gram_cuts(x.shape[1])
    for i in range(len(cuts) - 1):
        lo, hi = cuts[i], cuts[i + 1]
        out[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:], beta=0.0 if overwrite else 1.0, alpha=alpha)
    return out


def symmetric_from_upper(x: Tensor, scale: float = 1.0) -> Tensor:
    """In place: x ← scale·(triu(x) + triu(x, 1)ᵀ), the symmetric matrix with x's upper triangle.

    Done by blocks (a transposed copy of each block above the diagonal, a mirror within the
    diagonal blocks, one scaling pass): a few passes over the matrix instead of the ~9 of
    ``triu(x) + triu(x, 1).T``, which matters for 3072² factors estimated on few batches.
    """
    d = x.shape[0]
    nb = max(1, d // 512)
    cuts = [d * i // nb for i in range(nb + 1)]
    for i in range(nb):
        lo, hi = cuts[i], cuts[i + 1]
        blk = x[lo:hi, lo:hi]
        if hi - lo > 1:
            blk.copy_(torch.triu(blk) + torch.triu(blk, 1).T)
        if hi < d:
            x[hi:, lo:hi].copy_(x[lo:hi, hi:].T)
    return x.mul_(scale)


class _KFACLinear(_Handler):
    """Accumulates A and G of one Linear; both are kept valid on and above the diagonal only."""

    def __init__(self, name: str, module: nn.Linear, weight: str, bias: str | None, approx: KFACApprox):
        super().__init__(name, module)
        self.weight, self.bias, self.approx = weight, bias, approx
        d_in = module.in_features + (1 if bias is not None else 0)
        dev = module.weight.device
        # filled by the first batch (no zero-fill of up to 3072² floats per factor); the bias
        # row/column of A are sums from the start, so they are zeroed
        self.A = torch.empty(d_in, d_in, dtype=torch.float32, device=dev)
        self.G = torch.empty(module.out_features, module.out_features, dtype=torch.float32, device=dev)
        if bias is not None:
            self.A[-1].zero_()
            self.A[:, -1].zero_()
        self.fresh_A = self.fresh_G = True
        self.a_count = torch.zeros((), dtype=torch.float64, device=dev)

    def input_key(self, call: _Call) -> tuple:
        """Calls with equal keys have equal input statistics (q/k/v are fed the same tensor)."""
        return (call.inp.data_ptr(), tuple(call.inp.shape), call.inp.dtype, call.mask.data_ptr(), self.approx)

    def input_rows(self, call: _Call) -> Tensor:
        """The rows whose outer products make A: valid positions (expand) or per-example means (reduce)."""
        n = call.mask.shape[0]
        a = _flatten_positions(call.inp, n)
        m = call.mask
        if self.approx == KFACApprox.EXPAND:
            return a[m] if not bool(m.all()) else a.reshape(-1, a.shape[-1])
        mf = m.unsqueeze(-1).float()
        return (a * mf).sum(1) / mf.sum(1).clamp_min(1.0)

    def add_input_stats(self, aat: Tensor | None, rows: Tensor, asum: Tensor) -> None:
        """A += [[aat, Σā], [·, count]] (upper triangle); ``aat=None`` forms rowsᵀrows in place."""
        d = rows.shape[1]
        top = self.A[:d, :d] if self.bias is not None else self.A
        if aat is None:
            gram_upper_(top, rows, overwrite=self.fresh_A)
        elif self.fresh_A:
            top.copy_(aat)
        else:
            top += aat
        self.fresh_A = False
        if self.bias is not None:
            # the bias column of A: Σ ā (the constant input 1 times the inputs) and the count
            self.A[:d, d] += asum
            self.A[d, d] += rows.shape[0]
        self.a_count += rows.shape[0]

    def on_backward(self, call: _Call, g: Tensor, w: float, est: "_Estimator") -> None:
        n = call.mask.shape[0]
        g = _flatten_positions(g, n)
        if self.approx == KFACApprox.EXPAND:
            gv = g[call.mask] if not bool(call.mask.all()) else g.reshape(-1, g.shape[-1])
        else:
            gv = (g * call.mask.unsqueeze(-1)).sum(1)
        gram_upper_(self.G, gv, alpha=w, overwrite=self.fresh_G)
        self.fresh_G = False

    def tensors(self) -> list[Tensor]:
        """The accumulators (a factor no batch has reached is zeroed first: it holds garbage)."""
        if self.fresh_A:
            self.A.zero_()
        if self.fresh_G:
            self.G.zero_()
        self.fresh_A = self.fresh_G = False
        return [self.A, self.G, self.a_count]


class _DiagLinear(_Handler):
    def __init__(self, name: str, module: nn.Linear, weight: str | None, bias: str | None):
        super().__init__(name, module)
        self.weight, self.bias = weight, bias

    def on_backward(self, call: _Call, g: Tensor, w: float, est: "_Estimator") -> None:
        n = call.mask.shape[0]
        mf = call.mask.unsqueeze(-1).float()
        g = _flatten_positions(g, n) * mf
        if self.bias is not None:
            est.add_per_example(self.bias, g.sum(1), w)
        if self.weight is not None:
            a = _flatten_positions(call.inp, n)
            per = max(1, _MAX_PER_EXAMPLE_NUMEL // max(1, g.shape[-1] * a.shape[-1]))
            if est.is_shared(self.weight):
                est.add_per_example(self.weight, torch.einsum("npo,npi->noi", g, a), w)
            else:
                for s in range(0, n, per):
                    pe = torch.einsum("npo,npi->noi", g[s : s + per], a[s : s + per])
                    est.add_squares(self.weight, pe, w)


class _DiagLayerNorm(_Handler):
    def __init__(self, name: str, module: nn.LayerNorm, weight: str | None, bias: str | None):
        super().__init__(name, module)
        self.weight, self.bias = weight, bias

    def on_backward(self, call: _Call, g: Tensor, w: float, est: "_Estimator") -> None:
        mod = self.module
        n = call.mask.shape[0]
        shape = tuple(mod.normalized_shape)
        k = len(shape)
        x = call.inp.float().reshape((n, -1) + shape)
        gg = g.float().reshape((n, -1) + shape)
        mf = call.mask.reshape(call.mask.shape + (1,) * k).float()
        gg = gg * mf
        if self.weight is not None:
            xhat = nn.functional.layer_norm(x, shape, None, None, mod.eps)
            est.add_per_example(self.weight, (gg * xhat).sum(1), w)
        if self.bias is not None:
            est.add_per_example(self.bias, gg.sum(1), w)


class _DiagEmbedding(_Handler):
    def __init__(self, name: str, module: nn.Embedding, weight: str):
        super().__init__(name, module)
        self.weight = weight

    def on_backward(self, call: _Call, g: Tensor, w: float, est: "_Estimator") -> None:
        mod = self.module
        n = call.mask.shape[0]
        ids = call.inp.reshape(n, -1)
        g = _flatten_positions(g, n)
        keep = call.mask.clone()
        if mod.padding_idx is not None:
            keep &= ids != mod.padding_idx
        rows = g[keep]  # (M, D)
        ex = torch.arange(n, device=ids.device).unsqueeze(1).expand_as(ids)[keep]
        est.add_per_example_rows(self.weight, ex, ids[keep], rows, w, n)


@dataclass
class _Accum:
    """Per-parameter accumulators of squared per-example gradients."""

    sq: dict[str, Tensor] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)  # (N, *shape) for shared params
    rows: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = field(default_factory=dict)


class _Estimator:
    """Plans the hooks of a model and accumulates the Fisher statistics."""

    def __init__(self, model: nn.Module, cfg: FisherConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.handlers: dict[str, _Handler] = {}
        self.fallback_params: dict[str, nn.Parameter] = {}
        self.diag_fallbacks: dict[str, str] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.acc = _Accum()
        self._shared: set[str] = set()
        self._plan()

    # ----------------------------------------------------------------- planning
    def _plan(self) -> None:
        cfg = self.cfg
        names = {}
        owners: dict[int, list[str]] = {}
        for mname, module in self.model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if id(p) not in names:
                    names[id(p)] = full
                owners.setdefault(id(p), []).append(mname)
        for mname, module in self.model.named_modules():
            direct = {
                pname: p
                for pname, p in module.named_parameters(recurse=False)
                if p.requires_grad
                and not _matches(names[id(p)], cfg.exclude)
                and not _matches(mname, cfg.exclude)
            }
            if not direct:
                continue
            full = {pname: names[id(p)] for pname, p in direct.items()}
            for pname, p in direct.items():
                self.params[full[pname]] = p
                if len(owners[id(p)]) > 1:
                    self._shared.add(full[pname])
            w, b = full.get("weight"), full.get("bias")
            known = set(direct) <= {"weight", "bias"}
            if isinstance(module, nn.Linear) and known:
                self.handlers[mname] = self._plan_linear(mname, module, w, b)
            elif isinstance(module, nn.LayerNorm) and known:
                self.handlers[mname] = _DiagLayerNorm(mname, module, w, b)
            elif isinstance(module, nn.Embedding) and set(direct) == {"weight"} and not module.sparse:
                self.handlers[mname] = _DiagEmbedding(mname, module, w)
            else:
                for pname, p in direct.items():
                    self.fallback_params.setdefault(full[pname], p)
        if self.fallback_params:
            logger.warning(
                "No per-example rule for %d parameter(s) (%s); their diagonal Fisher uses one "
                "backward pass per example, which is slow.",
                len(self.fallback_params),
                ", ".join(list(self.fallback_params)[:5]),
            )

    def _plan_linear(self, mname: str, module: nn.Linear, w: str | None, b: str | None) -> _Handler:
        cfg = self.cfg
        if cfg.shape != Shape.KFAC or w is None:
            return _DiagLinear(mname, module, w, b)
        d_in = module.in_features + (1 if b is not None else 0)
        d_out = module.out_features
        ratio = (d_in * d_in + d_out * d_out) / (d_in * d_out)
        reason = None
        if _matches(mname, cfg.force_diag):
            reason = "force_diag pattern"
        elif w in self._shared or (b is not None and b in self._shared):
            reason = "weight shared with another module"
        elif ratio > cfg.max_factor_ratio:
            reason = f"factors would hold {ratio:.1f}x the weight's numbers (max_factor_ratio={cfg.max_factor_ratio:g})"
        if reason is not None:
            self.diag_fallbacks[mname] = reason
            return _DiagLinear(mname, module, w, b)
        return _KFACLinear(mname, module, w, b, cfg.kfac_approx)

    # ------------------------------------------------------------- accumulation
    def is_shared(self, pname: str) -> bool:
        return pname in self._shared

    def add_squares(self, pname: str, per_example: Tensor, w: float) -> None:
        """F_diag[p] += w Σ_n per_example[n]²."""
        sq = per_example.square().sum(0)
        if pname in self.acc.sq:
            self.acc.sq[pname].add_(sq, alpha=w)
        else:
            self.acc.sq[pname] = sq.mul_(w)

    def add_per_example(self, pname: str, per_example: Tensor, w: float) -> None:
        """Add a per-example gradient contribution; shared parameters are summed before squaring."""
        if pname in self._shared:
            buf = self.acc.dense.get(pname)
            self.acc.dense[pname] = per_example if buf is None else buf + per_example
        else:
            self.add_squares(pname, per_example, w)

    def add_per_example_rows(self, pname: str, ex: Tensor, ids: Tensor, rows: Tensor, w: float, n: int) -> None:
        """Add embedding-row gradients: example ``ex[i]`` gets ``rows[i]`` in row ``ids[i]``."""
        if pname in self._shared:
            shape = self.params[pname].shape
            dense = torch.zeros((n,) + tuple(shape), dtype=torch.float32, device=rows.device)
            dense.index_put_((ex, ids), rows, accumulate=True)
            self.add_per_example(pname, dense, w)
            return
        vocab = self.params[pname].shape[0]
        key = ex * vocab + ids
        uniq, inv = torch.unique(key, return_inverse=True)
        summed = torch.zeros(uniq.numel(), rows.shape[-1], dtype=torch.float32, device=rows.device)
        summed.index_add_(0, inv, rows)
        # scatter straight into the accumulator: a vocabulary-sized temporary per batch would
        # cost more than the rows themselves
        sq = self.acc.sq.get(pname)
        if sq is None:
            sq = self.acc.sq[pname] = torch.zeros(tuple(self.params[pname].shape), dtype=torch.float32, device=rows.device)
        sq.index_add_(0, uniq % vocab, summed.square(), alpha=w)

    def flush_shared(self, w: float) -> None:
        """Square the per-example buffers of shared parameters after one backward vector."""
        for pname, buf in self.acc.dense.items():
            self.add_squares(pname, buf, w)
        self.acc.dense.clear()

    # ------------------------------------------------------------------ result
    def finalize(self, n_examples: float) -> Curvature:
        dev_tensors: list[Tensor] = []
        for h in self.handlers.values():
            if isinstance(h, _KFACLinear):
                dev_tensors += h.tensors()
        for pname, p in self.params.items():
            if pname not in self.acc.sq and not self._in_kfac(pname):
                self.acc.sq[pname] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        dev_tensors += [self.acc.sq[k] for k in sorted(self.acc.sq)]
        all_reduce_sum_(dev_tensors)
        curv = Curvature(n_examples=int(round(n_examples)), diag_fallbacks=dict(self.diag_fallbacks))
        for mname, h in self.handlers.items():
            if isinstance(h, _KFACLinear):
                A = symmetric_from_upper(h.A, 1.0 / float(h.a_count.clamp_min(1)))
                G = symmetric_from_upper(h.G, 1.0 / n_examples)
                curv.kfac[mname] = KFACBlock(A, G, h.weight, h.bias)
        for pname in sorted(self.acc.sq):
            if not self._in_kfac(pname):
                curv.diag[pname] = self.acc.sq[pname] / n_examples
        return curv

    def _in_kfac(self, pname: str) -> bool:
        for h in self.handlers.values():
            if isinstance(h, _KFACLinear) and pname in (h.weight, h.bias):
                return True
        return False


def _accumulate_kfac_inputs(calls: list[_Call]) -> None:
    """Add every K-FAC call's input statistics, forming each distinct input's Gram matrix once.

    An input seen by one module (the usual case) is accumulated straight into that module's
    A; an input shared by several (q/k/v) is formed once and added to each.
    """
    groups: dict[tuple, list[_Call]] = {}
    for c in calls:
        if isinstance(c.handler, _KFACLinear):
            groups.setdefault(c.handler.input_key(c), []).append(c)
    for group in groups.values():
        h0 = group[0].handler
        assert isinstance(h0, _KFACLinear)
        rows = h0.input_rows(group[0])
        asum = rows.sum(0) if any(c.handler.bias is not None for c in group) else rows.new_zeros(())
        if len(group) == 1:
            h0.add_input_stats(None, rows, asum)
            continue
        d = rows.shape[1]
        aat = gram_upper_(torch.empty(d, d, dtype=torch.float32, device=rows.device), rows, overwrite=True)
        for c in group:
            c.handler.add_input_stats(aat, rows, asum)  # type: ignore[union-attr]


def _position_masks(batch: Any) -> list[Tensor]:
    """Candidate (N, T) masks of the batch: every 2-D tensor whose key ends in ``attention_mask``."""
    if not isinstance(batch, Mapping):
        return []
    return [v.bool() for k, v in batch.items() if k.endswith("attention_mask") and isinstance(v, Tensor) and v.dim() == 2]


def _batch_size(batch: Any) -> int:
    """Leading size of the first tensor of the batch (0 if none)."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    for v in values:
        if isinstance(v, Tensor) and v.dim() >= 1:
            return v.shape[0]
    return 0


def _mask_for(x: Tensor, masks: list[Tensor], is_index_input: bool) -> Tensor | None:
    """The (N, P) mask of a module input ``x``, or None if no mask fits its positions."""
    n = x.shape[0]
    mid = tuple(x.shape[1:]) if is_index_input else tuple(x.shape[1:-1])
    if len(mid) == 0:
        return torch.ones(n, 1, dtype=torch.bool, device=x.device)
    for m in masks:
        if m.shape == (n,) + mid:
            return m.reshape(n, -1).to(x.device)
    return None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def estimate_fisher(
    model: nn.Module,
    dataloader: Iterable[Any],
    config: FisherConfig | None = None,
    *,
    predictive_fn: PredictiveFn | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    **options: Any,
) -> Curvature:
    """Estimate the Fisher of ``model`` at its current parameters over ``dataloader``.

    Args:
        model: The model; only parameters with ``requires_grad=True`` are covered.
        dataloader: Batches (mappings of tensors for the default ``predictive_fn``).
        config: Estimation options; keyword ``options`` build or override one
            (e.g. ``shape="diag", fisher_type="empirical"``).
        predictive_fn: ``(model, batch) -> PredictiveOutput``; defaults to
            :func:`default_predictive_fn` for transformers models.
        autocast_dtype: Run the forward pass under ``torch.autocast`` with this dtype.
            Statistics are accumulated in float32 regardless.
        progress: Show a progress bar (on the main process only).

    Returns:
        The :class:`Curvature`, float32, on the model's device.
    """
    if config is None:
        config = FisherConfig(**options)
    elif options:
        config = FisherConfig(**{**config.to_dict(), **options})
    if config.shape == Shape.IDENTITY:
        raise ValueError("shape='identity' has no Fisher to estimate; an L2 prior needs only the anchor.")
    predictive_fn = predictive_fn or default_predictive_fn
    est = _Estimator(model, config)
    if not est.params:
        raise ValueError(
            "the model has no trainable parameter left to estimate a Fisher for: every parameter is "
            "frozen (requires_grad=False) or excluded by the `exclude` patterns."
        )
    try:
        device = next(p.device for p in model.parameters())
    except StopIteration:  # pragma: no cover - checked above
        device = torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(config.seed + get_rank())

    calls: list[_Call] = []
    masks: list[Tensor] = []
    batch_n = [0]
    warned: set[str] = set()
    cache: dict = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        handler = est.handlers[names[id(module)]]
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        is_index = isinstance(module, nn.Embedding)
        replaced = None
        if x.shape[0] == 1 and batch_n[0] > 1 and output.shape[0] == 1:
            # A call broadcast over the batch (e.g. BERT's position embeddings of shape
            # (1, T, D)): expand it so that its output gradient stays per example.
            x = x.expand((batch_n[0],) + tuple(x.shape[1:]))
            output = replaced = output.expand((batch_n[0],) + tuple(output.shape[1:]))
        mask = _mask_for(x, masks, is_index)
        if mask is None:
            mid = x.shape[1:] if is_index else x.shape[1:-1]
            n = x.shape[0]
            mask = torch.ones(n, math.prod(mid), dtype=torch.bool, device=x.device)
            if handler.name not in warned:
                warned.add(handler.name)
                logger.warning(
                    "No attention mask of shape %s found in the batch for module %r; every position counts.",
                    (n,) + tuple(mid),
                    handler.name,
                )
        call = _Call(handler, x.detach(), output, mask)
        handler.on_forward(call, cache)
        calls.append(call)
        return replaced

    names = {id(h.module): n for n, h in est.handlers.items()}
    handles = [
        h.module.register_forward_hook(hook, with_kwargs=True) for h in est.handlers.values()
    ]
    was_training = model.training
    model.eval()
    n_examples = torch.zeros((), dtype=torch.float64, device=device)
    fallback = list(est.fallback_params.values())
    fallback_names = list(est.fallback_params)
    try:
        total = None
        try:
            total = len(dataloader)  # type: ignore[arg-type]
        except TypeError:  # iterable datasets have no length
            total = None
        if total is not None and config.max_batches is not None:
            total = min(total, config.max_batches)
        bar = tqdm(
            dataloader,
            total=total,
            desc=f"Fisher ({config.shape}, {config.fisher_type})",
            disable=not (progress and is_main_process()),
            leave=False,
        )
        autocast = (
            torch.autocast(device_type=device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else nullcontext()
        )
        for i, batch in enumerate(bar):
            if config.max_batches is not None and i >= config.max_batches:
                break
            batch = _to_device(batch, device)
            calls.clear()
            cache.clear()
            masks[:] = _position_masks(batch)
            batch_n[0] = _batch_size(batch)
            with torch.enable_grad(), autocast:
                out = predictive_fn(model, batch)
            z, labels, mask = out.flat()
            n_examples += z.shape[0]
            _accumulate_kfac_inputs(calls)
            for call in calls:
                if call.mask.shape[0] != z.shape[0] and not isinstance(call.handler, _KFACLinear):
                    raise ValueError(
                        f"module {call.handler.name!r} ran on a batch of {call.mask.shape[0]} rows but the "
                        f"predictive distribution has {z.shape[0]} examples, so its per-example gradients "
                        "cannot be separated. Exclude it (exclude=[...]), or compute it under torch.no_grad() "
                        "in your predictive_fn (e.g. a bi-encoder's candidate tower)."
                    )
            outs = [c.out for c in calls]
            for v, w in output_vectors(
                z, labels, mask, out.likelihood, config.fisher_type, config.n_samples, generator
            ):
                if outs:
                    grads = torch.autograd.grad(z, outs, grad_outputs=v, retain_graph=True, allow_unused=True)
                    for call, g in zip(calls, grads):
                        if g is not None:
                            call.handler.on_backward(call, g, w, est)
                    est.flush_shared(w)
                for n in range(z.shape[0]) if fallback else ():
                    vn = torch.zeros_like(v)
                    vn[n] = v[n]
                    grads = torch.autograd.grad(z, fallback, grad_outputs=vn, retain_graph=True, allow_unused=True)
                    for pname, g in zip(fallback_names, grads):
                        if g is not None:
                            est.add_squares(pname, g.float().unsqueeze(0), w)
            del out, z, outs
            calls.clear()
            cache.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    all_reduce_sum_([n_examples])
    total_n = float(n_examples.item())
    if total_n == 0:
        raise ValueError(
            "the Fisher was estimated on no example: the dataset or dataloader is empty. "
            "Pass the task's training data (or a non-empty sample of it)."
        )
    return est.finalize(total_n)
