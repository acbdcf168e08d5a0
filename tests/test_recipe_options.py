"""The recipe's options and outputs: the Hub token is written to no file, merges refuse runs made on other
data and report the runs' own config, option typos are refused, and bad data fails before any training."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import train as recipe  # noqa: E402

TINY = str(ROOT / "recipes" / "configs" / "tiny.yaml")
# two tasks, one epoch: the cheapest run that has forgetting to measure
SMALL = ["--config", TINY, "--quiet", "--num_threads", "1", "--tasks", "A,B", "--epochs", "1", "--max_eval", "8"]


# ------------------------------------------------------------------ 1. the Hub token
def test_hub_token_is_written_to_no_file_of_the_output_dir(tmp_path: Path) -> None:
    secret = "hf_FAKE_SECRET_token_123"
    out = tmp_path / "o"
    before = os.environ.get("HF_TOKEN")
    recipe.main([*SMALL, "--methods", "kfac", "--save_models", "last", "--hub_token", secret, "--output_dir", str(out)])
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files)  # the trainer's pickled arguments are among them
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaked == []
    assert "hub_token" not in json.loads((out / "results.json").read_text())["config"]
    assert os.environ.get("HF_TOKEN") == before  # set for the run only


# ------------------------------------------------------------------ 2, 4, 5, 14. merging runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {"ft": root / "ft", "both": root / "both", "ft_seed3": root / "ft_seed3"}
    recipe.main([*SMALL, "--methods", "finetune", "--output_dir", str(out["ft"])])
    recipe.main([*SMALL, "--methods", "finetune,kfac", "--save_models", "last", "--output_dir", str(out["both"])])
    recipe.main([*SMALL, "--methods", "finetune", "--subset_seed", "3", "--output_dir", str(out["ft_seed3"])])
    return out


def test_merge_refuses_runs_made_on_other_data_naming_the_option(runs: dict[str, Path], tmp_path: Path) -> None:
    prog = json.loads((runs["ft_seed3"] / "runs" / "finetune" / "progress.json").read_text())
    assert prog["data_options"]["subset_seed"] == 3 and prog["data_fingerprint"]
    with pytest.raises(ValueError, match=r"differ in subset_seed .*cannot be paired"):
        recipe.main(["--quiet", "--merge_runs", str(runs["ft_seed3"] / "runs" / "finetune"),
                     str(runs["both"] / "runs" / "kfac"), "--output_dir", str(tmp_path / "m")])
    assert not (tmp_path / "m" / "results.json").exists()


def test_merge_of_a_method_folder_takes_only_that_method(runs: dict[str, Path], tmp_path: Path) -> None:
    ft, kfac = runs["ft"] / "runs" / "finetune", runs["both"] / "runs" / "kfac"
    res = recipe.main(["--quiet", "--merge_runs", str(ft), str(kfac), "--output_dir", str(tmp_path / "m")])
    assert {m: e["run_dir"] for m, e in res["methods"].items()} == {"finetune": str(ft), "kfac": str(kfac)}
    with pytest.raises(ValueError, match="found twice") as info:  # finetune is in both output dirs
        recipe.main(["--quiet", "--merge_runs", str(runs["ft"]), str(runs["both"]), "--output_dir", str(tmp_path / "x")])
    assert str(runs["ft"] / "runs" / "finetune") in str(info.value)
    assert str(runs["both"] / "runs" / "finetune") in str(info.value)


def test_merged_results_report_the_runs_config_not_the_merge_commands(runs: dict[str, Path], tmp_path: Path) -> None:
    # no --config: the merge command's own defaults are the demo profile's (n_boot 1000, 200 concepts...)
    res = recipe.main(["--quiet", "--merge_runs", str(runs["both"]), "--output_dir", str(tmp_path / "m")])
    prog = json.loads((runs["both"] / "runs" / "kfac" / "progress.json").read_text())
    assert prog["config"]["n_boot"] == 200 and "hub_token" not in prog["config"]
    cfg = json.loads((tmp_path / "m" / "results.json").read_text())["config"]
    for key, want in (("profile", "tiny"), ("n_concepts", 8), ("max_eval", 8), ("epochs", "1"), ("n_boot", 200),
                      ("learning_rate", "1e-3")):
        assert cfg[key] == want, key
    assert res["methods"]["kfac"]["config"]["lambdas"] == prog["config"]["lambdas"]
    # the CIs were drawn with the runs' n_boot: the same as the run's own results.json
    own = json.loads((runs["both"] / "results.json").read_text())["methods"]["kfac"]
    assert res["methods"]["kfac"]["forgetting_ci"] == own["forgetting_ci"]


def test_reduction_is_null_with_a_reason_when_there_is_no_finetune_run(runs: dict[str, Path], tmp_path: Path) -> None:
    res = recipe.main(["--quiet", "--merge_runs", str(runs["both"] / "runs" / "kfac"), "--output_dir", str(tmp_path / "m")])
    entry = json.loads((tmp_path / "m" / "results.json").read_text())["methods"]["kfac"]
    assert entry["reduction"] is None and entry["reduction_ci"] is None
    assert "finetune" in entry["reduction_reason"]
    assert res["methods"]["kfac"]["reduction"] is None


# ------------------------------------------------------------------ 16. the model card's accuracy table
def test_consolidated_tasks_carry_the_accuracy_the_model_card_reads(runs: dict[str, Path]) -> None:
    from hf_kfac import Prior
    from hf_kfac.model_card import accuracy_from_history

    out = runs["both"]
    ckpt = json.loads((out / "runs" / "kfac" / "progress.json").read_text())["checkpoint"]
    prior = Prior.from_pretrained(ckpt)
    assert [t.metadata["accuracy_split"] for t in prior.tasks] == ["test", "test"]
    R = json.loads((out / "results.json").read_text())["methods"]["kfac"]["R"]
    assert accuracy_from_history(prior) == R


# ------------------------------------------------------------------ 3, 11, 12, 15. options
def test_lambda_typo_is_refused_naming_the_valid_methods(tmp_path: Path) -> None:
    for flag in ("--lambdas", "--lambda_grid"):
        with pytest.raises(ValueError, match=rf"{flag}: unknown name 'kfc'.*valid names: l2, ewc, kfac, kfac-compact"):
            recipe.main([*SMALL, "--methods", "kfac", flag, "kfc=1", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "runs").exists()


def test_lambda_for_a_method_not_run_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hf_kfac.recipe"):
        assert recipe.parse_method_values("ewc=10,kfac=3", ["kfac"]) == {"ewc": [10.0], "kfac": [3.0]}
    assert "ewc, which is not among --methods" in caplog.text


def test_natural_yaml_values_parse(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("profile: tiny\nmethods: kfac\nlambdas: 100\nepochs: 2\nlambda_grid: {kfac: [10, 100], ewc: 3}\n"
                   "tune_budget: {epochs: [1, 2], learning_rate: [1.0e-4, 2.0e-4]}\n")
    args = recipe.parse_args(["--config", str(cfg)])
    assert recipe.parse_method_values(args.lambdas, ["kfac"]) == {"kfac": [100.0]}
    assert recipe.parse_method_values(args.lambda_grid, ["kfac"]) == {"kfac": [10.0, 100.0], "ewc": [3.0]}
    assert recipe.per_task(args.epochs, 3, "epochs") == [2.0, 2.0, 2.0]
    budget = recipe.parse_method_values(args.tune_budget, [], "tune_budget", valid=("epochs", "learning_rate"))
    assert budget == {"epochs": [1.0, 2.0], "learning_rate": [1e-4, 2e-4]}


def test_non_numbers_are_errors_naming_the_flag() -> None:
    with pytest.raises(ValueError, match=r"--lambdas: 'abc' is not a number"):
        recipe.parse_method_values("kfac=abc", ["kfac"])
    with pytest.raises(ValueError, match=r"--epochs: 'two' is not a number"):
        recipe.parse_args(["--config", TINY, "--epochs", "two"])
    with pytest.raises(ValueError, match=r"--learning_rate: 'fast' is not a number"):
        recipe.parse_args(["--config", TINY, "--learning_rate", "1e-3,fast,1e-3"])


def test_tune_budget_typo_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--tune_budget: unknown name 'epoch'.*epochs, learning_rate"):
        recipe.main([*SMALL, "--tune_budget", "epoch=1,2", "--output_dir", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()


def test_a_task_named_twice_is_refused() -> None:
    with pytest.raises(ValueError, match=r"names 'diseases' twice \('A' and 'diseases'\)"):
        recipe.parse_args(["--config", TINY, "--tasks", "A,diseases"])


# ------------------------------------------------------------------ 9, 10. evaluated splits
def test_eval_splits_in_another_order_are_the_same_option() -> None:
    fps = []
    for order in ("dev,test", "test,dev", "test,dev,test"):
        args = recipe.parse_args(["--config", TINY, "--eval_splits", order])
        splits = recipe.eval_splits(args, ["kfac"], {})
        assert splits == ["dev", "test"]
        tasks = [SimpleNamespace(name=n) for n in ("diseases", "drugs")]
        fps.append(recipe.MethodRun(args, "kfac", 100.0, tasks, Path("x"), splits, Path("s")).fingerprint())
    assert len(set(fps)) == 1
    with pytest.raises(ValueError, match="unknown split 'val'"):
        recipe.parse_args(["--config", TINY, "--eval_splits", "val"])


def test_a_task_without_dev_items_fails_before_training(tmp_path: Path) -> None:
    # 3 concepts of seed 3: A's sample has test mentions but no dev one (the λ grid evaluates dev)
    with pytest.raises(ValueError, match=r"no dev items with --n_concepts 3 and --subset_seed 3") as info:
        recipe.main([*SMALL, "--tasks", "A,B,C", "--n_concepts", "3", "--subset_seed", "3", "--methods", "kfac",
                     "--lambda_grid", "kfac=10,100", "--output_dir", str(tmp_path / "o")])
    assert "--subset_seed" in str(info.value)
    assert not (tmp_path / "o" / "runs").exists()  # nothing trained


def test_a_run_of_the_older_recipe_with_splits_in_another_order_still_resumes(tmp_path: Path) -> None:
    """Before the splits were put in a fixed order, a run of '--eval_splits test,dev' was fingerprinted in
    that order and recorded no data options: it is still recognised as finished (no training again)."""
    out = tmp_path / "o"
    argv = [*SMALL, "--methods", "finetune", "--eval_splits", "test,dev", "--output_dir", str(out)]
    first = recipe.main(argv)["methods"]["finetune"]
    prog = out / "runs" / "finetune" / "progress.json"
    st = json.loads(prog.read_text())
    args = recipe.parse_args(argv)
    tasks = [SimpleNamespace(name=n) for n in st["tasks"]]
    legacy = recipe.MethodRun(args, "finetune", None, tasks, prog.parent, ["test", "dev"], out / "runs" / "_shared")
    st["fingerprint"] = legacy.fingerprint(["test", "dev"])
    st["rows"] = [{"test": r["test"], "dev": r["dev"]} for r in st["rows"]]
    for key in ("data_options", "data_fingerprint", "config"):
        del st[key]
    st["train_time"] = [123.0, 456.0]  # a marker: training again would replace it
    prog.write_text(json.dumps(st))
    again = recipe.main(argv)["methods"]["finetune"]
    assert again["train_time_s"] == [123.0, 456.0] and again["R"] == first["R"]
    repaired = json.loads(prog.read_text())
    assert list(repaired["rows"][0]) == ["dev", "test"] and repaired["data_options"]["max_eval"] == 8


def test_push_with_hub_token_works_and_uploads_no_token(hub_server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--hub_token (no HF_TOKEN set) still authenticates the trainer's push, and neither the output dir nor
    the pushed repo (training_args.bin included) holds it."""
    import transformers.utils.hub as hf_hub_utils
    from huggingface_hub import HfApi, hf_hub_download

    monkeypatch.setattr(hf_hub_utils, "_hf_api", None)  # the Trainer's shared client, bound to this test's server
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "o"
    recipe.main([*SMALL, "--methods", "kfac", "--push_to_hub", "true", "--hub_model_id", "test-user/el-tok-{method}",
                 "--hub_token", hub_server.token, "--output_dir", str(out)])
    assert "HF_TOKEN" not in os.environ
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    files = api.list_repo_files("test-user/el-tok-kfac")
    assert "training_args.bin" in files and "fisher/prior_config.json" in files
    secret = hub_server.token.encode()
    for name in files:
        local = hf_hub_download("test-user/el-tok-kfac", name, token=hub_server.token, cache_dir=str(tmp_path / "dl"))
        assert secret not in Path(local).read_bytes(), name
    assert [str(p) for p in out.rglob("*") if p.is_file() and secret in p.read_bytes()] == []
    # 16. the pushed card holds the accuracy table, with the run's test accuracies
    card = Path(hf_hub_download("test-user/el-tok-kfac", "README.md", token=hub_server.token,
                                cache_dir=str(tmp_path / "dl2"))).read_text()
    R = json.loads((out / "results.json").read_text())["methods"]["kfac"]["R"]
    assert "| after \\ on | diseases | drugs |" in card
    rows = [line for line in card.splitlines() if line.startswith("| drugs |")]
    assert any(f"{R[1][0]:.3f}" in line and f"{R[1][1]:.3f}" in line for line in rows), (rows, R)


