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
  Linear, Σ_t ā_nt g_ntᵀ for a transformers ``Conv1D`` (y = x W + b, W of shape (d_in, d_out)),
  Σ_t g_nt ⊙ x̂_nt for a LayerNorm, row sums of g for an Embedding, one backward pass per
  example for any other parameter) and F_diag = (1/N) Σ_k w_k Σ_n (∇_θ ℓ_nk)².
  Squaring a mini-batch's summed gradient would add cross-example terms; that never happens.

Every use of a parameter enters its per-example gradient once, before squaring:

- a module called C times in one forward (ALBERT's shared layers, an embedding shared by an
  encoder and a decoder): ∇_θ ℓ_n = Σ_c Σ_t (the calls' positions are concatenated), so
  F_diag = (1/N) Σ_n (Σ_c ∇_θ ℓ_nc)², not Σ_c (∇_θ ℓ_nc)²;
- a parameter of several hooked modules (tied embedding and output weights): the
  per-example gradients of all of them are summed, then squared;
- each parameter has one owner: the hooked modules that hold it, or the exact per-example
  path (one backward pass per example) when no handler applies or when, on the first
  batch, the autograd graph shows an op reading it that is not one of its modules' hooked
  calls (``nn.MultiheadAttention.out_proj`` read inside ``F.multi_head_attention_forward``,
  ``h @ head.weight.T``). That check counts, per parameter, the ops that read it (through
  views, transposes and autocast copies) against the hooked calls; it needs no extra
  forward pass and no communication, as it depends on the model's code, not on the data.
  A parameter no op reads (an unused layer) keeps a zero Fisher. A module whose class
  overrides the stock forward (Gemma's scaled word embedding, BART's positional embedding)
  keeps its fast rule only if its output is the plain op on its input and parameters.

K-FAC treats the C calls of a module as extra positions (the standard approximation for
weight sharing): ``expand`` adds every call's valid positions to A and G; ``reduce`` reduces
each call separately, so A = (1/(C·N)) Σ_{c,n} ā_nc ā_ncᵀ and G = (1/N) Σ_k w_k Σ_{c,n} ĝ_nck ĝ_nckᵀ.
Neither is exact for C > 1 (the exact block has cross-call terms); the diagonal is.

Positions where the batch's attention mask is 0 are dropped from K-FAC's A and G, and output
positions whose label is -100 give v = 0. The diagonal keeps any such position whose output
gradient is non-zero (a left-padded causal LM predicts its first token from the last pad, and the
loss counts that prediction), so it stays exact; K-FAC leaves that one prediction per example out
of its factors. A multiple-choice (N, C, T) mask is flattened to the (N·C, T) the encoder runs on;
(N·T, D) rows take the (N, T) mask; a call on T' > T positions (a model padding to a block size)
takes it right-padded with False, once the first batch shows the extra positions feed nothing. A
K-FAC call whose rows are not the examples (sequence-first) counts each position on its own.
The checks compare examples, so a first batch of one example runs them on that example twice.
In an encoder-decoder model, calls inside the decoder (and after it: the LM head) take the
decoder's mask (``decoder_attention_mask``, or without one the positions up to the last label
that is not -100), the rest, and the cross-attention keys/values that read the encoder's hidden
states, the encoder's. A module whose rows are not the examples (a (T, T) relative-position grid;
rows the model reorders) is found on the first batch, by row count or because example 0's
outputs depend on another of its rows, and goes to the exact per-example path. Sums and counts
are all-reduced over processes before the division, so the result does not depend on how the
data is sharded; the repeats an Accelerate loader adds to its last batches (``even_batches=True``)
are dropped first.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
from collections.abc import Iterable, Mapping
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..distributed import all_equal, all_reduce_sum_, get_rank, get_world_size, is_main_process
from ..enums import FisherType, KFACApprox, Shape
from ..modes import evaluating
from .blocks import Curvature, KFACBlock
from .config import FisherConfig
from .predictive import PredictiveFn, PredictiveOutput, default_predictive_fn, output_vectors

logger = logging.getLogger(__name__)

_MAX_PER_EXAMPLE_NUMEL = 1 << 22  # per-example gradient chunk: small enough to stay in cache (3x faster than 1 << 24)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` or a module it lies in (a dotted prefix) matches one of the fnmatch ``patterns``."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))] if name else [name]
    return any(fnmatch.fnmatchcase(x, p) for p in patterns for x in prefixes)


def _warn_unmatched(model: nn.Module, cfg: FisherConfig) -> None:
    """Warn about ``exclude`` / ``force_diag`` patterns that name no module or parameter of the model."""
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    for option, patterns in (("exclude", cfg.exclude), ("force_diag", cfg.force_diag)):
        missed = [p for p in patterns if not any(_matches(n, [p]) for n in names)]
        if missed:
            logger.warning(
                "%s pattern(s) %s match no module or parameter of %s, so they change nothing; patterns are "
                "fnmatch patterns of dotted names as in model.named_modules() (e.g. 'bert.embeddings', "
                "'*.attention.*'), and a module's pattern covers everything inside it.",
                option, missed, type(model).__name__,
            )


@dataclass
class _Call:
    """One forward call of a hooked module within the current batch."""

    handler: "_Handler"
    inp: Tensor
    out: Tensor
    mask: Tensor  # (N, P) bool over the call's positions
    version: int = 0  # out._version when the module returned it: a later in-place op changes it
    extended_from: int = 0  # > 0: the batch's (N, T) mask right-padded with False to the call's T' > T positions


