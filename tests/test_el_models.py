"""Entity-linking models, their predictive distributions, saving, collation and evaluation metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import tiny_bert_config
from torch import nn
from transformers import AutoModel

from hf_kfac import Prior, estimate_fisher
from hf_kfac.el import ELTask
from hf_kfac.el.collate import ELCollator, classifier_dataset, classifier_examples, pair_examples
from hf_kfac.el.evaluation import (
    bootstrap_sequence_metrics,
    evaluate_biencoder,
    evaluate_classifier,
    flags_from_str,
    flags_to_str,
    forgetting,
    sequence_metrics,
)
from hf_kfac.el.models import (
    ELBiEncoder,
    ELClassifier,
    biencoder_predictive_fn,
    classifier_predictive_fn,
    load_el_model,
    mean_pool,
    predictive_fn_for,
)


def _enc_config():
    return tiny_bert_config(vocab_size=40, hidden_size=16, intermediate_size=24, num_attention_heads=2)


def _classifier(seed: int = 0) -> ELClassifier:
    torch.manual_seed(seed)
    m = ELClassifier.from_encoder_config(_enc_config())
    m.add_task_head("a", ["a1", "a2", "a3"])
    m.add_task_head("b", ["b1", "b2", "b3", "b4", "b5"])
    return m


def _batch(n: int = 6, t: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, t), generator=g)
    am = torch.ones_like(ids)
    am[::2, t - 3:] = 0
    ids[am == 0] = 0
    return {"input_ids": ids, "attention_mask": am}


# ---------------------------------------------------------------------------- classifier
def test_classifier_forward_shapes_and_loss() -> None:
    m = _classifier().eval()
    b = _batch()
    labels = torch.tensor([0, 4, 2, 1, 3, 0])
    out = m(**b, task_id=torch.full((6,), 1), labels=labels)
    assert out.logits.shape == (6, 5)
    assert out.embeddings.shape == (6, 16)
    pooled = mean_pool(m.encoder(**b).last_hidden_state, b["attention_mask"])
    torch.testing.assert_close(out.logits, m.heads["b"](pooled))
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, labels))
    # the active task (last head added) is the default; `task=` picks a head by name
    torch.testing.assert_close(m(**b).logits, out.logits)
    assert m(**b, task="a").logits.shape == (6, 3)
    # a mixed batch: each row uses its own head, padded up to the widest head
    tid = torch.tensor([0, 1, 0, 1, 1, 0])
    mixed = m(**b, task_id=tid, labels=torch.tensor([2, 4, 0, 1, 3, 1]))
    assert mixed.logits.shape == (6, 5)
    za = m(**b, task="a").logits
    torch.testing.assert_close(mixed.logits[tid == 0, :3], za[tid == 0])
    assert (mixed.logits[tid == 0, 3:] <= -1e3).all()
    torch.testing.assert_close(mixed.logits[tid == 1], out.logits[tid == 1])
    manual = torch.stack([nn.functional.cross_entropy(za[i:i + 1] if tid[i] == 0 else out.logits[i:i + 1],
                                                      torch.tensor([y])) for i, y in enumerate([2, 4, 0, 1, 3, 1])])
    torch.testing.assert_close(mixed.loss, manual.mean())


def test_classifier_head_validation() -> None:
    m = _classifier()
    with pytest.raises(ValueError, match="already has a head"):
        m.add_task_head("a", ["x"])
    with pytest.raises(ValueError, match="no dots"):
        m.add_task_head("x.y", ["x"])
    with pytest.raises(ValueError, match="unique"):
        m.add_task_head("c", ["x", "x"])
    w = torch.randn(2, 16)
    m.add_task_head("c", ["c1", "c2"], weight=w)
    torch.testing.assert_close(m.heads["c"].weight.data, w)
    assert m.task_names == ["a", "b", "c"] and m.active_task == "c"
    assert m.concept_ids("b") == ["b1", "b2", "b3", "b4", "b5"]


def test_classifier_predictive_fn_is_softmax_over_the_batch_head() -> None:
    m = _classifier().eval()
    b = {**_batch(), "task_id": torch.zeros(6, dtype=torch.long), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    out = classifier_predictive_fn(m, b)
    assert out.logits.shape == (6, 3)
    torch.testing.assert_close(out.logits, m(**_batch(), task="a").logits)
    torch.testing.assert_close(out.labels, b["labels"])
    assert str(out.likelihood) == "categorical"
    assert predictive_fn_for(m) is classifier_predictive_fn


def _classifier_fisher_batches() -> list[dict[str, torch.Tensor]]:
    """Ragged mentions: a batch of three task-a examples (head a, 3 classes), one of a single task-b example."""
    col = ELCollator(0)

    def feat(i: int, task: int, label: int) -> dict:
        n = 2 + i % 4
        return {"input_ids": [3 + (7 * i + 5 * j) % 35 for j in range(n)], "attention_mask": [1] * n,
                "task_id": task, "labels": label}

    return [col([feat(i, 0, i % 3) for i in range(3)]), col([feat(3, 1, 4)])]


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_classifier_fisher_matches_brute_force_per_example_gradients(fisher_type: str) -> None:
    """The classifier's diagonal Fisher equals oracles.brute_force_diag (one autograd call per example and
    class) for every trainable parameter. K-FAC: head b sees one example, so its block A ⊗ G is the exact
    dense Fisher block (brute force); head a sees three, so G (= the bias block of A ⊗ G, as A's bias entry
    is 1) equals the brute-force bias block, and A the mean of [pooled, 1][pooled, 1]ᵀ over its rows. The
    pooler, unused by mean pooling, is frozen and not covered."""
    from oracles import brute_force_dense_block, brute_force_diag

    m = _classifier()
    batches = _classifier_fisher_batches()
    diag = estimate_fisher(m, batches, shape="diag", fisher_type=fisher_type, progress=False,
                           predictive_fn=classifier_predictive_fn)
    ref = brute_force_diag(m, batches, fisher_type)
    assert diag.n_examples == 4 and set(diag.diag) == set(ref)
    assert "heads.a.weight" in ref and not any("pooler" in n for n in ref)
    scale = max(float(v.abs().max()) for v in ref.values())
    for name, want in ref.items():
        torch.testing.assert_close(diag.diag[name], want, rtol=1e-4, atol=1e-7 * scale, msg=name)

    kfac = estimate_fisher(m, batches, shape="kfac", fisher_type=fisher_type, progress=False,
                           predictive_fn=classifier_predictive_fn)
    assert not any("pooler" in n for n in kfac.param_names())
    dense_b = brute_force_dense_block(m, batches, fisher_type, "heads.b.weight", "heads.b.bias")
    torch.testing.assert_close(kfac.kfac["heads.b"].dense(), dense_b, rtol=1e-4, atol=1e-7 * float(dense_b.abs().max()))
    dense_a = brute_force_dense_block(m, batches, fisher_type, "heads.a.weight", "heads.a.bias")
    torch.testing.assert_close(kfac.kfac["heads.a"].G, dense_a[-3:, -3:], rtol=1e-4, atol=1e-7 * float(dense_a.abs().max()))
    with torch.no_grad():
        pooled = mean_pool(m.encoder(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
                           .last_hidden_state, batches[0]["attention_mask"])
    a_bar = torch.cat([pooled, torch.ones(3, 1)], dim=1)
    torch.testing.assert_close(kfac.kfac["heads.a"].A, a_bar.T @ a_bar / 3, rtol=1e-5, atol=1e-6)


def test_classifier_diag_fisher_on_a_batch_mixing_two_heads_matches_brute_force() -> None:
    """With ``task_id`` mixing heads, each head runs on a subset of the rows, so the heads go to the
    exact per-example path; the result is still the brute-force diagonal for every parameter."""
    from oracles import brute_force_diag

    m = _classifier()
    batch = {**_batch(4, 7, 0), "task_id": torch.tensor([0, 1, 0, 1]), "labels": torch.tensor([0, 4, 2, 1])}
    for fisher_type in ("exact", "empirical"):
        diag = estimate_fisher(m, [batch], shape="diag", fisher_type=fisher_type, progress=False,
                               predictive_fn=classifier_predictive_fn)
        ref = brute_force_diag(m, [batch], fisher_type)
        assert set(diag.diag) == set(ref) and {"heads.a.weight", "heads.b.bias"} <= set(ref)
        scale = max(float(v.abs().max()) for v in ref.values())
        for name, want in ref.items():
            torch.testing.assert_close(diag.diag[name], want, rtol=1e-4, atol=1e-7 * scale, msg=f"{fisher_type}: {name}")


# ---------------------------------------------------------------------------- bi-encoder
def _pair_batch() -> dict[str, torch.Tensor]:
    b = _batch(6, 7, 1)
    p = _batch(6, 7, 2)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "pos_input_ids": p["input_ids"],
            "pos_attention_mask": p["attention_mask"], "concept": torch.tensor([7, 7, 8, 9, 10, 11])}


def test_biencoder_forward_is_infonce_over_in_batch_candidates() -> None:
    torch.manual_seed(0)
    m = ELBiEncoder.from_encoder_config(_enc_config(), temperature=0.1).eval()
    b = _pair_batch()
    out = m(**b)
    q = nn.functional.normalize(mean_pool(m.encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state,
                                          b["attention_mask"]), dim=-1)
    c = nn.functional.normalize(mean_pool(m.encoder(input_ids=b["pos_input_ids"], attention_mask=b["pos_attention_mask"]).last_hidden_state,
                                          b["pos_attention_mask"]), dim=-1)
    expected = q @ c.T / 0.1
    expected[0, 1] = expected[1, 0] = -1e4  # same concept, not the labelled positive: masked out
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(expected, torch.arange(6)))
    assert m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).loss is None


def test_biencoder_predictive_fn_grads_only_through_the_mention_path() -> None:
    torch.manual_seed(0)
    m = ELBiEncoder.from_encoder_config(_enc_config()).eval()
    b = _pair_batch()
    out = biencoder_predictive_fn(m, b)
    torch.testing.assert_close(out.logits, m(**b).logits)
    torch.testing.assert_close(out.labels, torch.arange(6))
    assert predictive_fn_for(m) is biencoder_predictive_fn
    # gradient of the predictive logits = gradient with the candidate embeddings held constant
    params = [p for p in m.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(out.logits.logsumexp(-1).sum(), params, allow_unused=True)
    with torch.no_grad():
        c = m.encode(b["pos_input_ids"], b["pos_attention_mask"])
    q = m.encode(b["input_ids"], b["attention_mask"])
    z = m.scores(q, c.detach(), b["concept"], b["concept"])
    g2 = torch.autograd.grad(z.logsumexp(-1).sum(), params, allow_unused=True)
    for a, bb in zip(g1, g2):
        if a is None or bb is None:
            assert a is None and bb is None
        else:
            torch.testing.assert_close(a, bb)


def test_biencoder_diag_fisher_matches_brute_force() -> None:
    """Per-example separability: the estimator's empirical diagonal Fisher equals per-example brute force."""
    torch.manual_seed(0)
    m = ELBiEncoder.from_encoder_config(_enc_config()).eval()
    b = _pair_batch()
    curv = estimate_fisher(m, [b], shape="diag", fisher_type="empirical", progress=False,
                           predictive_fn=biencoder_predictive_fn)
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(6):
        out = biencoder_predictive_fn(m, b)
        loss = nn.functional.cross_entropy(out.logits[i:i + 1], out.labels[i:i + 1])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                acc[n] += g.square()
    for n in ("encoder.encoder.layer.1.output.dense.weight", "encoder.embeddings.LayerNorm.weight",
              "encoder.encoder.layer.0.attention.self.query.bias"):
        torch.testing.assert_close(curv.diag[n], acc[n] / 6, rtol=1e-4, atol=1e-7)
    k = estimate_fisher(m, [b], shape="kfac", progress=False, predictive_fn=biencoder_predictive_fn)
    assert k.n_examples == 6 and len(k.kfac) > 0


