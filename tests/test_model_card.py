"""The model card records the task history and parses back as a valid Hub card."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn

from hf_kfac import Curvature, Prior
from hf_kfac.model_card import render_model_card, save_model_card


def _prior() -> Prior:
    model = nn.Linear(3, 2)
    prior = Prior(shape="diag", accumulation="merge")
    for name, n, lam in [("diseases", 120, 0.5), ("drugs", 80, 0.7)]:
        curv = Curvature(diag={k: torch.ones_like(p) for k, p in model.named_parameters()}, n_examples=n)
        prior.add_task(model, curv, name, metadata={"penalty": "ewc", "lambda": lam})
    return prior


def test_card_tells_the_task_history_and_how_to_continue(tmp_path) -> None:
    prior = _prior()
    card = render_model_card(
        prior,
        repo_id="org/el-demo",
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        accuracy=[[0.8, None], [0.7, 0.6]],
        tags=["entity-linking"],
    )
    text = str(card)
    parsed = ModelCard(text)
    assert parsed.data.library_name == "hf_kfac"
    assert parsed.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert {"hf_kfac", "continual-learning", "ewc", "entity-linking"} <= set(parsed.data.tags)
    assert "| 1 | diseases | 120 |" in text and "| 2 | drugs | 80 |" in text
    assert "| 0.7 |" in text  # λ of the last task
    assert "| diseases | +0.100 |" in text  # forgetting 0.8 - 0.7
    assert 'prior="org/el-demo"' in text and "penalty_lambda=0.7" in text
    path = save_model_card(tmp_path, prior, repo_id="org/el-demo")
    assert ModelCard.load(path).data.library_name == "hf_kfac"


def test_accuracy_matrix_comes_from_the_task_history() -> None:
    model = nn.Linear(3, 2)
    prior = Prior(shape="diag")
    for name, acc in [("A", {"A": 0.9}), ("B", {"A": 0.6, "B": 0.8})]:
        curv = Curvature(diag={k: torch.ones_like(p) for k, p in model.named_parameters()}, n_examples=5)
        prior.add_task(model, curv, name, metadata={"accuracy": acc})
    text = str(render_model_card(prior, repo_id="org/x"))
    assert "| A | 0.900 | – |" in text and "| B | 0.600 | 0.800 |" in text
    assert "| A | +0.300 |" in text


def test_the_cards_loading_snippet_loads_the_trained_model_with_its_head(tmp_path) -> None:
    """The "Continue training" code must bring back the head too: AutoModel would drop it."""
    import re

    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, num_labels=3)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(tmp_path)
    text = str(render_model_card(_prior(), repo_id=str(tmp_path), model_class=type(model).__name__,
                                 model_module=type(model).__module__))
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    lines = code.splitlines()
    loading = "\n".join(lines[: next(i for i, ln in enumerate(lines) if ln.startswith("model = ")) + 1])
    scope: dict = {}
    exec(loading, scope)
    loaded = scope["model"]
    assert type(loaded) is BertForSequenceClassification
    for (name, p), (name2, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name2 and torch.equal(p, q)


def _continue_training_code(text: str) -> str:
    """The card's "Continue training" snippet up to the trainer's construction (no data to train on here)."""
    import re

    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    lines = code.splitlines()
    return "\n".join(lines[: next(i for i, ln in enumerate(lines) if ln.startswith("trainer = ")) + 1])


@pytest.mark.parametrize(
    "shape,penalty,subfolder,named",
    [
        ("kfac", "kfac", "prior", "kfac"),  # a non-default prior_subfolder
        ("kfac", "none", "fisher", "kfac"),  # a plain fine-tuning run that carried the prior along
        ("diag", "none", "laplace/prior", "ewc"),
        ("identity", "none", "fisher", "l2"),
    ],
)
def test_the_continue_training_snippet_runs_and_loads_the_prior(tmp_path, monkeypatch, shape, penalty, subfolder, named) -> None:
    """Following the card literally finds the prior (whatever its subfolder) and builds a trainer that uses it."""
    from oracles import tiny_bert_config
    from transformers import BertForSequenceClassification

    from hf_kfac import estimate_fisher

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    ids = torch.randint(1, 40, (4, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (4,))}
    prior = Prior(shape=shape)
    fisher = None if shape == "identity" else estimate_fisher(
        model, [batch], shape=shape, fisher_type="empirical", progress=False
    )
    prior.add_task(model, fisher, "diseases", n_examples=4)
    folder = tmp_path / "el-model"
    model.save_pretrained(folder)
    prior.save_pretrained(folder / subfolder)
    text = str(render_model_card(prior, repo_id=str(folder), model_class=type(model).__name__,
                                 model_module=type(model).__module__, penalty=penalty, prior_subfolder=subfolder))
    assert "none" not in ModelCard(text).data.tags and "adds a\nno penalty" not in text
    assert ('used `penalty="none"`' in text) == (penalty == "none")  # the unapplied prior is said, not hidden
    monkeypatch.chdir(tmp_path)  # the snippet's output_dir="next-task"
    scope: dict = {"new_task": None}
    exec(_continue_training_code(text), scope)
    trainer = scope["trainer"]
    assert str(trainer.args.penalty) == named and trainer.args.penalty_lambda > 0
    assert trainer.prior.num_tasks == 1 and [t.name for t in trainer.prior.tasks] == ["diseases"]