class _Handler:
    """Accumulates the statistics of one module."""

    weight: str | None = None
    bias: str | None = None

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    def param_names(self) -> list[str]:
        """The parameters this handler accumulates (the others of its module are not its own)."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def on_forward(self, call: _Call, cache: dict) -> None:  # pragma: no cover - overridden
        pass

    def on_backward(self, calls: list[_Call], gs: list[Tensor], w: float, est: "_Estimator") -> None:  # pragma: no cover
        """Accumulate one output vector's statistics from all of this batch's calls of the module."""
        raise NotImplementedError


def _flatten_positions(x: Tensor, n: int) -> Tensor:
    """(N, *positions, D) -> (N, P, D) float32."""
    return x.reshape(n, -1, x.shape[-1]).float()


_GRAM_BLOCK = 192  # target column block of the upper-triangular Gram products
_GRAM_MIN_DIM = 256  # below this one full product is faster than blocks
_GRAM_MAX_BLOCKS = 8  # more, smaller blocks lose more to GEMM efficiency than they save


def _live_positions(mask: Tensor, g: Tensor) -> Tensor:
    """The (N, P) positions that enter a per-example gradient: those ``mask`` keeps, and any other
    whose output gradient ``g`` (N, P, D) is non-zero.

    A position the attention mask drops can still feed a counted output (the last left pad of a
    causal LM predicts the first token, and the loss counts that prediction); its gradient then
    belongs to the example's. A dropped position nothing counted depends on has g = 0 exactly and
    stays out (NaN rows there too: NaN > 0 is false).
    """
    if bool(mask.all()):
        return mask
    return mask | (g.abs().amax(-1) > 0)


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

    def on_backward(self, calls: list[_Call], gs: list[Tensor], w: float, est: "_Estimator") -> None:
        """G += w Σ_calls Σ rows g gᵀ: several calls are extra positions (expand) or extra reduced rows."""
        for call, g in zip(calls, gs):
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


def _masked_positions(calls: list[_Call], gs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(g ⊙ mask, a) of all calls, each (N, P_total, ·), the calls' positions concatenated.

    Σ over the concatenated positions is Σ_calls Σ_t, so a per-example product formed from
    these rows already sums the module's calls before anything is squared.
    """
    n = calls[0].mask.shape[0]
    g = [_flatten_positions(g, n) for g in gs]
    g = [torch.where(_live_positions(c.mask, x).unsqueeze(-1), x, 0) for c, x in zip(calls, g)]
    a = [_flatten_positions(c.inp, n) for c in calls]
    if len(calls) == 1:
        return g[0], a[0]
    return torch.cat(g, 1), torch.cat(a, 1)


class _DiagLinear(_Handler):
    """Diagonal of an ``nn.Linear``, y = x Wᵀ + b: ∇W_n = Σ_c Σ_t g_nct a_nctᵀ, ∇b_n = Σ_c Σ_t g_nct."""

    _EQUATION = "npo,npi->noi"  # (g, a) -> W's shape (d_out, d_in)

    def __init__(self, name: str, module: nn.Module, weight: str | None, bias: str | None):
        super().__init__(name, module)
        self.weight, self.bias = weight, bias

    def on_backward(self, calls: list[_Call], gs: list[Tensor], w: float, est: "_Estimator") -> None:
        g, a = _masked_positions(calls, gs)
        n = g.shape[0]
        if self.bias is not None:
            est.add_per_example(self.bias, g.sum(1), w)
        if self.weight is not None:
            if est.is_shared(self.weight):
                est.add_per_example(self.weight, torch.einsum(self._EQUATION, g, a), w)
                return
            per = max(1, _MAX_PER_EXAMPLE_NUMEL // max(1, g.shape[-1] * a.shape[-1]))
            for s in range(0, n, per):
                est.add_squares(self.weight, torch.einsum(self._EQUATION, g[s : s + per], a[s : s + per]), w)


class _DiagConv1D(_DiagLinear):
    """Diagonal of a transformers ``Conv1D``, y = x W + b with W (d_in, d_out): ∇W_n = Σ_c Σ_t a_nct g_nctᵀ."""

    _EQUATION = "npo,npi->nio"


class _DiagLayerNorm(_Handler):
    """Diagonal of a LayerNorm: ∇γ_n = Σ_c Σ_t g_nct ⊙ x̂_nct, ∇β_n = Σ_c Σ_t g_nct."""

    def __init__(self, name: str, module: nn.LayerNorm, weight: str | None, bias: str | None):
        super().__init__(name, module)
        self.weight, self.bias = weight, bias

    def on_backward(self, calls: list[_Call], gs: list[Tensor], w: float, est: "_Estimator") -> None:
        mod = self.module
        shape = tuple(mod.normalized_shape)
        k = len(shape)
        dw: Tensor | None = None
        db: Tensor | None = None
        for call, g in zip(calls, gs):
            n = call.mask.shape[0]
            gg = g.float().reshape((n, -1) + shape)
            live = _live_positions(call.mask, gg.reshape(n, gg.shape[1], -1))
            gg = torch.where(live.reshape(live.shape + (1,) * k), gg, 0)
            if self.weight is not None:
                x = call.inp.float().reshape((n, -1) + shape)
                xhat = nn.functional.layer_norm(x, shape, None, None, mod.eps)
                t = (gg * xhat).sum(1)
                dw = t if dw is None else dw + t
            if self.bias is not None:
                t = gg.sum(1)
                db = t if db is None else db + t
        if dw is not None:
            est.add_per_example(self.weight, dw, w)  # type: ignore[arg-type]
        if db is not None:
            est.add_per_example(self.bias, db, w)  # type: ignore[arg-type]


class _DiagEmbedding(_Handler):
    """Diagonal of an Embedding: ∇E_n[v] = Σ_c Σ_{t: id_nct = v} g_nct (rows summed per (example, id))."""

    def __init__(self, name: str, module: nn.Embedding, weight: str):
        super().__init__(name, module)
        self.weight = weight

    def on_backward(self, calls: list[_Call], gs: list[Tensor], w: float, est: "_Estimator") -> None:
        mod = self.module
        n = calls[0].mask.shape[0]
        exs, idss, rowss = [], [], []
        for call, g in zip(calls, gs):
            ids = call.inp.reshape(n, -1)
            rows = _flatten_positions(g, n)
            keep = _live_positions(call.mask, rows).clone()
            if mod.padding_idx is not None:  # that row of the table gets no gradient
                keep &= ids != mod.padding_idx
            rowss.append(rows[keep])  # (M_c, D)
            exs.append(torch.arange(n, device=ids.device).unsqueeze(1).expand_as(ids)[keep])
            idss.append(ids[keep])
        cat = (lambda xs: xs[0]) if len(calls) == 1 else torch.cat
        est.add_per_example_rows(self.weight, cat(exs), cat(idss), cat(rowss), w, n)  # type: ignore[arg-type]


_TRANSPARENT_NODES = frozenset(
    {
        "TBackward", "ToCopyBackward", "ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward",
        "ExpandBackward", "UnsqueezeBackward", "SqueezeBackward", "PermuteBackward", "TransposeBackward",
        "AliasBackward", "CloneBackward",
    }
)  # autograd nodes that only view, transpose or cast a tensor: a parameter read through them is one use


def _node_kind(node: Any) -> str:
    return type(node).__name__.rstrip("0123456789")


def _graph(root: Any) -> tuple[set, dict]:
    """Nodes of the autograd graph under ``root`` and, for each node, the nodes that consume it."""
    seen, stack, consumers = {root}, [root], {}
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            consumers.setdefault(nxt, set()).add(node)
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen, consumers


def _first_op(node: Any) -> Any:
    """The first node under ``node`` that is not a view, transpose or cast."""
    while node is not None and _node_kind(node) in _TRANSPARENT_NODES:
        node = next((n for n, _ in node.next_functions if n is not None), None)
    return node


_STOCK_OPS = {  # autograd nodes the stock forward of each handled type ends in
    nn.Embedding: {"EmbeddingBackward"},
    nn.LayerNorm: {"NativeLayerNormBackward"},
    nn.Linear: {"AddmmBackward", "MmBackward"},
}


def _stock_forward_type(module: nn.Module) -> type | None:
    """The handled base class whose forward ``module`` runs, or None if its class overrides it."""
    conv1d = _conv1d_type()
    for base in (nn.Embedding, nn.LayerNorm, nn.Linear) + ((conv1d,) if conv1d is not None else ()):
        if isinstance(module, base):
            return base if type(module).forward is base.forward else None
    return None


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


@dataclass
class _Accum:
    """Per-parameter accumulators of squared per-example gradients."""

    sq: dict[str, Tensor] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)  # (N, *shape) for shared params
    rows: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = field(default_factory=dict)


