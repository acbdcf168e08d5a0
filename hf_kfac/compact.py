"""Compact K-FAC priors: truncated eigendecompositions of the factors, and anchor references.

A full K-FAC prior stores, per ``nn.Linear``, the anchor W̃* (as big as the weight) and two
dense factors A ((d_in+1)²) and G (d_out²): for a BERT-style encoder the factors alone hold
about 3.5× the numbers of the weights. The compact format stores each factor F (A or G) as

    F̃ = U diag(w) Uᵀ + diag(r),

with U the top-k eigenvectors of F (``d × k``, bfloat16 by default), w their coefficients
and r a non-negative remainder (both float32):

- ``remainder="diagonal"`` (default): w = the top-k eigenvalues λ, and r = diag(F − U Λ Uᵀ),
  computed with the *stored* (rounded) U, so diag(F̃) = diag(F) and tr F̃ = tr F up to float32
  round-off. The one exception: where the rounded U Λ Uᵀ alone exceeds diag(F) (F of rank
  <= k, bf16 U), r is clamped to 0 to keep F̃ PSD, and diag(F̃) exceeds diag(F) there by at
  most U's rounding (a factor (1 + 2⁻⁸)² in bfloat16).
  It keeps the per-coordinate scale of what the eigenpairs leave out (transformer
  activations have a few outlier dimensions), which a single number cannot.
- ``remainder="isotropic"``: r = σ·1 with σ the mean of the discarded eigenvalues and
  w = λ − σ, i.e. F̃ = U(Λ − σ)Uᵀ + σI: the discarded spectrum is flattened to its mean,
  which also keeps the trace (up to the rounding of U: at most ~2⁻⁷ relative in bfloat16).

Both are positive semi-definite by construction (w ≥ 0, r ≥ 0), equal F when k = d
(up to the rounding of U), and apply to a d_out × d_in matrix in O(d_out·d_in·k) instead of
O(d_out·d_in·d) (:mod:`hf_kfac.penalty` switches to the dense factor when k > d/2, where
that is cheaper). With k = d and float32 eigenvectors the compact prior equals the full
one up to float round-off.

**Anchors.** The anchor θ* alone is as big as the model. With ``merge`` accumulation the
single anchor is the model's weights right after consolidation, and those weights are
usually saved beside the prior. ``Prior.save_pretrained(folder, model=model)`` then stores
a *reference* to them (a SHA-256 of the float32 parameters the anchor covers, see
:func:`weights_digest`) instead of a copy, but only when every anchor tensor is bitwise
equal to the model's parameter (``anchor="auto"``); otherwise, e.g. in a mid-task
checkpoint where the weights have moved on, the anchor is stored in full. Loading such a
prior needs the same weights (``Prior.from_pretrained(folder, model=model)``); the digest
is checked and a mismatch is refused with a clear error. ``anchor="copy"`` always stores
the anchor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .curvature.blocks import Curvature, KFACBlock
from .enums import StorageFormat

REMAINDERS = ("diagonal", "isotropic")
EIGVEC_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
ANCHOR_MODES = ("auto", "copy")


@dataclass
class StorageConfig:
    """How a prior stores its K-FAC factors (``PriorConfig.storage``).

    Attributes:
        format: ``full`` (dense float32 factors, the default) or ``compact``.
        rank_fraction: Compact: keep at most ``ceil(rank_fraction · d)`` eigenpairs of a
            d × d factor. ``None``: no such cap.
        rank: Compact: keep at most this many eigenpairs per factor. ``None``: no cap.
        energy: Compact: keep the fewest eigenpairs whose eigenvalues sum to at least this
            fraction of the factor's trace (in (0, 1]). ``None``: no such criterion.
            The rank is the smallest of the criteria given (at least 1).
        remainder: Compact: ``diagonal`` or ``isotropic`` (see :mod:`hf_kfac.compact`).
        eigenvector_dtype: Compact: ``bfloat16`` or ``float32`` for the eigenvectors
            (everything else is float32).
        anchor: Compact: ``auto`` stores a reference (with a SHA-256) instead of an anchor
            that equals the model weights passed to ``save_pretrained(model=...)``;
            ``copy`` always stores the anchor.
        compute_dtype: Compact: dtype of the penalty's matrix products, ``float32`` (default)
            or ``bfloat16`` (about 2.4x faster products on CPUs with AVX512-BF16/AMX and on
            GPUs; ΔW is rounded to bf16 inside the products, so the gradient carries ~0.4%
            rounding per entry).
    """

    format: StorageFormat | str = StorageFormat.FULL
    rank_fraction: float | None = 0.25
    rank: int | None = None
    energy: float | None = None
    remainder: str = "diagonal"
    eigenvector_dtype: str = "bfloat16"
    anchor: str = "auto"
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.format = StorageFormat(self.format)
        if self.rank_fraction is not None and not (
            isinstance(self.rank_fraction, (int, float)) and 0 < self.rank_fraction <= 1
        ):
            raise ValueError(f"storage rank_fraction must be in (0, 1] or None, got {self.rank_fraction!r}.")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise ValueError(f"storage rank must be an integer >= 1 or None, got {self.rank!r}.")
        if self.energy is not None and not (isinstance(self.energy, (int, float)) and 0 < self.energy <= 1):
            raise ValueError(f"storage energy must be in (0, 1] or None, got {self.energy!r}.")
        if self.remainder not in REMAINDERS:
            raise ValueError(f"storage remainder must be one of {REMAINDERS}, got {self.remainder!r}.")
        if self.eigenvector_dtype not in EIGVEC_DTYPES:
            raise ValueError(f"storage eigenvector_dtype must be one of {tuple(EIGVEC_DTYPES)}, got {self.eigenvector_dtype!r}.")
        if self.compute_dtype not in EIGVEC_DTYPES:
            raise ValueError(f"storage compute_dtype must be one of {tuple(EIGVEC_DTYPES)}, got {self.compute_dtype!r}.")
        if self.anchor not in ANCHOR_MODES:
            raise ValueError(f"storage anchor must be one of {ANCHOR_MODES}, got {self.anchor!r}.")

    @classmethod
    def coerce(cls, value: "StorageConfig | StorageFormat | str | Mapping[str, Any] | None") -> "StorageConfig":
        """A StorageConfig from itself, a format name (``"compact"``), a dict, or None (full)."""
        if value is None:
            return cls()
        if isinstance(value, StorageConfig):
            return value
        if isinstance(value, str):
            return cls(format=value)
        if isinstance(value, Mapping):
            return cls(**value)
        raise TypeError(f"storage must be 'full', 'compact', a dict or a StorageConfig, got {type(value).__name__}.")

    @property
    def compact(self) -> bool:
        return self.format == StorageFormat.COMPACT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = str(self.format)
        return d

    def rank_for(self, eigvals_desc: Tensor) -> int:
        """The number of eigenpairs to keep for a factor with these (descending) eigenvalues."""
        d = eigvals_desc.numel()
        k = d
        if self.rank_fraction is not None:
            k = min(k, math.ceil(self.rank_fraction * d))
        if self.rank is not None:
            k = min(k, self.rank)
        if self.energy is not None:
            e = eigvals_desc.double().clamp_min(0)
            total = float(e.sum())
            if total > 0:
                frac = torch.cumsum(e, 0) / total
                k = min(k, int((frac < self.energy - 1e-12).sum()) + 1)
        return max(1, min(k, d))


@dataclass
class CompactFactor:
    """F̃ = U diag(w) Uᵀ + diag(r) for one Kronecker factor.

    Attributes:
        eigvecs: U, ``(d, k)``, bfloat16 or float32.
        eigvals: w, ``(k,)`` float32, >= 0.
        residual: r, ``(d,)`` float32, >= 0.
    """

    eigvecs: Tensor
    eigvals: Tensor
    residual: Tensor

    @property
    def dim(self) -> int:
        return self.residual.shape[0]

    @property
    def rank(self) -> int:
        return self.eigvals.shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.dim, self.dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.residual.dtype

    @property
    def device(self) -> torch.device:
        return self.residual.device

    def numel(self) -> int:
        return self.eigvecs.numel() + self.eigvals.numel() + self.residual.numel()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.eigvecs, self.eigvals, self.residual))

    def tensors(self) -> dict[str, Tensor]:
        return {"eigvecs": self.eigvecs, "eigvals": self.eigvals, "residual": self.residual}

    def to(self, *args: Any, **kwargs: Any) -> "CompactFactor":
        """Move to a device; a floating dtype applies to w and r only (U keeps its storage dtype)."""
        dtype = kwargs.pop("dtype", None)
        rest = []
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                rest.append(a)
        u = self.eigvecs.to(*rest, **kwargs)
        w = self.eigvals.to(*rest, **kwargs)
        r = self.residual.to(*rest, **kwargs)
        if dtype is not None:
            w, r = w.to(dtype), r.to(dtype)
        return CompactFactor(u, w, r)

    def __mul__(self, c: float) -> "CompactFactor":
        return CompactFactor(self.eigvecs, self.eigvals * c, self.residual * c)

    __rmul__ = __mul__

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The d × d matrix F̃."""
        u = self.eigvecs.to(dtype)
        out = (u * self.eigvals.to(dtype)) @ u.T
        out.diagonal().add_(self.residual.to(dtype))
        return out

    def diagonal(self) -> Tensor:
        u = self.eigvecs.float()
        return (u.square() * self.eigvals).sum(1) + self.residual

    def trace(self) -> float:
        return float(self.diagonal().sum())