# ---------------------------------------------------------------------------- saving
def test_save_load_roundtrip_and_prior_compatibility(tmp_path) -> None:
    m = _classifier().eval()
    b = _batch()
    m.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "heads.safetensors").is_file()
    enc = AutoModel.from_pretrained(tmp_path).eval()
    for k, v in m.encoder.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v)
    back = ELClassifier.from_pretrained(tmp_path).eval()
    assert back.task_names == ["a", "b"] and back.concept_ids("b") == m.concept_ids("b")
    for task in ("a", "b"):
        torch.testing.assert_close(back(**b, task=task).logits, m(**b, task=task).logits)
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in m.named_parameters()]
    assert isinstance(load_el_model(tmp_path), ELClassifier)
    # a prior made on the trained model fits the re-loaded one, and a new head keeps it compatible
    curv = estimate_fisher(m, [{**b, "task_id": torch.ones(6, dtype=torch.long)}], shape="kfac", progress=False,
                           predictive_fn=classifier_predictive_fn)
    prior = Prior(shape="kfac")
    prior.add_task(m, curv, "b")
    prior.save_pretrained(tmp_path / "fisher")
    Prior.from_pretrained(tmp_path, model=back)
    back.add_task_head("c", ["c1"])
    prior.check_compatible(back)
    assert float(prior.penalty(back, 1.0).detach()) == 0.0


