"""Model cards that tell a model's task history, rendered with huggingface_hub's ModelCard."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .prior import Prior
from .serialization import DEFAULT_PRIOR_SUBFOLDER
from .trainer_config import PENALTY_SHAPES

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "template.md"
_PACKAGED_TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"

_PENALTY_TEXT = {
    "kfac": "Kronecker-factored (K-FAC) Laplace",
    "ewc": "diagonal Fisher (EWC)",
    "l2": "L2-to-anchor",
}

_SHAPE_PENALTY = {str(shape): str(penalty) for penalty, shape in PENALTY_SHAPES.items()}
"""The penalty that uses a prior of each shape (identity -> l2, diag -> ewc, kfac -> kfac)."""


def _template() -> Path:
    for path in (TEMPLATE_PATH, _PACKAGED_TEMPLATE):
        if path.is_file():
            return path
    raise FileNotFoundError(f"the model card template is missing (looked in {TEMPLATE_PATH}).")


def accuracy_markdown(task_names: Sequence[str], matrix: Sequence[Sequence[float | None]]) -> str:
    """Markdown table of R[i][j] (accuracy on task j after training task i)."""
    head = "| after \\ on | " + " | ".join(task_names) + " |"
    sep = "|---|" + "---:|" * len(task_names)
    rows = [
        f"| {task_names[i] if i < len(task_names) else i} | "
        + " | ".join("–" if v is None else f"{v:.3f}" for v in row)
        + " |"
        for i, row in enumerate(matrix)
    ]
    return "\n".join([head, sep, *rows])


def forgetting_markdown(task_names: Sequence[str], matrix: Sequence[Sequence[float | None]]) -> str:
    """Per-task forgetting max_{i<last} R[i][j] − R[last][j], for all but the last task."""
    if len(matrix) < 2:
        return ""
    last = matrix[-1]
    cells = []
    for j in range(min(len(task_names), len(last)) - 1):
        earlier = [row[j] for row in matrix[:-1] if j < len(row) and row[j] is not None]
        if earlier and last[j] is not None:
            cells.append(f"| {task_names[j]} | {max(earlier) - last[j]:+.3f} |")
    if not cells:
        return ""
    return "\n".join(["| task | forgetting |", "|---|---:|", *cells])


def accuracy_from_history(prior: Prior) -> list[list[float | None]] | None:
    """R[i][j] from each task's ``metadata["accuracy"]`` ({task name: accuracy after task i})."""
    rows = []
    names = [t.name for t in prior.tasks]
    for t in prior.tasks:
        acc = (t.metadata or {}).get("accuracy")
        if not isinstance(acc, dict):
            return None
        rows.append([acc.get(n) if isinstance(acc.get(n), (int, float)) else None for n in names])
    return rows or None


def loading_code(model_class: str | None = None, model_module: str | None = None,
                 adapter_base: tuple[str, str, str | None] | None = None) -> tuple[str, str]:
    """The import line and the load expression (with ``{repo}`` left to fill) for the card's snippet.

    A transformers class loads with ``<Class>.from_pretrained``; an hf_kfac entity-linking model
    with ``hf_kfac.el.load_el_model``; a PEFT model (``adapter_base`` = the base model's class,
    module and Hub id) with ``PeftModel.from_pretrained(base, repo, is_trainable=True)``, since
    the adapter loads frozen otherwise; anything else names the class the model was trained with.
    """
    if model_module and model_module.split(".")[0] == "peft":
        cls, module, name = adapter_base or ("AutoModel", "transformers", None)
        source = "transformers" if module.split(".")[0] == "transformers" else module
        base = json.dumps(name) if name else '"<base model>"'
        return (f"from peft import PeftModel\nfrom {source} import {cls}",
                f"PeftModel.from_pretrained({cls}.from_pretrained({base}), {{repo}}, is_trainable=True)")
    if model_module and model_module.startswith("hf_kfac.el"):
        return "from hf_kfac.el import load_el_model", "load_el_model({repo})"
    if model_class and model_module and model_module.split(".")[0] == "transformers":
        return f"from transformers import {model_class}", f"{model_class}.from_pretrained({{repo}})"
    if model_class:
        return (f"from {model_module} import {model_class}" if model_module else f"# import {model_class}",
                f"{model_class}.from_pretrained({{repo}})  # the class the model was trained with")
    return ("from transformers import AutoModel",
            "AutoModel.from_pretrained({repo})  # use the model's own class when it has a head")