@dataclass
class CompactKFACBlock:
    """A K-FAC block with compact factors: F ≈ Ã ⊗ G̃ (duck-types :class:`KFACBlock`)."""

    A: CompactFactor
    G: CompactFactor
    weight: str
    bias: str | None = None

    @property
    def in_features(self) -> int:
        return self.A.dim - (1 if self.bias is not None else 0)

    @property
    def out_features(self) -> int:
        return self.G.dim

    def to(self, *args: Any, **kwargs: Any) -> "CompactKFACBlock":
        return CompactKFACBlock(self.A.to(*args, **kwargs), self.G.to(*args, **kwargs), self.weight, self.bias)

    def dense_factors(self) -> KFACBlock:
        """The equivalent full block (dense Ã and G̃)."""
        return KFACBlock(self.A.dense(), self.G.dense(), self.weight, self.bias)

    def dense(self) -> Tensor:
        return torch.kron(self.A.dense(), self.G.dense())

    def diagonal(self) -> tuple[Tensor, Tensor | None]:
        d = torch.outer(self.G.diagonal(), self.A.diagonal())
        if self.bias is None:
            return d, None
        return d[:, :-1].contiguous(), d[:, -1].contiguous()


def is_compact(block: Any) -> bool:
    return isinstance(block, CompactKFACBlock)