def test_a_second_save_replaces_heads_and_spec_whole_and_a_failed_one_keeps_them(tmp_path, monkeypatch) -> None:
    """heads.safetensors and el_model.json are written to a temporary file and renamed: a hard link to the
    first save's files still reads the first save (an in-place write would change it), and a write that
    fails midway leaves the previous file readable and no temporary file behind."""
    import json
    import os

    from safetensors.torch import load_file

    import hf_kfac.serialization as serialization

    m = _classifier()
    m.save_pretrained(tmp_path)
    first_heads = {k: v.clone() for k, v in load_file(str(tmp_path / "heads.safetensors")).items()}
    first_spec = json.loads((tmp_path / "el_model.json").read_text())
    os.link(tmp_path / "heads.safetensors", tmp_path / "old-heads")
    os.link(tmp_path / "el_model.json", tmp_path / "old-spec")
    m.add_task_head("c", ["c1", "c2"])
    m.save_pretrained(tmp_path)
    assert load_file(str(tmp_path / "old-heads")).keys() == first_heads.keys()
    assert json.loads((tmp_path / "old-spec").read_text()) == first_spec
    second = load_file(str(tmp_path / "heads.safetensors"))
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("heads.safetensors") == mode("config.json")  # an ordinary file (0o666 & ~umask), as config.json
    assert "heads.c.weight" in second and [h["task"] for h in json.loads((tmp_path / "el_model.json").read_text())["heads"]] == ["a", "b", "c"]

    def disk_full(tensors, filename, metadata=None):  # the write starts, then the disk is full
        with open(filename, "wb") as f:
            f.write(b"\0" * 16)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serialization, "save_file", disk_full)
    m.add_task_head("d", ["d1"])
    with pytest.raises(OSError, match="No space left"):
        m.save_pretrained(tmp_path)
    after = load_file(str(tmp_path / "heads.safetensors"))
    assert after.keys() == second.keys() and all(torch.equal(after[k], second[k]) for k in second)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("stale", ["model.safetensors", "heads.safetensors", "el_model.json"])