def render_model_card(
    prior: Prior,
    *,
    repo_id: str = "<your-org>/<this-model>",
    model_name: str | None = None,
    model_class: str | None = None,
    model_module: str | None = None,
    adapter_base: tuple[str, str, str | None] | None = None,
    base_model: str | None = None,
    penalty: str | None = None,
    prior_subfolder: str = DEFAULT_PRIOR_SUBFOLDER,
    accuracy: Sequence[Sequence[float | None]] | None = None,
    task_names: Sequence[str] | None = None,
    tags: Sequence[str] = (),
    language: str | list[str] | None = "en",
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> ModelCard:
    """Render ``model_cards/template.md`` for a model and its prior.

    The task table comes from the prior's history (each task's metadata may hold
    ``penalty`` and ``lambda``); ``accuracy`` is the matrix R[i][j] (accuracy on task j after
    task i), taken from the tasks' ``metadata["accuracy"]`` dicts when not given.
    ``model_class`` / ``model_module`` (the trained model's class and module) choose how the
    "Continue training" snippet loads the model (:func:`loading_code`; ``adapter_base`` for a PEFT model). The penalty the card names
    (and its snippet uses) is ``penalty``, except ``"none"`` or no penalty: then the one that uses
    the prior's shape (``identity`` -> ``l2``, ``diag`` -> ``ewc``, ``kfac`` -> ``kfac``), so that the
    snippet runs; a run with ``penalty="none"`` is said to have carried the prior along unapplied.
    The snippet passes ``prior_subfolder`` when it is not ``fisher``.
    """
    unapplied = penalty is not None and str(penalty) == "none"
    given = None if penalty is None or unapplied else str(penalty)
    tasks = []
    for t in prior.tasks:
        md = t.metadata or {}
        fisher = t.fisher or {}
        tasks.append(
            {
                "name": t.name,
                "n_examples": t.n_examples,
                "date": t.date[:10],
                "penalty": md.get("penalty", given or "–"),
                "lam": md.get("lambda", "–"),
                "fisher_type": fisher.get("fisher_type", "–"),
                "shape": fisher.get("shape", "–"),
                "kfac_approx": fisher.get("kfac_approx", "–") if fisher.get("shape") == "kfac" else "–",
            }
        )
    names = list(task_names or [t.name for t in prior.tasks])
    if accuracy is None:
        accuracy = accuracy_from_history(prior)
    pen = given or str(prior.config.shape)
    pen = _SHAPE_PENALTY.get(pen, pen)
    card_data = ModelCardData(
        library_name="hf_kfac",
        base_model=base_model,
        tags=sorted({"hf_kfac", "continual-learning", pen, *tags} - {"–"}),
        language=language,
        license=license,
        datasets=list(datasets) if datasets else None,
        **(extra_metadata or {}),
    )
    last_lambda = next((t["lam"] for t in reversed(tasks) if t["lam"] != "–"), 1.0)
    prior_info = dict(prior.config.to_dict(), penalty=pen)
    import_line, load_expr = loading_code(model_class, model_module, adapter_base)
    return ModelCard.from_template(
        card_data,
        template_path=str(_template()),
        model_name=model_name or repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base_model,
        penalty_description=_PENALTY_TEXT.get(pen, pen),
        prior_subfolder=prior_subfolder,
        prior_subfolder_arg=(
            "" if prior_subfolder == DEFAULT_PRIOR_SUBFOLDER else f", prior_subfolder={json.dumps(prior_subfolder)}"
        ),
        unapplied=unapplied,
        tasks=tasks,
        prior=prior_info,
        last_lambda=last_lambda,
        model_import=import_line,
        model_load=load_expr.format(repo=f'"{repo_id}"'),
        accuracy_table=accuracy_markdown(names, accuracy) if accuracy else "",
        forgetting_table=forgetting_markdown(names, accuracy) if accuracy else "",
    )


def save_model_card(folder: str | os.PathLike, prior: Prior, **kwargs: Any) -> Path:
    """Render the card and write ``README.md`` into ``folder`` (atomically)."""
    from .serialization import write_text_atomic

    card = render_model_card(prior, **kwargs)
    path = Path(folder) / "README.md"
    write_text_atomic(path, str(card))
    return path