_RANDOMIZED_MIN_DIM = 1024  # below this a full eigh is cheap


@contextmanager
def _lapack_threads(n: int = 1):
    """Run LAPACK factorizations (eigh, qr) on ``n`` threads.

    With MKL, multi-threaded eigh/qr of these sizes gain little and, on a machine whose
    cores are shared with other work, can slow down by 10-100x (threads spin at barriers);
    one thread is consistently fast. Matrix products outside this block keep all threads.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _randomized_top_eigh(F: Tensor, k: int, iters: int = 3) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of a PSD matrix by subspace iteration (Halko et al. 2011), float32.

    Costs (iters + 2) products F·Q with d × (k + p) blocks, a few times less than a full
    eigh when k ≪ d. Deterministic (fixed seed). Returns (eigenvalues desc, eigenvectors).
    """
    d = F.shape[0]
    p = min(d - k, max(16, k // 8))
    g = torch.Generator(device=F.device).manual_seed(0)
    Y = F @ torch.randn(d, k + p, generator=g, dtype=F.dtype, device=F.device)
    for i in range(iters + 1):
        with _lapack_threads():
            Q = torch.linalg.qr(Y)[0]
        Y = F @ Q
    B = Q.T @ Y
    with _lapack_threads():
        evals, V = torch.linalg.eigh((B + B.T) / 2)
    evals, V = evals.flip(0)[:k], V.flip(1)[:, :k]
    return evals, Q @ V


def compress_factor(F: Tensor, cfg: StorageConfig) -> CompactFactor:
    """Truncated eigendecomposition of a symmetric PSD factor (see the module docstring)."""
    F = F.detach().to(dtype=torch.float32, device="cpu")  # symmetric (estimates and merges are)
    d = F.shape[0]
    k_cap = cfg.rank_for(torch.zeros(d)) if cfg.energy is None else d
    if d > _RANDOMIZED_MIN_DIM and 3 * k_cap <= d:
        # a rank cap well below d and no spectrum-wide criterion: only the top k are needed
        evals, evecs = _randomized_top_eigh(F, k_cap)
        evals, evecs = evals.double().clamp_min(0), evecs.double()
        k = k_cap
    else:
        # float64 where it is cheap; float32 for large factors (the discarded tail is below its round-off)
        with _lapack_threads():
            evals, evecs = torch.linalg.eigh(F.double() if d <= 1024 else F)
        evals = evals.double().flip(0).clamp_min(0)
        evecs = evecs.double().flip(1)
        k = cfg.rank_for(evals)
    u = evecs[:, :k].to(EIGVEC_DTYPES[cfg.eigenvector_dtype])
    lam = evals[:k]
    if cfg.remainder == "isotropic":
        # the mean of the discarded eigenvalues, from the trace (no need for the full spectrum)
        sigma = max(0.0, (float(torch.trace(F).double()) - float(lam.sum())) / (d - k)) if k < d else 0.0
        w = (lam - sigma).clamp_min(0)
        r = torch.full((d,), sigma, dtype=torch.float64)
    else:
        ud = u.double()
        r = (torch.diagonal(F).double() - (ud.square() * lam).sum(1)).clamp_min(0)
        w = lam
        if k == d:
            r = torch.zeros_like(r) if cfg.eigenvector_dtype == "float32" else r
    return CompactFactor(u.contiguous(), w.float().contiguous(), r.float().contiguous())


def compress_block(block: KFACBlock, cfg: StorageConfig, cache: dict | None = None) -> CompactKFACBlock:
    """Compress both factors of a block; ``cache`` reuses the result for equal factors (q/k/v share A)."""

    def one(F: Tensor) -> CompactFactor:
        if cache is None:
            return compress_factor(F, cfg)
        key = (tuple(F.shape), hashlib.sha1(F.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest())
        if key not in cache:
            cache[key] = compress_factor(F, cfg)
        c = cache[key]
        return CompactFactor(c.eigvecs.clone(), c.eigvals.clone(), c.residual.clone())

    return CompactKFACBlock(one(block.A), one(block.G), block.weight, block.bias)


def compress_curvature(curv: Curvature, cfg: StorageConfig) -> Curvature:
    """The curvature with every (full) K-FAC block compressed; diagonals are kept as they are."""
    cache: dict = {}
    kfac: dict[str, Any] = {}
    for name, b in curv.kfac.items():
        kfac[name] = b if is_compact(b) else compress_block(b, cfg, cache)
    return Curvature(kfac, dict(curv.diag), curv.n_examples, dict(curv.diag_fallbacks), curv.fisher_config)


def densify_curvature(curv: Curvature) -> Curvature:
    """The curvature with every compact block replaced by its dense equivalent."""
    kfac = {n: (b.dense_factors() if is_compact(b) else b) for n, b in curv.kfac.items()}
    return Curvature(kfac, dict(curv.diag), curv.n_examples, dict(curv.diag_fallbacks), curv.fisher_config)


def weights_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over (name, shape, float32 bytes) of the tensors, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def nbytes(t: Tensor | CompactFactor) -> int:
    if isinstance(t, CompactFactor):
        return t.nbytes()
    return t.numel() * t.element_size()