def test_a_folder_holding_parts_of_two_saves_is_refused_at_load(tmp_path, stale: str) -> None:
    """A save killed after the encoder, or after the heads, leaves one file from the first save among
    files of the second; el_model.json's SHA-256 of each file makes the load fail instead of mixing them."""
    import shutil

    first, second = tmp_path / "first", tmp_path / "second"
    m = _classifier(seed=0)
    m.save_pretrained(first)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    m.add_task_head("c", ["c1", "c2"])
    m.save_pretrained(second)
    assert ELClassifier.from_pretrained(second).task_names == ["a", "b", "c"]
    shutil.copy2(first / stale, second / stale)
    with pytest.raises(ValueError, match=r"in '.*second' (differs from the one saved with it|is missing) "
                                         r"\(el_model.json records its SHA-256\): the folder holds parts of two saves"):
        ELClassifier.from_pretrained(second)
    (first / "heads.safetensors").unlink()
    with pytest.raises(ValueError, match=r"heads.safetensors in '.*first' is missing"):
        ELClassifier.from_pretrained(first)


def _weight_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file() and p.name.startswith(("model", "pytorch_model"))}


@pytest.mark.parametrize("first_shard,second_shard", [(None, "2KB"), ("2KB", None)],
                         ids=["single-then-sharded", "sharded-then-single"])
