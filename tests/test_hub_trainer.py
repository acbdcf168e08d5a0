"""The Trainer pushes model + prior + card to a Hub, and another run continues from it.

Everything goes through the real huggingface_hub client and transformers' own push code,
against the local Hub-protocol server of ``tests/hub_server.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from trainer_fixtures import make_dataset, make_model, one_thread  # noqa: E402

from hf_kfac import ContinualConfig, ContinualTrainer, Prior, PriorFileError  # noqa: E402

_one_thread = pytest.fixture(autouse=True)(one_thread)
SECRET = "hf_TestSecretToken0123456789"


@pytest.fixture
def hub(hub_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    import transformers.utils.hub as hf_hub_utils

    monkeypatch.setattr(hf_hub_utils, "_hf_api", None)  # the Trainer's shared client, bound to the test server
    return hub_server


def _args(out: Path, repo: str, **kw: Any) -> ContinualConfig:
    base = dict(
        output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True, per_device_train_batch_size=4,
        max_steps=2, save_strategy="no", learning_rate=1e-2, seed=0, penalty="kfac", penalty_lambda=0.5,
        fisher_type="empirical", push_to_hub=True, hub_model_id=repo, hub_token=SECRET,
    )
    base.update(kw)
    return ContinualConfig(**base)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_push_then_continue_from_the_repo(hub: Any, tmp_path: Path) -> None:
    repo, base = "test-user/el-disease", "test-user/tiny-encoder"
    make_model("seq").push_to_hub(base, token=SECRET)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    trainer = ContinualTrainer(model=model, args=_args(tmp_path / "a", repo), train_dataset=make_dataset("seq", 8))
    trainer.train()
    trainer.consolidate(task_name="diseases", metadata={"accuracy": 0.8})
    trainer.push_to_hub()
    files = set(hub.list_files(repo))
    assert {"config.json", "model.safetensors", "README.md", "fisher/prior_config.json", "fisher/prior.safetensors"} <= files
    card = ModelCard(hub.read_file(repo, "README.md").decode())
    assert card.data.library_name == "hf_kfac" and "diseases" in card.text and card.data.base_model == base

    # months later, another team: the model and the prior come from the Hub, the old data does not
    model_b = AutoModelForSequenceClassification.from_pretrained(repo)
    args_b = _args(tmp_path / "b", repo)
    trainer_b = ContinualTrainer(model=model_b, args=args_b, train_dataset=make_dataset("seq", 8, seed=7), prior=repo)
    assert [t.name for t in trainer_b.prior.tasks] == ["diseases"]
    assert float(trainer_b.penalty_value().detach()) == 0.0  # the pulled model sits at the pulled anchor
    trainer_b.train()
    assert float(trainer_b.penalty_value().detach()) > 0.0
    trainer_b.consolidate(task_name="drugs")
    trainer_b.push_to_hub()
    pushed = Prior.from_pretrained(repo)
    assert [t.name for t in pushed.tasks] == ["diseases", "drugs"]
    text = hub.read_file(repo, "README.md").decode()
    assert "| 1 | diseases |" in text and "| 2 | drugs |" in text
    # the update was loaded from `repo` itself: the card still names the model the sequence started from
    assert ModelCard(text).data.base_model == base


def test_failed_push_keeps_local_files_and_a_retry_succeeds(hub: Any, tmp_path: Path) -> None:
    repo = "test-user/flaky-push"
    trainer = ContinualTrainer(model=make_model("seq"), args=_args(tmp_path / "out", repo), train_dataset=make_dataset("seq", 8))
    trainer.train()
    trainer.consolidate(task_name="A")  # writes out/fisher; nothing pushed yet
    before = _digest(tmp_path / "out" / "fisher")
    hub.fail_next_commits = 1
    with pytest.raises(HfHubHTTPError, match="Injected commit failure") as failed:
        trainer.push_to_hub()
    assert failed.value.response.status_code == 500
    assert _digest(tmp_path / "out" / "fisher") == before
    assert "fisher/prior_config.json" not in hub.list_files(repo)
    Prior.from_pretrained(tmp_path / "out")  # still valid locally
    trainer.push_to_hub()
    assert Prior.from_pretrained(repo).num_tasks == 1


def test_the_token_never_appears_in_logs_cards_or_errors(hub: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = "test-user/secret"
    with caplog.at_level(logging.DEBUG):
        trainer = ContinualTrainer(model=make_model("seq"), args=_args(tmp_path / "out", repo), train_dataset=make_dataset("seq", 8))
        trainer.train()
        trainer.consolidate(task_name="A")
        hub.fail_next_commits = 1
        with pytest.raises(HfHubHTTPError) as failed:
            trainer.push_to_hub()
        assert failed.value.response.status_code == 500
        trainer.push_to_hub()
        with pytest.raises(PriorFileError) as missing:
            Prior.from_pretrained("test-user/does-not-exist", token=SECRET)
    assert SECRET not in caplog.text
    assert SECRET not in str(missing.value) and SECRET not in repr(failed.value)
    for name in hub.list_files(repo):
        if name.endswith((".md", ".json")):
            assert SECRET not in hub.read_file(repo, name).decode(), name
    assert SECRET not in (tmp_path / "out" / "README.md").read_text()
    assert SECRET not in json.dumps(json.loads((tmp_path / "out" / "fisher" / "prior_config.json").read_text()))
