"""The sequential entity-linking recipe end to end, on the tiny profile (a tiny random BERT, a few concepts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import train as recipe  # noqa: E402

TINY = str(ROOT / "recipes" / "configs" / "tiny.yaml")


def test_yaml_config_and_cli_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("profile: tiny\nmethods: [finetune, kfac]\nlambdas: {kfac: 30}\nbatch_size: 8\n")
    args = recipe.parse_args(["--config", str(cfg), "--batch_size", "4", "--output_dir", str(tmp_path / "o")])
    assert args.methods == "finetune,kfac" and args.batch_size == 4  # the flag wins over the YAML
    assert args.encoder == "tiny-random" and args.n_concepts == 8  # profile presets fill unset options
    assert recipe.parse_method_values(args.lambdas, ["kfac"]) == {"kfac": [30.0]}
    assert recipe.parse_method_values("ewc=1,10;kfac=3", []) == {"ewc": [1.0, 10.0], "kfac": [3.0]}
    assert recipe.parse_method_values("ewc=100,kfac=10,30", []) == {"ewc": [100.0], "kfac": [10.0, 30.0]}
    assert recipe.parse_method_values("1,10", ["finetune", "ewc", "kfac"]) == {"ewc": [1.0, 10.0], "kfac": [1.0, 10.0]}
    cfg.write_text("profile: tiny\nnot_an_option: 1\n")
    with pytest.raises(ValueError, match="not_an_option"):
        recipe.parse_args(["--config", str(cfg)])
    with pytest.raises(ValueError, match="--lambda_grid"):  # several fixed λ for one method: a grid was meant
        recipe.main(["--config", TINY, "--lambdas", "ewc=1,10", "--output_dir", str(tmp_path / "x"), "--quiet"])
    assert not (tmp_path / "x" / "runs").exists()  # refused before any work
    with pytest.raises(ValueError, match="unknown method"):
        recipe.parse_args(["--config", TINY, "--methods", "finetune,sgd"])


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # argparse %-formats every help string: a bare % crashes --help
        recipe.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("--config", "--methods", "--lambda_grid", "--tune_budget", "--budget_worker", "--merge_runs"):
        assert name in out


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(config: Path) -> None:
    import yaml

    raw = yaml.safe_load(config.read_text())
    args = recipe.parse_args(["--config", str(config)])  # an unknown or misspelt key raises
    assert args.profile == raw["profile"] and args.model == raw["model"]
    assert recipe.parse_method_values(args.lambdas, args.methods.split(",")).keys() <= set(args.methods.split(","))


def test_tiny_recipe_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = recipe.main(["--config", TINY, "--output_dir", str(out), "--quiet", "--save_models", "last"])
    data = json.loads((out / "results.json").read_text())
    assert (out / "accuracy.png").stat().st_size > 1000
    assert "| kfac |" in (out / "results.md").read_text()
    assert data["tasks"] == ["diseases", "drugs", "phenotypes"] and data["profile"] == "tiny"
    assert set(data["methods"]) == {"finetune", "ewc", "kfac"}
    for name, m in data["methods"].items():
        R = m["R"]
        assert len(R) == 3 and all(len(r) == 3 for r in R)
        assert R[0][1] is None and R[0][2] is None and R[1][2] is None  # no head yet for unseen tasks
        assert all(0.0 <= x <= 1.0 for row in R for x in row if x is not None)
        for key in ("forgetting", "final_avg_acc", "last_task_acc", "reduction"):
            assert key in m and key + "_ci" in m
        assert len(m["train_time_s"]) == 3
    assert data["methods"]["finetune"]["reduction"] == 0.0
    assert data["methods"]["kfac"]["lambda"] == 100
    assert data["methods"]["finetune"]["R"][0] == data["methods"]["kfac"]["R"][0]  # shared first task
    # consolidation time: recorded per task for the penalised methods only, and summed in the summary
    progress = {m: json.loads((out / "runs" / m / "progress.json").read_text()) for m in ("finetune", "kfac")}
    assert progress["finetune"]["consolidation_time"] == [0.0, 0.0, 0.0]  # nothing consolidated: no time
    assert data["methods"]["finetune"]["total_consolidation_time_s"] == 0.0
    kfac_times = progress["kfac"]["consolidation_time"]
    assert len(kfac_times) == 3 and all(isinstance(x, float) and x >= 0.0 for x in kfac_times)
    total = data["methods"]["kfac"]["total_consolidation_time_s"]
    assert isinstance(total, float) and total >= 0.0 and total == round(sum(kfac_times), 1)
    # the last model + prior of each penalised method is kept, and loads back
    ckpt = Path(json.loads((out / "runs" / "kfac" / "progress.json").read_text())["checkpoint"])
    assert (ckpt / "fisher" / "prior_config.json").is_file() and (ckpt / "el_model.json").is_file()
    from hf_kfac import Prior
    from hf_kfac.el.models import load_el_model

    model = load_el_model(ckpt)
    prior = Prior.from_pretrained(ckpt, model=model)
    assert [t.name for t in prior.tasks] == ["diseases", "drugs", "phenotypes"]
    assert res["methods"]["kfac"]["R"] == data["methods"]["kfac"]["R"]

    # resuming a finished run does no work and gives the same table
    again = recipe.main(["--config", TINY, "--output_dir", str(out), "--quiet", "--save_models", "last"])
    assert again["methods"]["ewc"]["R"] == data["methods"]["ewc"]["R"]

    # another method in another directory, with a λ grid chosen on dev and split over two calls
    # (as two processes would run it): the second call's selection covers both λ
    other = tmp_path / "other"
    recipe.main(["--config", TINY, "--output_dir", str(other), "--quiet", "--methods", "l2,kfac-compact", "--tasks",
                 "A,B,C", "--lambda_grid", "l2=0.1", "--lambdas", "kfac-compact=100", "--save_models", "last"])
    sel = json.loads((other / "runs" / "l2" / "selected.json").read_text())
    assert set(sel["lambda_selection"]) == {"0.1"} and (other / "runs" / "l2" / "lambda-0.1" / "progress.json").is_file()
    recipe.main(["--config", TINY, "--output_dir", str(other), "--quiet", "--methods", "l2", "--lambda_grid", "l2=10",
                 "--save_models", "last"])
    sel = json.loads((other / "runs" / "l2" / "selected.json").read_text())
    assert set(sel["lambda_selection"]) == {"0.1", "10"} and sel["lambda"] in (0.1, 10.0)
    # oracle: each run's final average dev acc@1, read from its own saved evaluation rows
    dev_avg = {}
    for lam in (0.1, 10.0):
        last = json.loads((other / "runs" / "l2" / f"lambda-{lam:g}" / "progress.json").read_text())["rows"][-1]["dev"]
        dev_avg[lam] = sum(r["acc1"] for r in last) / len(last)
        assert sel["lambda_selection"][f"{lam:g}"] == pytest.approx(dev_avg[lam])
    assert sel["lambda"] == max(sorted(dev_avg), key=lambda k: (dev_avg[k], -k))  # best dev average, ties: smaller λ
    compact_cfg = json.loads((other / "runs" / "kfac-compact" / "task2-phenotypes" / "fisher" / "prior_config.json").read_text())
    assert compact_cfg["prior"]["storage"]["format"] == "compact"
    merged = recipe.main(["--config", TINY, "--merge_runs", str(out), str(other), "--output_dir", str(tmp_path / "m")])
    assert set(merged["methods"]) == {"finetune", "l2", "ewc", "kfac", "kfac-compact"}
    assert "reduction_ci" in merged["methods"]["l2"]
    assert (tmp_path / "m" / "accuracy.png").is_file()
    # every λ of the grid is scored on test beside the chosen one: final average = mean of its own last test row
    grid = merged["methods"]["l2"]["lambda_grid"]
    assert [r["lambda"] for r in grid] == [0.1, 10.0]
    assert [r["lambda"] for r in grid if r["chosen"]] == [sel["lambda"]]
    for r in grid:
        last = json.loads((other / "runs" / "l2" / f"lambda-{r['lambda']:g}" / "progress.json").read_text())["rows"][-1]
        assert r["final_avg_acc"] == pytest.approx(sum(x["acc1"] for x in last["test"]) / len(last["test"]))
        assert r["dev_final_avg_acc"] == pytest.approx(dev_avg[r["lambda"]])
    assert "Every λ of the grids" in (tmp_path / "m" / "results.md").read_text()
    assert (tmp_path / "m" / "lambda_grid.png").stat().st_size > 1000
    assert "lambda_grid" not in merged["methods"]["kfac"]  # one λ: no grid
    # without --config the merge still names the runs' own profile, not the default one
    bare = recipe.main(["--merge_runs", str(out), "--output_dir", str(tmp_path / "m2"), "--quiet"])
    assert bare["profile"] == "tiny" and "profile `tiny`" in (tmp_path / "m2" / "results.md").read_text()


def test_continue_from_a_saved_prior(tmp_path: Path) -> None:
    first = tmp_path / "ab"
    recipe.main(["--config", TINY, "--output_dir", str(first), "--quiet", "--methods", "kfac", "--tasks", "A,B",
                 "--save_models", "last"])
    ckpt = json.loads((first / "runs" / "kfac" / "progress.json").read_text())["checkpoint"]
    out = tmp_path / "c"
    res = recipe.main(["--config", TINY, "--output_dir", str(out), "--quiet", "--methods", "kfac",
                       "--tasks", "A,B,C", "--prior", ckpt, "--save_models", "last"])
    m = res["methods"]["kfac"]
    assert m["row_task"] == [None, "phenotypes"]  # the loaded model's row, then the new task
    assert m["R"][0][0] is not None and m["R"][0][2] is None and m["R"][1][2] is not None
    assert m["forgetting"] is not None
    ckpt2 = json.loads((out / "runs" / "kfac" / "progress.json").read_text())["checkpoint"]
    from hf_kfac import Prior

    assert [t.name for t in Prior.from_pretrained(ckpt2).tasks] == ["diseases", "drugs", "phenotypes"]


def test_push_to_hub_after_each_task_and_continue_from_the_hub(hub_server, tmp_path: Path) -> None:
    """--push_to_hub pushes model + prior through the trainer; --prior <repo id> continues from the Hub."""
    from huggingface_hub import HfApi
    from transformers import AutoModel

    from hf_kfac import Prior

    recipe.main(["--config", TINY, "--output_dir", str(tmp_path / "ab"), "--quiet", "--methods", "kfac",
                 "--tasks", "A,B", "--push_to_hub", "true", "--hub_model_id", "test-user/el-{method}"])
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    files = set(api.list_repo_files("test-user/el-kfac"))
    assert {"config.json", "model.safetensors", "el_model.json", "heads.safetensors",
            "fisher/prior_config.json"} <= files
    commits = api.list_repo_commits("test-user/el-kfac")
    assert sum("after task" in c.title for c in commits) == 2  # one push per task
    AutoModel.from_pretrained("test-user/el-kfac")  # the encoder is a plain HF model
    assert [t.name for t in Prior.from_pretrained("test-user/el-kfac").tasks] == ["diseases", "drugs"]
    res = recipe.main(["--config", TINY, "--output_dir", str(tmp_path / "c"), "--quiet", "--methods", "kfac",
                       "--tasks", "A,B,C", "--prior", "test-user/el-kfac"])
    assert res["methods"]["kfac"]["row_task"] == [None, "phenotypes"]


def test_an_interrupted_run_resumes_from_its_last_saved_task(tmp_path: Path) -> None:
    out = tmp_path / "r"
    argv = ["--config", TINY, "--output_dir", str(out), "--quiet", "--methods", "kfac", "--tasks", "A,B",
            "--save_models", "all"]
    full = recipe.main(argv)["methods"]["kfac"]
    prog = out / "runs" / "kfac" / "progress.json"
    st = json.loads(prog.read_text())
    for key in ("rows", "row_task", "train_time", "consolidation_time", "eval_time", "lambda_abs", "n_train"):
        st[key] = st[key][:1]
    st["checkpoint"], st["complete"] = str(out / "runs" / "kfac" / "task0-diseases"), False
    prog.write_text(json.dumps(st))  # as if the run had stopped after the first task
    again = recipe.main(argv)["methods"]["kfac"]
    assert again["row_task"] == ["diseases", "drugs"]
    assert again["R"] == full["R"]  # the second task was trained again from the saved model + prior


def test_budget_search_split_over_two_workers_equals_one_process(tmp_path: Path) -> None:
    """--tune_budget: two worker processes sharing the grid choose what one process chooses, with the
    same dev score at every grid point; a finished search resumes without training; other options
    in the same folder are refused."""
    import os
    import subprocess

    grid = ["--tune_budget", "epochs=1,3", "--num_threads", "1"]
    one = recipe.main(["--config", TINY, "--output_dir", str(tmp_path / "one"), "--quiet", *grid])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "recipes" / "train.py"), "--config", TINY, "--output_dir",
                               str(tmp_path / "two"), "--quiet", *grid, "--budget_workers", "2", "--budget_worker", str(k)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    two = json.loads((tmp_path / "two" / "budget.json").read_text())
    assert two["epochs"] == one["epochs"] and two["learning_rate"] == one["learning_rate"]
    for task, want in one["budget"].items():
        assert set(want["grid"]) == {"epochs-1_lr-0.001", "epochs-3_lr-0.001"}
        assert two["budget"][task]["grid"] == want["grid"], task
        assert want["dev_acc1"] == max(want["grid"].values())
    # point p was trained by worker p % 2, once
    for d in sorted((tmp_path / "two" / "budget").glob("task*/epochs-*")):
        assert json.loads((d / "result.json").read_text())["worker"] == (0 if d.name.startswith("epochs-1_") else 1)
    again = recipe.main(["--config", TINY, "--output_dir", str(tmp_path / "one"), "--quiet", *grid])
    assert again == one
    with pytest.raises(ValueError, match="other options"):
        recipe.main(["--config", TINY, "--output_dir", str(tmp_path / "one"), "--quiet", *grid, "--seed", "7"])


# ------------------------------------------------------------------ interrupted and restarted runs
# --save_models last: the recipe's default (tiny.yaml sets none), which removes each earlier checkpoint
RESUME_ARGV = ["--config", TINY, "--quiet", "--methods", "kfac", "--tasks", "A,B,C", "--num_threads", "1",
               "--save_models", "last"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The kfac run over A, B, C with --save_models last, never stopped: the reference."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return recipe.main([*RESUME_ARGV, "--output_dir", str(out)])["methods"]["kfac"]


# Run in a child process; SIGKILL it right after the recipe removed the first task's checkpoint (which it
# does once the second task is saved): the crash window between progress.json and that removal.
_KILLED_CHILD = """
import os, shutil, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import train as recipe