def test_a_resave_with_other_sharding_loads_the_new_weights_everywhere(tmp_path, first_shard, second_shard) -> None:
    """transformers leaves a stale model.safetensors (which it loads before a new index) or a stale index
    (naming deleted shards) when a folder is re-saved with other sharding: the new save removes them, so
    plain AutoModel and load_el_model both read the new weights."""
    m = _classifier().eval()
    kw = lambda size: {} if size is None else {"max_shard_size": size}  # noqa: E731
    m.save_pretrained(tmp_path, **kw(first_shard))
    assert ("model.safetensors.index.json" in _weight_files(tmp_path)) == (first_shard is not None)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1)
    m.save_pretrained(tmp_path, **kw(second_shard))
    files = _weight_files(tmp_path)
    if second_shard is None:
        assert files == {"model.safetensors"}
    else:
        assert "model.safetensors" not in files and "model.safetensors.index.json" in files and len(files) > 2
    assert not [p.name for p in tmp_path.iterdir() if p.is_dir()]  # the temporary encoder folder is gone
    enc = AutoModel.from_pretrained(tmp_path)
    for k, v in m.encoder.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v, rtol=0, atol=0)
    back = load_el_model(tmp_path)
    want = m.state_dict()
    assert back.state_dict().keys() == want.keys()
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)


def test_a_stray_single_weight_file_beside_a_sharded_save_is_refused(tmp_path) -> None:
    """AutoModel.from_pretrained takes model.safetensors before model.safetensors.index.json: a single file
    that appears beside a recorded sharded save would be loaded in place of it, so the load is refused."""
    import shutil

    m = _classifier(seed=0)
    m.save_pretrained(tmp_path / "single")
    m.save_pretrained(tmp_path / "sharded", max_shard_size="2KB")
    load_el_model(tmp_path / "sharded")
    shutil.copy2(tmp_path / "single" / "model.safetensors", tmp_path / "sharded" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors in '.*sharded' is not among the files el_model.json "
                                         r"was saved with, yet AutoModel.from_pretrained would load it"):
        load_el_model(tmp_path / "sharded")


def test_loading_from_the_hub_fetches_the_root_model_files_only(hub_server, tmp_path) -> None:
    """Whatever the prior's subfolder is called (prior_subfolder), neither it nor checkpoints are downloaded."""
    import shutil

    from huggingface_hub import HfApi, constants

    m = _classifier().eval()
    folder = tmp_path / "model"
    m.save_pretrained(folder)
    model_files = {p.name for p in folder.iterdir() if p.is_file()}
    curv = estimate_fisher(m, [{**_batch(), "task_id": torch.zeros(6, dtype=torch.long)}], shape="diag", progress=False,
                           predictive_fn=classifier_predictive_fn)
    prior = Prior(shape="diag")
    prior.add_task(m, curv, "a")
    prior.save_pretrained(folder / "laplace")  # a non-default prior_subfolder
    shutil.copytree(folder / "laplace", folder / "checkpoint-3" / "laplace")
    shutil.copy(folder / "heads.safetensors", folder / "checkpoint-3" / "heads.safetensors")
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = api.create_repo("org/el-laplace").repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    back = load_el_model(repo).eval()
    b = _batch()
    for task in ("a", "b"):
        torch.testing.assert_close(back(**b, task=task).logits, m(**b, task=task).logits)
    snapshots = list(Path(constants.HF_HUB_CACHE).glob("models--org--el-laplace/snapshots/*"))
    fetched = {str(p.relative_to(s)) for s in snapshots for p in s.rglob("*") if p.is_file()}
    assert fetched == model_files
    assert Prior.from_pretrained(repo, subfolder="laplace", model=back).num_tasks == 1  # the prior is still there


def test_biencoder_roundtrip(tmp_path) -> None:
    torch.manual_seed(0)
    m = ELBiEncoder.from_encoder_config(_enc_config(), temperature=0.07).eval()
    m.save_pretrained(tmp_path)
    assert not (tmp_path / "heads.safetensors").exists()
    back = load_el_model(tmp_path).eval()
    assert isinstance(back, ELBiEncoder) and back.config.temperature == 0.07
    b = _pair_batch()
    torch.testing.assert_close(back(**b).logits, m(**b).logits)
    with pytest.raises(ValueError, match="bi-encoder"):
        ELClassifier.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- data