# ------------------------------------------------------------------ --temperature with --prior
@pytest.fixture(scope="module")
def biencoder_prior(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny bi-encoder (no Fisher) with temperature 0.1, not the recipe's default 0.05."""
    import torch
    from transformers import AutoTokenizer

    from hf_kfac.el.models import ELBiEncoder, default_encoder_path

    tok = AutoTokenizer.from_pretrained(default_encoder_path())
    torch.manual_seed(0)
    model = ELBiEncoder.from_encoder_config(recipe.tiny_encoder_config(tok.vocab_size), tokenizer=tok, temperature=0.1)
    folder = tmp_path_factory.mktemp("prior") / "bi"
    model.save_pretrained(folder)
    return folder


def _temperature_run(prior: Path, out: Path, *flags: str) -> tuple[dict, float]:
    """results.json's config and the temperature saved with the run's last model."""
    recipe.main([*SMALL, "--model", "bi-encoder", "--methods", "finetune", "--tasks", "A", "--prior", str(prior),
                 "--save_models", "last", "--output_dir", str(out), *flags])
    ckpt = Path(json.loads((out / "runs" / "finetune" / "progress.json").read_text())["checkpoint"])
    return json.loads((out / "results.json").read_text())["config"], json.loads((ckpt / "el_model.json").read_text())["temperature"]


def test_prior_keeps_its_saved_temperature_and_records_it(biencoder_prior: Path, tmp_path: Path) -> None:
    config, used = _temperature_run(biencoder_prior, tmp_path / "o")
    assert used == 0.1 and config["temperature"] == 0.1  # not the recipe's default 0.05


def test_an_explicit_temperature_overrides_the_priors_and_is_what_is_recorded(
        biencoder_prior: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hf_kfac.recipe"):
        config, used = _temperature_run(biencoder_prior, tmp_path / "o", "--temperature", "0.02")
    assert used == 0.02 and config["temperature"] == 0.02
    assert "--temperature 0.02 overrides the temperature 0.1 saved with --prior" in caplog.text
    st = json.loads((tmp_path / "o" / "runs" / "finetune" / "progress.json").read_text())
    assert st["data_options"]["temperature"] == 0.02


# ------------------------------------------------------------------ fisher_batch_size
def test_biencoder_fisher_batch_defaults_to_the_training_batch_and_an_explicit_one_is_kept() -> None:
    """The bi-encoder's Fisher softmax is over one Fisher batch's candidates: by default as many as training saw."""
    bi = recipe.parse_args(["--config", TINY, "--model", "bi-encoder", "--batch_size", "12"])
    assert bi.fisher_batch_size == 12
    assert recipe.continual_config(bi, "kfac", 1.0, 100, Path("x"), 1.0, 1e-3).fisher_batch_size == 12
    explicit = recipe.parse_args(["--config", TINY, "--model", "bi-encoder", "--batch_size", "12",
                                  "--fisher_batch_size", "5"])
    assert explicit.fisher_batch_size == 5
    clf = recipe.parse_args(["--config", TINY, "--batch_size", "12"])
    assert clf.fisher_batch_size == 32  # the classifier's default is unchanged


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_keep_the_fingerprints_of_runs_made_before_these_defaults(config: Path) -> None:
    """Runs made when --fisher_batch_size defaulted to 32 and --temperature to 0.05 still resume and merge:
    each shipped config resolves to those values (the bi-encoder demo trains with batch size 32)."""
    new = recipe.parse_args(["--config", str(config)])
    old = recipe.parse_args(["--config", str(config), "--fisher_batch_size", "32", "--temperature", "0.05"])
    tasks = [SimpleNamespace(name=n) for n in ("diseases", "drugs", "phenotypes")]
    for method in ("finetune", "kfac"):
        runs = [recipe.MethodRun(a, method, 1.0, tasks, Path("x"), ["test"], Path("s")) for a in (new, old)]
        assert runs[0].fingerprint() == runs[1].fingerprint()
    assert recipe.data_options(new, tasks) == recipe.data_options(old, tasks)
    assert recipe.recorded_config(new) == recipe.recorded_config(old)


# ------------------------------------------------------------------ reduction CI withheld
def _hand_state(method: str, flags: list[list[Any]]) -> dict[str, Any]:
    from hf_kfac.el.evaluation import flags_to_str

    rows = [{"test": [None if f is None else {"acc1": float(f.mean()), "acc1_ci": [0.0, 1.0], "acc5": 1.0,
                                              "acc5_ci": [1.0, 1.0], "n": len(f), "correct1": flags_to_str(f)}
                      for f in row]} for row in flags]
    return {"method": method, "tasks": ["a", "b"], "rows": rows, "row_task": ["a", "b"], "penalty": "kfac",
            "lambda": 1.0, "lambda_abs": [None, None], "train_time": [1.0, 1.0], "consolidation_time": [0.0, 0.0],
            "eval_time": [0.0, 0.0]}


def test_a_withheld_reduction_ci_is_reported_with_its_reason_in_json_and_table() -> None:
    """Fine-tuning forgets 1 of 100 items: about 37% of the bootstrap draws have no fine-tuning forgetting, so
    the reduction has no CI; results.json says why and results.md marks it and prints the reason."""
    import numpy as np

    n = 100
    before, last = np.ones(n, dtype=bool), np.ones(n, dtype=bool)
    forgot = before.copy()
    forgot[0] = False
    ft = _hand_state("finetune", [[before, None], [forgot, last]])
    kf = _hand_state("kfac", [[before, None], [before.copy(), last]])
    methods = {"finetune": recipe.method_entry(ft, "test", ft, 500), "kfac": recipe.method_entry(kf, "test", ft, 500)}
    entry = recipe._clean(methods["kfac"])
    assert entry["reduction"] == 1.0 and entry["reduction_ci"] is None
    assert 0.25 < entry["reduction_ci_dropped"] < 0.5 and "forgets nothing" in entry["reduction_ci_reason"]
    json.dumps(entry)  # strict JSON
    table = recipe.markdown_table({"model": "bi-encoder", "encoder": "tiny", "profile": "tiny", "tasks": ["a", "b"],
                                   "split": "test", "methods": methods})
    assert "| kfac | 1 | 0.0 [0.0, 0.0] | 100.0 (no CI, see notes) |" in table
    assert f"* kfac: reduction without CI: {entry['reduction_ci_reason']}." in table