real_rmtree = shutil.rmtree
def rmtree_then_die(path, *a, **k):
    real_rmtree(path, *a, **k)
    if Path(path).name.startswith("task0-"):
        os.kill(os.getpid(), signal.SIGKILL)
shutil.rmtree = rmtree_then_die
recipe.main(sys.argv[2:])
"""


def test_a_run_killed_after_dropping_its_previous_checkpoint_resumes_with_the_same_results(
    tmp_path: Path, uninterrupted: dict
) -> None:
    import os
    import signal
    import subprocess

    out = tmp_path / "r"
    argv = [*RESUME_ARGV, "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(ROOT / "recipes"), *argv], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stdout
    run = out / "runs" / "kfac"
    killed = json.loads((run / "progress.json").read_text())
    # what the kill left: progress.json already names the second task's checkpoint, which is complete
    assert killed["row_task"] == ["diseases", "drugs"] and not killed["complete"]
    assert Path(killed["checkpoint"]) == run / "task1-drugs"
    assert (run / "task1-drugs" / "el_model.json").is_file() and (run / "task1-drugs" / "fisher" / "prior_config.json").is_file()
    assert not (run / "task0-diseases").exists()
    again = recipe.main(argv)["methods"]["kfac"]
    assert again["row_task"] == ["diseases", "drugs", "phenotypes"]
    assert again["R"] == uninterrupted["R"]
    done = json.loads((run / "progress.json").read_text())
    assert done["train_time"][:2] == killed["train_time"]  # resumed: the first two tasks were not trained again
    assert done["complete"] and sorted(p.name for p in run.iterdir() if p.is_dir()) == ["task2-phenotypes"]


def test_other_options_or_a_lost_checkpoint_start_the_method_over(
    tmp_path: Path, uninterrupted: dict, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "o"
    argv = [*RESUME_ARGV, "--output_dir", str(out)]
    prog = out / "runs" / "kfac" / "progress.json"
    recipe.main([*argv, "--epochs", "1"])  # a finished run with other options in the same folder
    other_fp = json.loads(prog.read_text())["fingerprint"]
    with caplog.at_level("WARNING", logger="hf_kfac.recipe"):
        res = recipe.main(argv)["methods"]["kfac"]
    assert "holds a run with other options; starting over" in caplog.text
    assert res["R"] == uninterrupted["R"]  # trained afresh with these options, not the finished run's table
    st = json.loads(prog.read_text())
    assert st["fingerprint"] != other_fp and st["complete"]

    # progress.json naming a checkpoint that is gone (deleted by hand, or by an older recipe that removed it
    # before saving progress.json): the method starts over instead of failing to load it
    for key in ("rows", "row_task", "train_time", "consolidation_time", "eval_time", "lambda_abs", "n_train"):
        st[key] = st[key][:2]
    st["checkpoint"], st["complete"] = str(out / "runs" / "kfac" / "task1-drugs"), False
    prog.write_text(json.dumps(st))
    assert not (out / "runs" / "kfac" / "task1-drugs").exists()
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_kfac.recipe"):
        res = recipe.main(argv)["methods"]["kfac"]
    assert "task1-drugs of task 2, but that folder does not exist" in caplog.text and "starts over" in caplog.text
    assert res["row_task"] == ["diseases", "drugs", "phenotypes"] and res["R"] == uninterrupted["R"]


@pytest.mark.slow
def test_the_recipe_runs_data_parallel_under_torchrun_on_cpu(tmp_path: Path) -> None:
    """Two CPU processes train one model together (Accelerate's MULTI_CPU, not two copies racing to save
    the same folders) and agree on every shared stage and progress file."""
    from test_distributed_fisher import torchrun

    out = tmp_path / "ddp"
    proc = torchrun(ROOT / "recipes" / "train.py", "--config", TINY, "--methods", "finetune,kfac", "--output_dir",
                    str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "on 2 process(es)" in proc.stderr and "on 1 process(es)" not in proc.stderr
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(data["methods"]) == {"finetune", "kfac"}
    for m in data["methods"].values():
        assert len(m["R"]) == 3 and all(x is not None for x in m["R"][2])
    for m in ("finetune", "kfac"):
        progress = json.loads((out / "runs" / m / "progress.json").read_text(encoding="utf-8"))
        assert progress["complete"] and progress["config"]["num_processes"] == 2
        assert progress["data_options"]["processes"] == 2  # batch_size is per process: the runs pair only alike
    assert data["config"]["num_processes"] == 2

    # one process into the same folder: the two-process runs (effective batch 2x) are not taken as its own
    recipe.main(["--config", TINY, "--methods", "finetune", "--output_dir", str(out), "--quiet"])
    progress = json.loads((out / "runs" / "finetune" / "progress.json").read_text(encoding="utf-8"))
    assert progress["config"]["num_processes"] == 1 and "processes" not in progress["data_options"]

    # the budget search: each grid point is saved once, by the main process, and read by both
    budget = tmp_path / "budget"
    proc = torchrun(ROOT / "recipes" / "train.py", "--config", TINY, "--tasks", "A,B", "--tune_budget", "epochs=1,2",
                    "--output_dir", str(budget), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    chosen = json.loads((budget / "budget.json").read_text(encoding="utf-8"))["budget"]
    assert set(chosen) == {"diseases", "drugs"} and all(len(c["grid"]) == 2 for c in chosen.values())