def _task() -> ELTask:
    names = {"c1": "heart attack", "c2": "diabetes", "c3": "fever"}
    return ELTask(name="t", concept_names=names,
                  train=[("myocardial infarction", "c1"), ("mi", "c1"), ("sugar disease", "c2")],
                  dev=[("cardiac infarct", "c1")],
                  test=[("heart infarction", "c1"), ("diabetes mellitus", "c2"), ("pyrexia", "c3"), ("high temp", "c3")],
                  dictionary=[("heart attack", "c1"), ("diabetes", "c2"), ("fever", "c3"),
                              ("myocardial infarction", "c1"), ("mi", "c1"), ("sugar disease", "c2")])


def test_datasets_and_collator() -> None:
    task = _task()
    assert classifier_examples(task)[:3] == [("heart attack", 0), ("diabetes", 1), ("fever", 2)]
    pairs = pair_examples(task, seed=0)
    assert all(p != s for s, p, _ in pairs)
    assert all(dict(task.dictionary)[p] == c for _, p, c in pairs)
    assert {s for s, _, _ in pairs} == {"heart attack", "diabetes", "myocardial infarction", "mi", "sugar disease"}

    class Tok:
        pad_token_id = 0

        def __call__(self, texts, truncation=True, max_length=32, padding=False):
            ids = [[1 + (hash(w) % 30) for w in t.split()][:max_length] for t in texts]
            return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}

    ds = classifier_dataset(task, Tok(), task_id=2)
    assert ds["labels"] == [0, 1, 2, 0, 0, 1] and set(ds["task_id"]) == {2}
    batch = ELCollator(0)([ds[i] for i in range(len(ds))])
    assert list(batch)[:2] == ["input_ids", "attention_mask"]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (6, 2)
    assert batch["attention_mask"][1].tolist() == [1, 0] and batch["input_ids"][1, 1] == 0
    pb = ELCollator(0)([{"input_ids": [1], "attention_mask": [1], "pos_input_ids": [2, 3, 4],
                         "pos_attention_mask": [1, 1, 1], "concept": 5}])
    assert pb["input_ids"].shape == pb["pos_input_ids"].shape == (1, 3)


# ---------------------------------------------------------------------------- evaluation
class _StrTok:
    """Tokenizer stub: each string becomes one id, its index in a fixed vocabulary."""

    pad_token_id = 0

    def __init__(self, strings):
        self.ids = {s: i + 1 for i, s in enumerate(strings)}

    def __call__(self, texts, truncation=True, max_length=32, padding=False):
        ids = [[self.ids[t]] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] for _ in ids]}


class _ScoreClassifier(nn.Module):
    formulation = "classifier"

    def __init__(self, table: torch.Tensor, concept_ids):
        super().__init__()
        self.table = nn.Parameter(table)
        self._ids = concept_ids

    def has_head(self, name):
        return name == "t"

    def concept_ids(self, name):
        return self._ids

    def forward(self, input_ids, attention_mask=None, task=None):
        return type("O", (), {"logits": self.table[input_ids[:, 0]]})()


def test_evaluate_classifier_on_a_hand_built_case() -> None:
    task = _task()
    tok = _StrTok([m for m, _ in task.test])
    table = torch.zeros(5, 3)
    table[1] = torch.tensor([3.0, 1.0, 2.0])  # heart infarction -> c1: rank 0
    table[2] = torch.tensor([3.0, 1.0, 2.0])  # diabetes mellitus -> c2: rank 2
    table[3] = torch.tensor([1.0, 1.0, 1.0])  # pyrexia -> c3: all tied, pessimistic rank 2
    table[4] = torch.tensor([0.0, 1.0, 5.0])  # high temp -> c3: rank 0
    res = evaluate_classifier(_ScoreClassifier(table, ["c1", "c2", "c3"]), tok, task, "test", n_boot=200)
    assert res.n == 4 and res.acc1 == 0.5 and res.acc5 == 1.0
    assert res.correct1.tolist() == [True, False, False, True]
    assert res.ci1[0] <= 0.5 <= res.ci1[1]
    assert flags_from_str(flags_to_str(res.correct1)).tolist() == res.correct1.tolist()
    m = _ScoreClassifier(table, ["c1", "c2", "c3"])
    m.has_head = lambda name: False
    assert evaluate_classifier(m, tok, task, "test") is None


