"""A save killed at any point leaves a loadable prior: the complete old one or the complete new one.

A real child process saves an "old" prior, then forks once per kill point; each fork saves a
"new" prior over it and is killed (``os._exit``) just before its k-th file-system call
(open, mkdir, chmod, replace, rename, unlink, rmdir), until a fork finishes its save. The
expected tensors of both priors are written by the child with ``safetensors`` directly, not
through the code under test. The parent then loads every killed folder and compares.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_kfac import Prior

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

KILL_LOOP = textwrap.dedent(
    """
    import builtins, json, os, shutil


    def kill_at_every_step(out, template, target_of, save, counted, patch_open=False):
        \"\"\"For k = 1, 2, ...: copy ``template`` to ``target_of(k)``, fork, and in the child run
        ``save(target)`` killed (os._exit(9)) just before its k-th call of ``counted`` (and of builtins.open
        with ``patch_open``), until a save finishes; the exit codes go to out/codes.json.\"\"\"
        codes = []
        k = 1
        while k < 800:
            target = target_of(k)
            shutil.copytree(template, target)
            pid = os.fork()
            if pid == 0:
                try:
                    calls = [0]

                    def wrap(real):
                        def f(*a, **kw):
                            calls[0] += 1
                            if calls[0] == k:
                                os._exit(9)  # killed just before the k-th file-system call
                            return real(*a, **kw)
                        return f

                    for name in counted:
                        setattr(os, name, wrap(getattr(os, name)))
                    if patch_open:
                        builtins.open = wrap(builtins.open)
                    save(target)
                    os._exit(0)  # the save finished before a k-th call
                except BaseException:
                    os._exit(3)
            _, status = os.waitpid(pid, 0)
            codes.append(os.waitstatus_to_exitcode(status))
            if codes[-1] != 9:
                break
            k += 1
        with open(os.path.join(out, "codes.json"), "w") as f:
            json.dump(codes, f)
    """
)

CHILD = KILL_LOOP + textwrap.dedent(
    """
    import json, os, shutil, sys
    import torch
    from torch import nn
    from safetensors.torch import save_file
    from hf_kfac import Curvature, Prior

    out = sys.argv[1]

    def make_prior(seed):
        torch.manual_seed(seed)
        model = nn.Linear(3, 2)
        g = torch.Generator().manual_seed(seed)
        prior = Prior(shape="diag", task_weighting="uniform")
        diag = {k: torch.rand(v.shape, generator=g) for k, v in model.named_parameters()}
        prior.add_task(model, Curvature(diag=diag, n_examples=3), f"task{seed}")
        return prior

    old, new = make_prior(1), make_prior(2)
    save_file(old.state_dict(), os.path.join(out, "expected_old.safetensors"))
    save_file(new.state_dict(), os.path.join(out, "expected_new.safetensors"))

    # every call that changes the file system (os.open creates files); fsync changes nothing a kill can see
    COUNTED = ("open", "mkdir", "chmod", "replace", "rename", "unlink", "rmdir")
    template = os.path.join(out, "template", "fisher")
    old.save_pretrained(template)  # a complete save of the old prior, copied for every kill point
    kill_at_every_step(out, template, lambda k: os.path.join(out, f"kill{k:03d}", "fisher"), new.save_pretrained,
                       COUNTED)
    """
)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_save_killed_at_every_step_leaves_the_complete_old_or_new_prior(tmp_path: Path, caplog) -> None:
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads((tmp_path / "codes.json").read_text())
    assert codes[-1] == 0 and all(c == 9 for c in codes[:-1]), codes  # killed at every point, then one full save
    assert len(codes) > 10  # the swap has many steps: the test reaches all of them
    expected_old = load_file(str(tmp_path / "expected_old.safetensors"))
    expected_new = load_file(str(tmp_path / "expected_new.safetensors"))
    assert not _same(expected_old, expected_new)

    seen, missing_targets = [], []
    for k in range(1, len(codes) + 1):
        parent = tmp_path / f"kill{k:03d}"
        target = parent / "fisher"
        missing = not target.exists()
        if missing:
            missing_targets.append(k)
            # the recovery's fallback: with the new folder broken, the old one is restored instead
            broken = tmp_path / f"broken{k:03d}"
            shutil.copytree(parent, broken, symlinks=True)
            (tmp_leftover,) = [p for p in broken.iterdir() if p.name.startswith(".fisher.tmp-")]
            (tmp_leftover / "prior.safetensors").write_bytes(b"torn")
            assert _same(Prior.from_pretrained(broken / "fisher").state_dict(), expected_old)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_kfac"):
            # the folder itself and its parent (the `fisher` subfolder found) both recover
            loaded = Prior.from_pretrained(target if k % 2 else parent).state_dict()
        if _same(loaded, expected_old):
            seen.append("old")
        else:
            assert _same(loaded, expected_new), f"kill point {k}: neither the old nor the new prior"
            seen.append("new")
        if missing:
            assert target.is_dir()  # restored in place
            assert any(".fisher.tmp-" in rec.getMessage() or ".fisher.old-" in rec.getMessage() for rec in caplog.records), (
                f"kill point {k}: the restore was not logged with the leftover's name"
            )
        # the next save cleans up whatever the killed one left beside the folder
        Prior.load_folder(target).save_pretrained(target)
        assert [p.name for p in parent.iterdir()] == ["fisher"], f"kill point {k}: leftovers after the next save"
    # old up to the rename that puts the new folder in place, new from then on
    assert seen[-1] == "new" and "old" in seen
    switch = seen.index("new")
    assert seen == ["old"] * switch + ["new"] * (len(seen) - switch), seen
    # the crash window between the two renames was hit: no target, restored from the leftovers
    assert missing_targets, "no kill point left the target missing"


TRAINER_CHILD = KILL_LOOP + textwrap.dedent(
    """
    import json, os, shutil, sys
    sys.path.insert(0, os.path.join(sys.argv[2], "tests", "scripts"))
    import torch
    from safetensors.torch import save_file
    from trainer_fixtures import make_dataset, make_model
    from hf_kfac import ContinualConfig, ContinualTrainer

    out = sys.argv[1]
    torch.manual_seed(0)
    args = ContinualConfig(
        output_dir=os.path.join(out, "run"), penalty="kfac", fisher_type="empirical", prior_storage="compact",
        prior_accumulation="merge", max_steps=1, per_device_train_batch_size=4, learning_rate=0.05, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = ContinualTrainer(model=make_model("seq"), args=args, train_dataset=make_dataset("seq", 8))
    trainer.train()
    trainer.consolidate(task_name="A")
    template = os.path.join(out, "template")
    trainer.save_model(template)  # model W1 + a prior whose anchor is a reference to W1
    assert "anchor_ref" in json.load(open(os.path.join(template, "fisher", "prior_config.json")))["slots"][0]
    save_file(trainer.prior.state_dict(), os.path.join(out, "expected_old.safetensors"))
    trainer.train()
    trainer.consolidate(task_name="B")  # merged: the anchor is now W2, which the next save may refer to
    save_file(trainer.prior.state_dict(), os.path.join(out, "expected_new.safetensors"))
    COUNTED = ("open", "mkdir", "chmod", "replace", "rename", "unlink", "remove", "rmdir")
    # transformers writes config.json with open(): counted too
    kill_at_every_step(out, template, lambda k: os.path.join(out, f"kill{k:03d}"), trainer.save_model, COUNTED,
                       patch_open=True)
    """
)


@pytest.mark.slow
def test_a_trainer_save_killed_at_every_step_keeps_a_compact_prior_that_loads_with_the_model_beside_it(tmp_path: Path) -> None:
    """A compact prior may store its anchor as a reference to the weights saved beside it: a save that has
    written the new prior but not yet the new weights must not leave a reference to weights not on disk."""
    import json

    from transformers import BertForSequenceClassification

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-c", TRAINER_CHILD, str(tmp_path), str(root)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads((tmp_path / "codes.json").read_text())
    assert codes[-1] == 0 and all(c == 9 for c in codes[:-1]) and len(codes) > 10, codes
    old = load_file(str(tmp_path / "expected_old.safetensors"))
    new = load_file(str(tmp_path / "expected_new.safetensors"))
    seen = []
    for k in range(1, len(codes) + 1):
        folder = tmp_path / f"kill{k:03d}"
        model = BertForSequenceClassification.from_pretrained(folder)
        loaded = Prior.from_pretrained(folder, model=model).state_dict()  # raises if its anchor is gone
        seen.append("old" if _same(loaded, old) else "new" if _same(loaded, new) else "neither")
    assert "neither" not in seen and seen[0] == "old" and seen[-1] == "new", seen