class _Estimator:
    """Plans the hooks of a model and accumulates the Fisher statistics.

    Each trainable parameter has exactly one owner: the handlers of the modules that hold it
    (``handlers``, fast per-example rules from hooked calls) or ``fallback_params`` (exact
    per-example autograd over all of its uses). Never both, so no use is counted twice.
    """

    def __init__(self, model: nn.Module, cfg: FisherConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.handlers: dict[str, _Handler] = {}
        self.fallback_params: dict[str, nn.Parameter] = {}
        self.diag_fallbacks: dict[str, str] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.acc = _Accum()
        self._shared: set[str] = set()  # held by more than one module
        self._summed: set[str] = set()  # accumulated by more than one handler: summed before squaring
        self.per_row: set[str] = set()  # K-FAC modules whose rows are not the examples: each row is one position
        self.no_extend: set[str] = set()  # modules whose extra positions (T' > T) feed the outputs: no mask
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
        conv1d = _conv1d_type()
        unhandled: dict[str, nn.Parameter] = {}
        conv1d_kfac: list[str] = []
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
            elif conv1d is not None and isinstance(module, conv1d) and known:
                self.handlers[mname] = _DiagConv1D(mname, module, w, b)
                if cfg.shape == Shape.KFAC and w is not None:
                    self.diag_fallbacks[mname] = (
                        "transformers Conv1D (weight stored as (in, out)): K-FAC blocks cover nn.Linear "
                        "only, so it gets an exact diagonal"
                    )
                    conv1d_kfac.append(mname)
            elif isinstance(module, nn.LayerNorm) and known:
                self.handlers[mname] = _DiagLayerNorm(mname, module, w, b)
            elif isinstance(module, nn.Embedding) and set(direct) == {"weight"} and not module.sparse:
                self.handlers[mname] = _DiagEmbedding(mname, module, w)  # type: ignore[arg-type]
            else:
                for pname, p in direct.items():
                    unhandled.setdefault(full[pname], p)
        # A parameter that a handled module also holds (BERT's `cls.predictions.bias` is
        # `cls.predictions.decoder.bias`) belongs to the handler alone; if its other holder
        # reads it too, the first batch's check (`check_uses`) hands it to the fallback whole.
        handled = {p for h in self.handlers.values() for p in h.param_names()}
        self.fallback_params = {k: p for k, p in unhandled.items() if k not in handled}
        self._update_summed()
        if conv1d_kfac:
            logger.warning(
                "K-FAC is not applied to %d transformers Conv1D module(s) (%s): their weight is stored "
                "transposed, (in, out); they get an exact diagonal Fisher (see Curvature.diag_fallbacks).",
                len(conv1d_kfac),
                ", ".join(conv1d_kfac[:5]),
            )
        if self.fallback_params:
            logger.warning(
                "No per-example rule for %d parameter(s) (%s); their diagonal Fisher uses one "
                "backward pass per example, which is slow.",
                len(self.fallback_params),
                ", ".join(list(self.fallback_params)[:5]),
            )

    def _update_summed(self) -> None:
        count: dict[str, int] = {}
        for h in self.handlers.values():
            for p in h.param_names():
                count[p] = count.get(p, 0) + 1
        self._summed = {p for p, c in count.items() if c > 1}
        assert not set(count) & set(self.fallback_params), "a parameter has two owners"

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
            reason = "weight or bias shared with another module"
        elif ratio > cfg.max_factor_ratio:
            reason = f"factors would hold {ratio:.1f}x the weight's numbers (max_factor_ratio={cfg.max_factor_ratio:g})"
        if reason is not None:
            self.diag_fallbacks[mname] = reason
            return _DiagLinear(mname, module, w, b)
        return _KFACLinear(mname, module, w, b, cfg.kfac_approx)

    # ------------------------------------------------------ first-batch use check
    def check_uses(self, z: Tensor, calls: list[_Call]) -> None:
        """Hand to the exact fallback every handled parameter read outside its modules' hooked calls.

        From the autograd graph of ``z``: uses(θ) = ops that read θ (through view, transpose and
        cast nodes), calls(θ) = hooked calls of θ's modules whose output reaches z. Each call
        is one such op, so uses > calls means an op the handler never sees (a Linear whose
        weight is read by ``F.multi_head_attention_forward``, ``h @ lin.weight.T``, a holder
        module adding its own copy of a tied bias): its per-example gradient must come from
        autograd. A parameter with no use at all keeps its handler (and a zero Fisher).

        A module whose class overrides the stock forward (a scaled word embedding, a positional
        embedding that looks up positions instead of its argument) is handed over too unless
        :meth:`_stock_call` finds its output to be the plain op on its input and parameters, and so
        is a diagonal handler whose rows are not the examples (:meth:`_cross_example_calls`).
        ``calls`` is updated in place to the new handlers.
        """
        if z.grad_fn is None or not self.handlers:
            return
        by_id = {id(self.params[p]): p for h in self.handlers.values() for p in h.param_names()}
        seen, consumers = _graph(z.grad_fn)
        uses: dict[str, set] = {}
        for node in seen:
            if _node_kind(node) != "AccumulateGrad" or id(node.variable) not in by_id:
                continue
            ops: set = set()
            stack, visited = [node], {node}
            while stack:
                for c in consumers.get(stack.pop(), ()):
                    if c in visited:
                        continue
                    visited.add(c)
                    if _node_kind(c) in _TRANSPARENT_NODES and c in consumers:
                        stack.append(c)
                    else:
                        ops.add(c)
            uses[by_id[id(node.variable)]] = ops
        n_calls: dict[str, int] = {}
        custom: set[str] = set()  # modules whose own forward does not end in the op their handler assumes
        modified: set[str] = set()  # modules whose output the model changes in place after the call
        unbatched: set[str] = set()  # diagonal handlers run on a tensor whose rows are not the examples
        for call in calls:
            if call.out._version != call.version:
                modified.add(call.handler.name)
            if call.mask.shape[0] != z.shape[0] and not isinstance(call.handler, _KFACLinear):
                unbatched.add(call.handler.name)
            if call.out.grad_fn not in seen:
                continue
            for p in call.handler.param_names():
                n_calls[p] = n_calls.get(p, 0) + 1
            if _stock_forward_type(call.handler.module) is None and not self._stock_call(call, uses):
                custom.add(call.handler.name)
        found = self._cross_example_calls(z, [c for c in calls if c.handler.name not in unbatched])
        rows_mixed = self._kfac_rows(z, calls, {m for m in found if isinstance(self.handlers[m], _KFACLinear)})
        unbatched |= found - rows_mixed
        moved = sorted(p for p, u in uses.items() if len(u) > n_calls.get(p, 0))
        if moved:
            self.move_to_fallback(set(moved), "weight read outside the module's forward call")
            logger.warning(
                "%d parameter(s) are read outside the forward call of their module (%s), e.g. "
                "nn.MultiheadAttention.out_proj inside F.multi_head_attention_forward or h @ lin.weight.T; "
                "their diagonal Fisher uses the exact per-example path (one backward pass per example).",
                len(moved),
                ", ".join(moved[:8]) + (", ..." if len(moved) > 8 else ""),
            )
        for modules, reason, why in (
            (custom, "its class overrides forward: the output is not the plain op of its weight",
             "subclass nn.Embedding/nn.Linear/nn.LayerNorm/Conv1D with a forward that is not the plain op on "
             "their input (e.g. a scaled word embedding, a positional embedding that looks up positions, not "
             "its argument)"),
            (unbatched, "it runs on a tensor whose rows are not the batch's examples",
             "run on a tensor whose rows are not the batch's examples (a relative-position bias looked up on "
             "a (T, T) bucket grid, rows the model permutes or mixes: their count is not N, or example 0's "
             "outputs depend on another row)"),
            (modified, "its output is modified in place after the call",
             "have their output modified in place after their forward call (e.g. `h = lin(x); h *= 2`), so "
             "the output gradient a hook sees is not the layer's"),
        ):
            moved += self.hand_over_modules(modules, reason, why)
        if not moved:
            return
        kept = [c for c in calls if c.handler.name in self.handlers]
        for c in kept:
            c.handler = self.handlers[c.handler.name]
        calls[:] = kept

    def _kfac_rows(self, z: Tensor, calls: list[_Call], rows_mixed: set[str]) -> set[str]:
        """K-FAC modules whose rows are not the examples: ``rows_mixed`` (found by the cross-example check)
        and, under ``reduce``, calls whose row count is no multiple of N. Each of their positions counts on
        its own from now on (``per_row``), with a warning; returns them."""
        # reduce groups a call's positions per row: rows that cannot be told to belong to single
        # examples (their count is no multiple of N) are not grouped
        rows_mixed |= {c.handler.name for c in calls if isinstance(c.handler, _KFACLinear)
                       and c.handler.approx == KFACApprox.REDUCE and c.out.dim() > 0
                       and c.out.shape[0] % z.shape[0] != 0 and c.mask.shape[1] > 1}
        ungrouped = sorted({c.handler.name for c in calls if isinstance(c.handler, _KFACLinear)
                            and c.handler.approx == KFACApprox.REDUCE and c.mask.shape[0] != z.shape[0]
                            and c.mask.shape[1] == 1 and c.handler.name not in rows_mixed})
        if ungrouped:
            logger.warning(
                "K-FAC `reduce`: module(s) %s run on rows that are not grouped by example (tokens gathered without "
                "padding, a tensor with no batch dimension); each row counts on its own there, as in `expand`.",
                ", ".join(ungrouped[:5]),
            )
        if rows_mixed:
            # K-FAC of a layer whose rows are not the examples (a seq-first (T, N, D) input, flattened
            # positions out of order): each row is one position, with no padding mask
            self.per_row |= rows_mixed
            for c in calls:
                if c.handler.name in rows_mixed:
                    c.mask = torch.ones(c.mask.numel(), 1, dtype=torch.bool, device=c.mask.device)
            logger.warning(
                "K-FAC module(s) %s run on rows that are not the batch's examples (a sequence-first (T, N, D) "
                "input, flattened positions out of order): each of their positions counts on its own, none is "
                "grouped per example (so `reduce` acts as `expand` there) and padding is not masked.",
                ", ".join(sorted(rows_mixed)[:5]),
            )
        return rows_mixed

    @staticmethod
    def _cross_example_calls(z: Tensor, calls: list[_Call]) -> set[str]:
        """Handlers with an output row outside example 0's that example 0's outputs depend on.

        A call whose R = k·N rows belong to the examples in order (k = 1; k = C choices of multiple
        choice; k = T positions flattened to (N·T, D)) has ∂⟨v, z_0⟩/∂s_r = 0 for every row r ≥ k.
        Rows that are not the examples but happen to number k·N (a (T, T) relative-position grid
        when T = N, rows the model permutes or mixes, a sequence-first (T, N, D) input) fail that;
        per-row products would then be wrong per-example gradients (diagonal) or wrong groups
        (K-FAC ``reduce``). One extra backward pass, on the first batch only. A diagonal handler is
        checked when its rows are the examples or their flattened positions (other counts are
        handed over anyway), a K-FAC one whenever its rows are a multiple of N.
        """
        n = z.shape[0]
        calls = [c for c in calls if c.out.dim() > 0 and (
            c.out.shape[0] % n == 0 if isinstance(c.handler, _KFACLinear)
            else c.mask.shape[0] == n and c.out.shape[0] in (n, c.mask.numel()))]
        if n < 2 or not calls or z.grad_fn is None:
            return set()
        v = torch.zeros_like(z)
        gen = torch.Generator(device=z.device).manual_seed(0)
        v[0] = torch.randn(z.shape[1:], generator=gen, device=z.device, dtype=torch.float32).to(z.dtype)
        grads = torch.autograd.grad(z, [c.out for c in calls], grad_outputs=v, retain_graph=True, allow_unused=True)
        found: set[str] = set()
        for call, g in zip(calls, grads):
            if g is None:
                continue
            k = call.out.shape[0] // n
            g = g.detach().float().reshape(call.out.shape[0], -1)
            own, rest = g[:k].abs().max(), g[k:].abs().max()
            if not bool(rest <= 1e-5 * own):  # also true for NaN
                found.add(call.handler.name)
        return found

    def check_extended(self, calls: list[_Call], grads: list[Tensor | None]) -> None:
        """First batch: a call whose mask was right-padded (:func:`_extended_mask`) must have a zero output
        gradient at the added positions; otherwise they are not padding, and that module counts every
        position from then on (as before the mask was extended), with a warning."""
        bad = set()
        for call, g in zip(calls, grads):
            if call.extended_from <= 0 or g is None:
                continue
            extra = _flatten_positions(g, call.mask.shape[0])[:, call.extended_from:]
            if bool((extra != 0).any()):
                bad.add(call.handler.name)
        if not bad:
            return
        self.no_extend |= bad
        for call in calls:
            if call.handler.name in bad and call.extended_from > 0:
                call.mask = torch.ones_like(call.mask)
        logger.warning(
            "Module(s) %s run on more positions than the batch's attention mask has, and the extra ones feed the "
            "outputs (they are not padding on the right): every position of theirs counts.",
            ", ".join(sorted(bad)[:5]),
        )

    def hand_over_modules(self, modules: set[str], reason: str, why: str) -> list[str]:
        """Give every parameter of the still-handled ``modules`` to the exact path, with a warning; returns them."""
        names = sorted(modules & set(self.handlers))
        if not names:
            return []
        own = {p for m in names for p in self.handlers[m].param_names()}
        self.move_to_fallback(own, reason)
        logger.warning(
            "%d module(s) %s: %s; their diagonal Fisher uses the exact per-example path (one backward "
            "pass per example).",
            len(names),
            why,
            ", ".join(f"{m} ({type(self.model.get_submodule(m)).__name__})" for m in names[:5]),
        )
        return sorted(own)

    @staticmethod
    def _stock_call(call: _Call, uses: dict[str, set]) -> bool:
        """Whether a call of a module with its own forward still is out = op(input, its parameters).

        The output must come (through views and casts) straight from the op the handler's rule
        assumes, that op must read each of the handler's parameters directly, and an embedding
        must look up the ids the module was given.
        """
        top = _first_op(call.out.grad_fn)
        h = call.handler
        if isinstance(h, _DiagEmbedding):
            kinds = _STOCK_OPS[nn.Embedding]
        elif isinstance(h, _DiagLayerNorm):
            kinds = _STOCK_OPS[nn.LayerNorm]
        else:
            kinds = _STOCK_OPS[nn.Linear]
        if top is None or _node_kind(top) not in kinds:
            return False
        if not all(top in uses.get(p, ()) for p in h.param_names()):
            return False
        if isinstance(h, _DiagEmbedding):
            ids = getattr(top, "_saved_indices", None)
            inp = call.inp
            if ids is None or ids.dim() != inp.dim() or any(a not in (1, b) for a, b in zip(ids.shape, inp.shape)):
                return False
            return bool(torch.equal(ids.expand(inp.shape), inp))
        return True

    def move_to_fallback(self, pnames: set[str], reason: str) -> None:
        """Give ``pnames`` to the exact per-example path; their handlers keep only their other parameters.

        Only before any statistics are accumulated (a K-FAC handler is rebuilt, not trimmed).
        """
        for mname, h in list(self.handlers.items()):
            if not pnames & set(h.param_names()):
                continue
            w = None if h.weight in pnames else h.weight
            b = None if h.bias in pnames else h.bias
            new: _Handler | None = h
            if isinstance(h, _KFACLinear):
                if w is None:
                    self.diag_fallbacks[mname] = reason
                    new = _DiagLinear(mname, h.module, None, b) if b is not None else None
                else:
                    new = _KFACLinear(mname, h.module, w, b, h.approx)  # type: ignore[arg-type]
            else:
                h.weight, h.bias = w, b
                if not h.param_names():
                    new = None
            if new is None:
                del self.handlers[mname]
            else:
                self.handlers[mname] = new
        for p in sorted(pnames):
            self.fallback_params[p] = self.params[p]
        self._update_summed()

    # ------------------------------------------------------------- accumulation
    def is_shared(self, pname: str) -> bool:
        """Whether several handlers add to ``pname``'s per-example gradient (summed, then squared)."""
        return pname in self._summed

    def add_squares(self, pname: str, per_example: Tensor, w: float) -> None:
        """F_diag[p] += w Σ_n per_example[n]²."""
        sq = per_example.square().sum(0)
        if pname in self.acc.sq:
            self.acc.sq[pname].add_(sq, alpha=w)
        else:
            self.acc.sq[pname] = sq.mul_(w)

    def add_per_example(self, pname: str, per_example: Tensor, w: float) -> None:
        """Add a per-example gradient contribution; shared parameters are summed before squaring."""
        if pname in self._summed:
            buf = self.acc.dense.get(pname)
            self.acc.dense[pname] = per_example if buf is None else buf + per_example
        else:
            self.add_squares(pname, per_example, w)

    def add_per_example_rows(self, pname: str, ex: Tensor, ids: Tensor, rows: Tensor, w: float, n: int) -> None:
        """Add embedding-row gradients: example ``ex[i]`` gets ``rows[i]`` in row ``ids[i]``.

        F_diag[v] += w Σ_n (Σ_{i: ex_i = n, ids_i = v} rows_i)²: rows of the same (example, id),
        from any position or call, are summed before squaring, without a vocabulary-sized
        per-example buffer (unless another handler shares the parameter).
        """
        if pname in self._summed:
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
        self._check_same_plan()
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

    def plan_digest(self) -> int:
        """A 56-bit hash of who owns what: each handler's name, kind, parameters and their shapes, then the fallback.

        The statistics buffers are laid out in this order, so equal digests mean they line up.
        """
        h = hashlib.blake2b(digest_size=7)
        for mname, handler in self.handlers.items():
            shapes = [tuple(self.params[p].shape) for p in handler.param_names()]
            h.update(repr((mname, type(handler).__name__, handler.param_names(), shapes)).encode())
        h.update(repr(sorted((p, tuple(v.shape)) for p, v in self.fallback_params.items())).encode())
        return int.from_bytes(h.digest(), "big")

    def _check_same_plan(self) -> None:
        """Refuse to reduce statistics if processes planned differently (their buffers would not line up)."""
        if get_world_size() < 2:
            return
        device = next(iter(self.params.values())).device
        if not all_equal([self.plan_digest()], device=device):
            n_kfac = sum(isinstance(h, _KFACLinear) for h in self.handlers.values())
            raise RuntimeError(
                "processes disagree on which parameters (or parameter shapes) get K-FAC blocks or the exact "
                "per-example path "
                f"(this rank: {n_kfac} blocks, fallback {sorted(self.fallback_params)[:5]}); the first batch "
                "of each rank must run the same modules in the same way, and every process needs at least "
                "one batch (give the Fisher at least as many examples as there are processes)."
            )

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


def _position_masks(batch: Any, encoder_decoder: bool = False) -> tuple[list[Tensor], list[Tensor]]:
    """Candidate (N, T) position masks of the batch: (encoder side, decoder side).

    Every 2-D tensor whose key ends in ``attention_mask``. For an encoder-decoder model the
    ``decoder_*`` ones belong to the decoder; without one, decoder position t counts if a
    labelled position (``labels != -100``) is at t or after it: the decoder is causal, so an
    unlabelled position before a labelled one still feeds it, and the positions after the last
    label feed nothing counted. A mask with more than two dimensions (multiple choice's
    (N, C, T)) also enters flattened to (N·C, T), the shape the encoder runs on.
    For any other model both lists hold every mask.
    """
    if not isinstance(batch, Mapping):
        return [], []
    found = [(k, v.bool() if v.dim() == 2 else v.bool().reshape(-1, v.shape[-1])) for k, v in batch.items()
             if k.endswith("attention_mask") and isinstance(v, Tensor) and v.dim() >= 2]
    if not encoder_decoder:
        masks = [v for _, v in found]
        return masks, masks
    encoder = [v for k, v in found if not k.startswith("decoder_")]
    decoder = [v for k, v in found if k.startswith("decoder_")]
    labels = batch.get("labels")
    if not decoder and isinstance(labels, Tensor) and labels.dim() == 2 and not labels.is_floating_point():
        labelled = labels != -100
        decoder = [labelled.flip(1).cummax(1).values.flip(1)]
    return encoder, decoder


def _encoder_decoder(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The (encoder, decoder) stacks of a transformers encoder-decoder model, else None."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    try:
        encoder, decoder = model.get_encoder(), model.get_decoder()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if isinstance(encoder, nn.Module) and isinstance(decoder, nn.Module) and encoder is not decoder:
        return encoder, decoder
    return None


def _first_tensor(output: Any) -> Tensor | None:
    """A stack's hidden states: ``last_hidden_state``, or the first element of a tuple output."""
    if isinstance(output, Tensor):
        return output
    h = getattr(output, "last_hidden_state", None)
    if isinstance(h, Tensor):
        return h
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _batch_size(batch: Any) -> int:
    """Leading size of the first tensor of the batch (0 if none)."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    for v in values:
        if isinstance(v, Tensor) and v.dim() >= 1:
            return v.shape[0]
    return 0


def _pads_last_batch(dataloader: Any) -> bool:
    """Whether ``dataloader`` is an Accelerate loader that completes its last batches with repeats.

    With ``even_batches=True`` (the default of ``Accelerator.prepare``) every process gets a full
    last batch, topped up with examples from the start of the dataset; a dispatching loader does
    the same.
    """
    try:
        from accelerate.data_loader import DataLoaderDispatcher
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return False
    if isinstance(dataloader, DataLoaderDispatcher):
        return not getattr(dataloader, "_drop_last", False)
    return bool(getattr(getattr(dataloader, "batch_sampler", None), "even_batches", False))


def _real_rows(dataloader: Any, n: int) -> int:
    """How many of this batch's ``n`` rows are examples, not an Accelerate loader's repeats.

    At the last batch such a loader knows ``remainder``, the number of real examples in the
    final round of batches; they come first in process order (what ``gather_for_metrics``
    keeps), so this process holds clamp(remainder − rank·n, 0, n) of them.
    """
    if not getattr(dataloader, "end_of_dataloader", False):
        return n
    remainder = getattr(dataloader, "remainder", -1)
    if not isinstance(remainder, int) or remainder <= 0 or not _pads_last_batch(dataloader):
        return n
    return max(0, min(n, remainder - get_rank() * n))


def _map_examples(batch: Any, fn: Any) -> Any:
    """The batch with ``fn`` applied to every tensor whose leading size is the batch's (its examples)."""
    n = _batch_size(batch)

    def one(v: Any) -> Any:
        return fn(v) if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n else v

    if isinstance(batch, Mapping):  # _to_device made it a dict
        return {key: one(v) for key, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(one(v) for v in batch)
    return one(batch)


def _extended_mask(x: Tensor, masks: list[Tensor], is_index_input: bool) -> tuple[Tensor | None, int]:
    """The batch's (N, T) mask right-padded with False to the call's T' > T positions, and T.

    Models that pad to a multiple of a block or window (BigBird's block-sparse attention,
    Longformer) run their layers on T' > T positions, the extra ones on the right. The first batch
    checks that those positions feed nothing counted (:meth:`_Estimator.check_extended`).
    """
    n = x.shape[0]
    mid = tuple(x.shape[1:]) if is_index_input else tuple(x.shape[1:-1])
    if len(mid) != 1:
        return None, 0
    for m in masks:
        if m.dim() == 2 and m.shape[0] == n and m.shape[1] < mid[0]:
            return nn.functional.pad(m, (0, mid[0] - m.shape[1]), value=False).to(x.device), m.shape[1]
    return None, 0


def _mask_for(x: Tensor, masks: list[Tensor], is_index_input: bool, n_batch: int | None = None) -> Tensor | None:
    """The (N, P) mask of a module input ``x``, or None if no mask fits its positions.

    An input whose positions were flattened into its rows, (N·T, D) as OPT feeds its MLP, gets the
    batch's (N, T) mask: its rows are then read as N examples of T positions each (example-major,
    as ``reshape(-1, D)`` of a batch-first tensor; the first batch checks that order).
    """
    n = x.shape[0]
    mid = tuple(x.shape[1:]) if is_index_input else tuple(x.shape[1:-1])
    if len(mid) == 0:
        if n_batch and n != n_batch:
            for m in masks:
                if m.dim() == 2 and m.shape[0] == n_batch and m.numel() == n:
                    return m.to(x.device)
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


def _refuse_compiled(model: nn.Module) -> None:
    """Fail on a compiled model: inside a compiled graph the layers' hooks get no per-layer output gradients."""
    for name, module in model.named_modules():
        compiled = type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None
        if compiled:
            where = f"the submodule {name!r}" if name else "the model"
            raise ValueError(
                f"{where} is compiled (torch.compile / nn.Module.compile): the Fisher is read from per-layer "
                "hooks, which see no per-layer gradients inside a compiled graph, so the result would be "
                "wrong. Pass the eager model: `compiled._orig_mod` for torch.compile(model), or a copy "
                "that was not compiled. (ContinualTrainer unwraps torch.compile itself.)"
            )


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
    _refuse_compiled(model)
    _warn_unmatched(model, config)
    est = _Estimator(model, config)
    try:
        device = next(p.device for p in model.parameters())
    except StopIteration:
        device = torch.device("cpu")
    refused = torch.tensor([float(not est.params)], dtype=torch.float64, device=device)
    all_reduce_sum_([refused])  # every rank refuses together, not one while the others wait in a collective
    if not est.params:
        raise ValueError(
            "the model has no trainable parameter left to estimate a Fisher for: every parameter is "
            "frozen (requires_grad=False) or excluded by the `exclude` patterns."
        )
    if float(refused) > 0:
        raise RuntimeError(
            f"{int(refused)} other process(es) have no trainable parameter to estimate a Fisher for (their "
            "error is in their own log); every process must hold the same trainable model."
        )
    generator = torch.Generator(device=device).manual_seed(config.seed + get_rank())

    calls: list[_Call] = []
    masks: list[list[Tensor]] = [[], []]  # candidate position masks: encoder side, decoder side
    stacks = _encoder_decoder(model)
    phase = [0]  # 1 while the decoder stack (and what follows it, the LM head) runs
    encoder_out: list[Tensor | None] = [None]  # the encoder's hidden states (cross-attention keys/values)
    batch_n = [0]
    warned: set[str] = set()
    unmasked: dict[str, tuple] = {}  # first batch: modules with no fitting mask, reported once its plan is final
    cache: dict = {}

    hooks_on = [True]  # off for the first batch's reference forward (see first_forward)
    broadcast: set[str] = set()  # modules whose call this batch was expanded over the examples

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        handler = est.handlers.get(names[id(module)])
        if handler is None or not hooks_on[0]:  # its parameters went to the exact per-example path
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        is_index = isinstance(module, nn.Embedding)
        replaced = None
        enc = encoder_out[0]
        side = phase[0] and not (enc is not None and x.data_ptr() == enc.data_ptr() and x.shape == enc.shape)
        if x.shape[0] == 1 and batch_n[0] > 1 and output.shape[0] == 1:
            # A call broadcast over the batch (e.g. BERT's position embeddings of shape
            # (1, T, D)): expand it so that its output gradient stays per example.
            # A copy, not a view: the model may change it in place (DeBERTa scales its
            # relative-position projections in place), which a broadcast view cannot take.
            # The model then sees an (N, ...) output where it made a (1, ...) one; the first batch
            # checks that this leaves its predictions unchanged (first_forward).
            x = x.expand((batch_n[0],) + tuple(x.shape[1:]))
            output = replaced = output.expand((batch_n[0],) + tuple(output.shape[1:])).clone()
            broadcast.add(handler.name)
        if handler.name in est.per_row:
            mask = torch.ones(x.numel() // (1 if is_index else x.shape[-1]), 1, dtype=torch.bool, device=x.device)
        else:
            mask = _mask_for(x, masks[side], is_index, batch_n[0])
        extended_from = 0
        if mask is None and handler.name not in est.no_extend:
            mask, extended_from = _extended_mask(x, masks[side], is_index)
        if mask is None:
            mid = x.shape[1:] if is_index else x.shape[1:-1]
            n = x.shape[0]
            mask = torch.ones(n, math.prod(mid), dtype=torch.bool, device=x.device)
            if handler.name not in warned:
                warned.add(handler.name)
                unmasked[handler.name] = (n,) + tuple(mid)
        call = _Call(handler, x.detach(), output, mask, output._version, extended_from)
        handler.on_forward(call, cache)
        calls.append(call)
        return replaced

    def forward(batch: Any) -> tuple[PredictiveOutput, Tensor, Tensor | None, Tensor]:
        calls.clear()
        cache.clear()
        broadcast.clear()
        phase[0], encoder_out[0] = 0, None
        with torch.enable_grad(), autocast:
            out = predictive_fn(model, batch)
        return (out, *out.flat())

    def first_forward(batch: Any) -> tuple[PredictiveOutput, Tensor, Tensor | None, Tensor]:
        """The hooked forward, checked against a plain one when it expanded broadcast calls.

        Expanding a (1, ...) call to (N, ...) is exact only if the model's output does not depend
        on that shape (BERT adds its position embeddings: it does not; DeBERTa-v2 repeats its
        relative-position projections by the batch size: it does). If the predictions change, or the
        forward fails, those modules go to the exact per-example path and the batch runs again.
        """
        failed: Exception | None = None
        try:
            result = forward(batch)
        except Exception as e:
            if not broadcast:
                raise
            result, failed = None, e
        if not broadcast:
            return result  # type: ignore[return-value]
        hooks_on[0] = False
        try:
            with torch.no_grad(), autocast:
                z_ref = predictive_fn(model, batch).flat()[0]
        except Exception:
            if failed is not None:  # the plain forward fails too: not the expansion's doing
                raise failed from None
            raise
        finally:
            hooks_on[0] = True
        if result is not None:
            z = result[1].detach()
            tol = 1e-2 if autocast_dtype is not None else 1e-4
            finite = z_ref[torch.isfinite(z_ref)]
            scale = float(finite.abs().max()) if finite.numel() else 0.0
            if z.shape == z_ref.shape and torch.allclose(z, z_ref, rtol=tol, atol=tol * max(scale, 1.0)):
                return result
        est.hand_over_modules(
            set(broadcast),
            "a call broadcast over the batch whose per-example expansion changes the model's output",
            "are called once for the whole batch (a (1, ...) input, e.g. DeBERTa-v2's relative-position "
            "projections) and the model's predictions depend on that call's shape, so it cannot be "
            "expanded per example",
        )
        del result
        return forward(batch)

    names = {id(h.module): n for n, h in est.handlers.items()}
    handles = [
        h.module.register_forward_hook(hook, with_kwargs=True) for h in est.handlers.values()
    ]
    if stacks is not None:
        # decoder-side calls take the decoder's positions (and mask); the cross-attention
        # keys/values, fed the encoder's hidden states, keep the encoder's
        def enter(side: int) -> Any:
            def pre_hook(module: nn.Module, args: tuple) -> None:
                phase[0] = side

            return pre_hook

        def encoder_done(module: nn.Module, args: tuple, output: Any) -> None:
            encoder_out[0] = _first_tensor(output)

        handles += [
            stacks[0].register_forward_pre_hook(enter(0)),
            stacks[1].register_forward_pre_hook(enter(1)),
            stacks[0].register_forward_hook(encoder_done),
        ]
    modes = ExitStack()
    modes.enter_context(evaluating(model))  # until the finally below: every module back in its own mode
    n_examples = torch.zeros((), dtype=torch.float64, device=device)
    fallback = list(est.fallback_params.values())
    fallback_names = list(est.fallback_params)
    failure: Exception | None = None
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
        first = True
        extension_checked = False  # the first batch that reaches the backward checks right-padded masks
        for i, batch in enumerate(bar):
            if config.max_batches is not None and i >= config.max_batches:
                break
            batch = _to_device(batch, device)
            real = _real_rows(dataloader, _batch_size(batch))
            if real == 0:
                continue
            if real < _batch_size(batch):
                batch = _map_examples(batch, lambda v: v[:real])
            result = None
            if first:
                first = False
                # The plan's checks compare examples (a broadcast call expanded per example, rows that
                # are not the examples): one example cannot show them, so they run on it twice (those
                # statistics are dropped) and the batch itself then runs with the final plan.
                probe = batch if _batch_size(batch) > 1 else _map_examples(batch, lambda v: torch.cat([v, v]))
                masks[:] = _position_masks(probe, stacks is not None)
                batch_n[0] = _batch_size(probe)
                result = first_forward(probe)
                est.check_uses(result[1], calls)  # first_forward and check_uses may both hand parameters over
                fallback = list(est.fallback_params.values())
                fallback_names = list(est.fallback_params)
                if probe is not batch:
                    result = None
                    calls.clear()
                    cache.clear()
            if result is None:
                masks[:] = _position_masks(batch, stacks is not None)
                batch_n[0] = _batch_size(batch)
                result = forward(batch)
            out, z, labels, mask = result
            del result
            n_examples += z.shape[0]
            for name, shape in unmasked.items():
                if name in est.handlers:  # a module handed over has no positions to mask
                    logger.warning(
                        "No attention mask of shape %s found in the batch for module %r; every position counts.",
                        shape,
                        name,
                    )
            unmasked.clear()
            inputs_done = False  # A is added once the first backward shows which calls reach the outputs
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
                    if not inputs_done and not extension_checked:
                        extension_checked = True
                        est.check_extended(calls, grads)
                    if not inputs_done:
                        # a call whose output the predictions do not depend on (DoRA's weight-norm pass
                        # lora_B(lora_A(I))) has no gradient (None): its inputs are not positions of the data
                        _accumulate_kfac_inputs([c for c, g in zip(calls, grads) if g is not None])
                        inputs_done = True
                    # all calls of one module at once: their per-example gradients add up before squaring
                    per_handler: dict[_Handler, tuple[list[_Call], list[Tensor]]] = {}
                    for call, g in zip(calls, grads):
                        if g is not None:
                            cs, gs = per_handler.setdefault(call.handler, ([], []))
                            cs.append(call)
                            gs.append(g)
                    for handler, (cs, gs) in per_handler.items():
                        handler.on_backward(cs, gs, w, est)
                    est.flush_shared(w)
                for n in range(z.shape[0]) if fallback else ():
                    vn = torch.zeros_like(v)
                    vn[n] = v[n]
                    grads = torch.autograd.grad(z, fallback, grad_outputs=vn, retain_graph=True, allow_unused=True)
                    for pname, g in zip(fallback_names, grads):
                        if g is not None:
                            est.add_squares(pname, g.float().unsqueeze(0), w)
            if not inputs_done:  # no output vector (no counted position in this batch): as before, every call
                _accumulate_kfac_inputs(calls)
            del out, z, outs
            calls.clear()
            cache.clear()
    except Exception as e:
        if get_world_size() < 2:
            raise
        # with several processes, raise on every one of them (below) rather than leave the
        # others waiting in the next collective until it times out
        failure = e
    finally:
        for h in handles:
            h.remove()
        modes.close()
    status = torch.stack([n_examples, torch.tensor(float(failure is not None), dtype=torch.float64, device=device)])
    all_reduce_sum_([status])
    if failure is not None:
        raise failure
    if float(status[1]) > 0:
        raise RuntimeError(
            f"{int(status[1])} other process(es) failed while estimating the Fisher; their error is in "
            "their own log (this process stopped with them)."
        )
    n_examples = status[0]
    total_n = float(n_examples.item())
    if total_n == 0:
        raise ValueError(
            "the Fisher was estimated on no example: the dataset or dataloader is empty. "
            "Pass the task's training data (or a non-empty sample of it)."
        )
    curv = est.finalize(total_n)
    curv.fisher_config = config
    return curv