class _VecEncoder(nn.Module):
    formulation = "bi-encoder"

    def __init__(self, vecs: torch.Tensor):
        super().__init__()
        self.vecs = nn.Parameter(vecs)
        self.config = type("C", (), {"hidden_size": vecs.shape[1]})()

    def encode(self, input_ids, attention_mask=None):
        return nn.functional.normalize(self.vecs[input_ids[:, 0]], dim=-1)


def test_evaluate_biencoder_takes_the_max_over_a_concepts_strings() -> None:
    task = _task()
    strings = [s for s, _ in task.dictionary] + [m for m, _ in task.test]
    tok = _StrTok(strings)
    v = torch.zeros(len(strings) + 1, 3)
    e = torch.eye(3)
    for s, vec in {"heart attack": e[0], "diabetes": e[1], "fever": e[2], "myocardial infarction": e[0] + e[1],
                   "mi": e[2] * 0 + e[1] * 0.1 + e[0] * 0.05, "sugar disease": e[1] + e[2]}.items():
        v[tok.ids[s]] = vec
    v[tok.ids["heart infarction"]] = e[0] + 0.9 * e[1]  # closest: "myocardial infarction" (c1)
    v[tok.ids["diabetes mellitus"]] = e[1] + 0.8 * e[2]  # closest: "sugar disease" (c2)
    v[tok.ids["pyrexia"]] = e[1] + 0.1 * e[2]  # closest: "diabetes" (c2), c3 second -> wrong at 1
    v[tok.ids["high temp"]] = e[2]  # "fever" (c3)
    res = evaluate_biencoder(_VecEncoder(v), tok, task, "test", n_boot=200)
    assert res.correct1.tolist() == [True, True, False, True]
    assert res.acc1 == 0.75 and res.acc5 == 1.0


def test_a_concept_missing_from_the_task_is_named_not_a_bare_key_error() -> None:
    """A hand-built task whose gold or dictionary concept is not in concept_names: a ValueError names the
    task, the split and the concept (the classifier path already did)."""
    task = _task()
    bad_gold = ELTask("t", task.concept_names, task.train, task.dev, [("heart infarction", "C1")], task.dictionary)
    tok = _StrTok([s for s, _ in task.dictionary] + ["heart infarction"])
    enc = _VecEncoder(torch.randn(len(tok.ids) + 1, 3))
    with pytest.raises(ValueError, match=r"task 't': 1 test split pair\(s\) name a concept that is not among the "
                                         r"task's 3 concepts .*'heart infarction' -> 'C1'.*concept_names"):
        evaluate_biencoder(enc, tok, bad_gold, "test", n_boot=10)
    bad_dict = ELTask("t", {"c1": "heart attack"}, [], [], [("heart infarction", "c1")],
                      [("heart attack", "c1"), ("diabetes", "c2")])
    with pytest.raises(ValueError, match=r"task 't': 1 dictionary pair\(s\) .*'diabetes' -> 'c2'"):
        evaluate_biencoder(enc, tok, bad_dict, "test", n_boot=10)
    with pytest.raises(ValueError, match=r"task 't': 1 dictionary pair\(s\) .*'diabetes' -> 'c2'"):
        classifier_examples(bad_dict)


# ---------------------------------------------------------------------------- sequence metrics
def test_forgetting_and_reduction_on_a_hand_built_R() -> None:
    R_ft = [[0.8, None, None], [0.5, 0.9, None], [0.4, 0.6, 0.7]]
    per, f = forgetting(R_ft)
    assert per == pytest.approx([0.4, 0.3]) and f == pytest.approx(0.35)
    R_k = [[0.8, None, None], [0.75, 0.85, None], [0.7, 0.8, 0.65]]
    m = sequence_metrics(R_k, baseline_R=R_ft)
    assert m["forgetting"] == pytest.approx(0.075)
    assert m["reduction"] == pytest.approx(1 - 0.075 / 0.35)
    assert m["final_avg_acc"] == pytest.approx((0.7 + 0.8 + 0.65) / 3)
    assert m["last_task_acc"] == pytest.approx(0.65)
    # max over the rows after learning (task 0 peaked after task 1 here), and an initial row
    per, _ = forgetting([[0.5, 0.2], [0.6, 0.9], [0.55, 0.7]], start_rows=[0, 1])
    assert per == pytest.approx([0.05, 0.2])
    assert math.isnan(forgetting([[0.5]])[1])


