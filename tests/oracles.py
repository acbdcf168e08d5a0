"""Independent reference computations of the Fisher, by brute force.

Nothing here uses hf_kfac's estimator: per-example gradients come from one
``torch.autograd.grad`` call per example (and per class and position for the exact
Fisher), and dense matrices are built by hand.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import BertConfig


def tiny_bert_config(**overrides) -> BertConfig:
    """A random BERT small enough for brute force."""
    kw = dict(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=16,
        type_vocab_size=2,
        num_labels=3,
        attn_implementation="eager",
    )
    kw.update(overrides)
    return BertConfig(**kw)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _logits_labels(model: nn.Module, batch: dict) -> tuple[Tensor, Tensor | None]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    n, c = logits.shape[0], logits.shape[-1]
    logits = logits.reshape(n, -1, c)
    labels = batch.get("labels")
    return logits, (labels.reshape(n, -1) if labels is not None else None)


def per_example_grads(model: nn.Module, batch: dict, fisher_type: str) -> list[list[tuple[float, dict[str, Tensor]]]]:
    """For each example n: a list of (weight, ∇θ of one log-likelihood term).

    ``empirical``: one term, Σ_t log p(y_nt). ``exact``: one term per position t and
    class c, √p_ntc ∇ log p_ntc (so that Σ terms² is the exact Fisher).
    """
    model.eval()
    params = trainable(model)
    names = list(params)
    logits, labels = _logits_labels(model, batch)
    logp = torch.log_softmax(logits, -1)
    out = []
    for n in range(logits.shape[0]):
        terms = []
        if fisher_type == "empirical":
            mask = labels[n] != -100
            ll = logp[n, mask].gather(-1, labels[n, mask].unsqueeze(-1)).sum()
            gs = torch.autograd.grad(ll, list(params.values()), retain_graph=True, allow_unused=True)
            terms.append((1.0, {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in zip(names, gs)}))
        else:
            for t in range(logits.shape[1]):
                if labels is not None and labels[n, t] == -100:
                    continue
                for c in range(logits.shape[2]):
                    gs = torch.autograd.grad(logp[n, t, c], list(params.values()), retain_graph=True, allow_unused=True)
                    w = logp[n, t, c].exp().item()
                    terms.append((w, {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in zip(names, gs)}))
        out.append(terms)
    return out


def brute_force_diag(model: nn.Module, batches: list[dict], fisher_type: str) -> dict[str, Tensor]:
    """F_diag = (1/N) Σ_n Σ_terms w (∇θ term)², one autograd call per term."""
    params = trainable(model)
    acc = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    n_total = 0
    for batch in batches:
        for terms in per_example_grads(model, batch, fisher_type):
            n_total += 1
            for w, g in terms:
                for k in acc:
                    acc[k] += w * g[k].float() ** 2
    return {k: v / n_total for k, v in acc.items()}


def column_major(grad_w: Tensor, grad_b: Tensor | None) -> Tensor:
    """vec(W̃) with W̃ = [W, b], stacking columns."""
    wt = grad_w if grad_b is None else torch.cat([grad_w, grad_b.unsqueeze(1)], dim=1)
    return wt.T.reshape(-1)


def brute_force_dense_block(model: nn.Module, batches: list[dict], fisher_type: str, weight: str, bias: str | None) -> Tensor:
    """The exact Fisher block over vec([W, b]): (1/N) Σ_n Σ_terms w vec(∇) vec(∇)ᵀ."""
    blocks = None
    n_total = 0
    for batch in batches:
        for terms in per_example_grads(model, batch, fisher_type):
            n_total += 1
            for w, g in terms:
                v = column_major(g[weight], g[bias] if bias else None)
                outer = w * torch.outer(v, v)
                blocks = outer if blocks is None else blocks + outer
    return blocks / n_total


def gaussian_dense_block(model: nn.Module, batches: list[dict], weight: str, bias: str | None) -> Tensor:
    """Exact Fisher block of a unit-variance gaussian likelihood: (1/N) Σ_n J_nᵀ J_n.

    J_n stacks ∂z_ntc/∂vec([W, b]) over the example's valid output positions t and outputs c,
    one autograd call per entry.
    """
    params = dict(model.named_parameters())
    targets = [params[weight]] + ([params[bias]] if bias else [])
    total, n_total = None, 0
    for batch in batches:
        out = model(**batch).logits
        mask = batch.get("output_mask")
        n = out.shape[0]
        z = out.reshape(n, -1, out.shape[-1])
        for i in range(n):
            n_total += 1
            for t in range(z.shape[1]):
                if mask is not None and not mask[i, t]:
                    continue
                for c in range(z.shape[2]):
                    gs = torch.autograd.grad(z[i, t, c], targets, retain_graph=True)
                    v = column_major(gs[0], gs[1] if bias else None)
                    outer = torch.outer(v, v)
                    total = outer if total is None else total + outer
    return total / n_total


def _dense_factor(f) -> Tensor:
    """A stored factor as a dense float32 matrix: a full tensor as it is, a compact one as
    U diag(w) Uᵀ + diag(r) from its stored tensors (U upcast from its storage dtype)."""
    if isinstance(f, Tensor):
        return f.float()
    u = f.eigvecs.float()
    return (u * f.eigvals.float()) @ u.T + torch.diag(f.residual.float())


def _factored_damping(A: Tensor, G: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """(A + π√δ I, G + √δ/π I), π² = (tr A / d_A) / (tr G / d_G) (1 if a trace is 0)."""
    ta, tg = float(torch.trace(A)) / A.shape[0], float(torch.trace(G)) / G.shape[0]
    pi = (ta / tg) ** 0.5 if ta > 0 and tg > 0 else 1.0
    r = delta**0.5
    return A + pi * r * torch.eye(A.shape[0]), G + (r / pi) * torch.eye(G.shape[0])


def _slot_weights_by_hand(prior) -> list[float]:
    """c_s from the task records: s_t = N_t (data_size) or 1; separate: s_t γ^age; merge: C ← γ C + s_t."""
    gamma = float(prior.config.decay)
    s = [float(t.n_examples) if str(prior.config.task_weighting) == "data_size" else 1.0 for t in prior.tasks]
    if str(prior.config.accumulation) == "merge":
        c = 0.0
        for st in s:
            c = gamma * c + st
        return [c]
    n = len(prior.slots)
    return [sum(s[t] for t in slot.tasks) * gamma ** (n - 1 - i) for i, slot in enumerate(prior.slots)]


def dense_compact_penalty(params: dict[str, Tensor], prior, lam: float) -> Tensor:
    """½ λ Σ_s c_s [vec(ΔW̃)ᵀ (Ã_δ ⊗ G̃_δ) vec(ΔW̃) + Σ (d + δ) Δ²] with dense matrices and torch.kron.

    For a K-FAC prior stored full or compact: every factor is rebuilt densely from the stored
    tensors (:func:`_dense_factor`), damped factor by factor, and the Kronecker product is formed
    explicitly; ΔW̃ = [ΔW, Δb] is vectorised column by column. The slot weights c_s are recomputed
    from the task records. Differentiable in ``params`` (CPU tensors) by autograd.
    """
    total = torch.zeros(())
    delta = float(prior.config.damping)
    for slot, c in zip(prior.slots, _slot_weights_by_hand(prior)):
        for block in slot.curvature.kfac.values():
            A, G = _dense_factor(block.A), _dense_factor(block.G)
            if delta > 0:
                A, G = _factored_damping(A, G, delta)
            dw = params[block.weight] - slot.anchor[block.weight]
            db = params[block.bias] - slot.anchor[block.bias] if block.bias else None
            v = column_major(dw, db)
            total = total + c * (v @ torch.kron(A, G) @ v)
        for name, d in slot.curvature.diag.items():
            total = total + c * ((d + delta) * (params[name] - slot.anchor[name]) ** 2).sum()
    return 0.5 * lam * total