def test_bootstrap_sequence_metrics_are_paired() -> None:
    rng = np.random.default_rng(0)
    n = 200
    base = [[rng.random(n) < 0.8, None], [rng.random(n) < 0.5, rng.random(n) < 0.9]]
    same = bootstrap_sequence_metrics(base, base, n_boot=300)
    assert same["reduction"] == 0.0 and same["reduction_ci"] == [0.0, 0.0]
    f = float(base[0][0].mean() - base[1][0].mean())
    assert same["forgetting"] == pytest.approx(f)
    assert same["forgetting_ci"][0] < f < same["forgetting_ci"][1]
    better = [[base[0][0], None], [base[0][0] & (rng.random(n) < 0.95), base[1][1]]]
    out = bootstrap_sequence_metrics(better, base, n_boot=300)
    assert 0 < out["reduction_ci"][0] <= out["reduction"] <= out["reduction_ci"][1] <= 1
    assert out["final_avg_acc_ci"][0] <= out["final_avg_acc"] <= out["final_avg_acc_ci"][1]
    with pytest.raises(ValueError, match="paired"):
        bootstrap_sequence_metrics([[base[0][0][:10]]], [[base[0][0]]], n_boot=10)


def _one_forgetting_task(n: int, forgotten: int) -> tuple[list, list]:
    """Two tasks: fine-tuning forgets ``forgotten`` of task 0's n items (all right before), the method none."""
    before = np.ones(n, dtype=bool)
    after = before.copy()
    after[:forgotten] = False
    last = np.ones(n, dtype=bool)
    return [[before, None], [after, last]], [[before, None], [before.copy(), last]]


def test_reduction_ci_is_withheld_when_finetune_forgets_nothing_in_too_many_draws() -> None:
    """Fine-tuning forgets one item in 100: a draw misses it (no forgetting, no reduction) with probability
    (1 - 1/100)^100 = 36.6%, far above the 2.5% a 95% interval may leave out: no CI, with the reason."""
    n, B = 100, 2000
    base, meth = _one_forgetting_task(n, forgotten=1)
    out = bootstrap_sequence_metrics(meth, base, n_boot=B, seed=0)
    assert out["reduction"] == pytest.approx(1.0)  # the point estimate is defined: 1 - 0 / 0.01
    assert out["reduction_ci"] is None
    assert out["reduction_ci_dropped"] == pytest.approx((1 - 1 / n) ** n, abs=0.04)  # binomial sd ≈ 0.011
    assert "forgets nothing" in out["reduction_ci_reason"] and "2.5%" in out["reduction_ci_reason"]


def test_reduction_ci_is_kept_and_its_dropped_draws_counted_when_they_are_few() -> None:
    """Fine-tuning forgets 4 items in 100: (1 - 4/100)^100 = 1.7% of draws miss all four (< 2.5%); the CI is
    kept, over the other draws, and the fraction left out is recorded."""
    n, B = 100, 4000
    base, meth = _one_forgetting_task(n, forgotten=4)
    out = bootstrap_sequence_metrics(meth, base, n_boot=B, seed=0)
    assert out["reduction_ci_dropped"] == pytest.approx((1 - 4 / n) ** n, abs=0.006)  # binomial sd ≈ 0.002
    assert out["reduction_ci"] == [1.0, 1.0] and "reduction_ci_reason" not in out  # the method never forgets
    many, meth_many = _one_forgetting_task(n, forgotten=40)
    full = bootstrap_sequence_metrics(meth_many, many, n_boot=500, seed=0)
    assert full["reduction_ci_dropped"] == 0.0 and full["reduction_ci"] == [1.0, 1.0]


def test_a_save_removes_a_stale_temporary_encoder_folder_but_not_one_in_progress(tmp_path: Path) -> None:
    """A killed save leaves its temporary encoder folder; another process's save in progress has a fresh one,
    which must survive (two processes or sessions saving into one folder, as a split λ grid's shared stage)."""
    import os
    import time

    stale, live = tmp_path / ".hf_kfac-encoder-killed", tmp_path / ".hf_kfac-encoder-live"
    for d in (stale, live):
        d.mkdir()
        (d / "config.json").write_text("{}", encoding="utf-8")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    _classifier().save_pretrained(tmp_path)
    assert not stale.exists() and (live / "config.json").is_file()
    assert ELClassifier.from_pretrained(tmp_path).task_names == _classifier().task_names
