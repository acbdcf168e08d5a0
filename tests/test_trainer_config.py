"""ContinualConfig: defaults, the mapping onto the core configs, CLI parsing and validation."""

from __future__ import annotations

import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_kfac import FisherConfig, PriorConfig
from hf_kfac.enums import Accumulation, FisherType, KFACApprox, PenaltyType, Shape, TaskWeighting
from hf_kfac.trainer_config import ContinualConfig


def _cfg(**kw) -> ContinualConfig:
    return ContinualConfig(output_dir="out", use_cpu=True, report_to="none", **kw)


def test_is_training_arguments_with_documented_fields() -> None:
    cfg = _cfg()
    assert isinstance(cfg, TrainingArguments)
    assert cfg.penalty == PenaltyType.KFAC and cfg.penalty_lambda == 1.0
    assert cfg.fisher_type == FisherType.MC and cfg.kfac_approx == KFACApprox.EXPAND
    assert cfg.prior_subfolder == "fisher" and cfg.fisher_exclude == []
    fields = ContinualConfig.__dataclass_fields__
    for name in (
        "penalty", "penalty_lambda", "fisher_type", "kfac_approx", "fisher_n_samples", "prior_damping",
        "prior_accumulation", "prior_decay", "prior_task_weighting", "fisher_max_examples", "fisher_max_batches",
        "fisher_batch_size", "fisher_exclude", "fisher_force_diag", "kfac_max_factor_ratio", "prior_subfolder",
    ):
        assert fields[name].metadata.get("help"), name
    assert _cfg(penalty="none").penalty_lambda == 0.0


def test_maps_onto_the_core_configs() -> None:
    cfg = _cfg(
        penalty="ewc", fisher_type="exact", fisher_n_samples=3, kfac_approx="reduce", fisher_exclude="a.*, *.b",
        fisher_force_diag=["cls*"], kfac_max_factor_ratio=4.0, fisher_max_batches=7, seed=11,
        prior_accumulation="merge", prior_decay=0.5, prior_task_weighting="uniform", prior_damping=1e-3,
    )
    f = cfg.to_fisher_config()
    assert isinstance(f, FisherConfig)
    assert (f.shape, f.fisher_type, f.n_samples, f.kfac_approx) == (Shape.DIAG, FisherType.EXACT, 3, KFACApprox.REDUCE)
    assert f.exclude == ["a.*", "*.b"] and f.force_diag == ["cls*"] and f.max_factor_ratio == 4.0
    assert f.max_batches == 7 and f.seed == 11
    p = cfg.to_prior_config()
    assert isinstance(p, PriorConfig)
    assert (p.shape, p.accumulation, p.decay, p.task_weighting, p.damping) == (
        Shape.DIAG, Accumulation.MERGE, 0.5, TaskWeighting.UNIFORM, 1e-3,
    )
    default = _cfg(penalty="l2").to_prior_config()
    assert default.shape == Shape.IDENTITY and default.accumulation == Accumulation.SEPARATE
    assert default.decay == 1.0 and default.task_weighting == TaskWeighting.DATA_SIZE and default.damping == 0.0
    assert _cfg(penalty="kfac").to_fisher_config().shape == Shape.KFAC
    with pytest.raises(ValueError, match="estimates no Fisher"):
        _cfg(penalty="l2").to_fisher_config()
    with pytest.raises(ValueError, match="keeps no prior"):
        _cfg(penalty="none").to_prior_config()


def test_prior_storage_selects_the_compact_format_from_a_name_or_json() -> None:
    assert _cfg(penalty="kfac").to_prior_config().storage.compact is False
    assert _cfg(penalty="kfac", prior_storage="compact").to_prior_config().storage.compact
    (cfg,) = HfArgumentParser(ContinualConfig).parse_args_into_dataclasses(
        ["--output_dir", "o", "--penalty", "kfac", "--prior_storage",
         '{"format": "compact", "rank_fraction": 0.5, "compute_dtype": "bfloat16"}']
    )
    st = cfg.to_prior_config().storage
    assert st.compact and st.rank_fraction == 0.5 and st.compute_dtype == "bfloat16"
    assert json.loads(cfg.to_json_string())["prior_storage"]["rank_fraction"] == 0.5


def test_a_storage_config_object_is_accepted_and_the_arguments_stay_json() -> None:
    from hf_kfac import StorageConfig

    cfg = _cfg(penalty="kfac", prior_storage=StorageConfig(format="compact", rank_fraction=0.5))
    st = cfg.to_prior_config().storage
    assert st.compact and st.rank_fraction == 0.5
    assert json.loads(cfg.to_json_string())["prior_storage"]["rank_fraction"] == 0.5


def test_parses_from_the_command_line_and_serialises() -> None:
    (cfg,) = HfArgumentParser(ContinualConfig).parse_args_into_dataclasses(
        ["--output_dir", "o", "--use_cpu", "true", "--penalty", "ewc", "--penalty_lambda", "0.25",
         "--fisher_exclude", "a*", "b*", "--prior_accumulation", "merge", "--fisher_max_examples", "10"]
    )
    assert cfg.penalty == "ewc" and cfg.penalty_lambda == 0.25 and cfg.fisher_exclude == ["a*", "b*"]
    assert cfg.prior_accumulation == "merge" and cfg.fisher_max_examples == 10 and cfg.prior_decay is None
    d = json.loads(cfg.to_json_string())
    assert d["penalty"] == "ewc" and d["prior_accumulation"] == "merge"
    with pytest.raises(SystemExit):
        HfArgumentParser(ContinualConfig).parse_args_into_dataclasses(["--output_dir", "o", "--penalty", "lasso"])


def test_help_lists_every_continual_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # argparse %-formats every help string: a bare % crashes --help
        HfArgumentParser(ContinualConfig).parse_args_into_dataclasses(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("--penalty", "--penalty_lambda", "--fisher_type", "--kfac_approx", "--prior_accumulation"):
        assert name in out


@pytest.mark.parametrize(
    "kw,field,hint",
    [
        (dict(penalty="none", penalty_lambda=0.5), "penalty_lambda=0.5", "penalty='none'"),
        (dict(penalty_lambda=-1.0), "penalty_lambda=-1.0", ">= 0"),
        (dict(penalty_lambda=float("nan")), "penalty_lambda=nan", "finite"),
        (dict(penalty_lambda=True), "penalty_lambda=True", "float"),
        (dict(penalty="lasso"), "penalty='lasso'", "'none', 'l2', 'ewc', 'kfac'"),
        (dict(fisher_type="fancy"), "fisher_type='fancy'", "'mc', 'empirical', 'exact'"),
        (dict(kfac_approx="squeeze"), "kfac_approx='squeeze'", "'expand', 'reduce'"),
        (dict(prior_accumulation="sum"), "prior_accumulation='sum'", "'separate', 'merge'"),
        (dict(prior_task_weighting="size"), "prior_task_weighting='size'", "'data_size', 'uniform'"),
        (dict(fisher_n_samples=0), "fisher_n_samples=0", ">= 1"),
        (dict(fisher_max_examples=0), "fisher_max_examples=0", ">= 1"),
        (dict(fisher_max_batches=-2), "fisher_max_batches=-2", ">= 1"),
        (dict(fisher_batch_size=1.5), "fisher_batch_size=1.5", "integer"),
        (dict(kfac_max_factor_ratio=0), "kfac_max_factor_ratio=0", "> 0"),
        (dict(prior_damping=-1e-3), "prior_damping=-0.001", ">= 0"),
        (dict(prior_decay=0.0), "prior_decay=0.0", "(0, 1]"),
        (dict(prior_decay=1.5), "prior_decay=1.5", "(0, 1]"),
        (dict(fisher_exclude=[3]), "fisher_exclude=[3]", "patterns"),
        (dict(prior_storage="tiny"), "prior_storage='tiny'", "'full', 'compact'"),
        (dict(prior_storage='{"format": "compact", "rank": 0}'), "prior_storage=", "rank must be an integer >= 1"),
        (dict(prior_storage="{oops"), "prior_storage='{oops'", "not valid JSON"),
        (dict(prior_subfolder=""), "prior_subfolder=''", "non-empty"),
        (dict(prior_subfolder="../up"), "prior_subfolder='../up'", "relative"),
        (dict(prior_subfolder="/abs"), "prior_subfolder='/abs'", "relative"),
        (dict(prior_subfolder="_fisher"), "prior_subfolder='_fisher'", "Hub uploads"),
        (dict(prior_subfolder="checkpoint-3"), "prior_subfolder='checkpoint-3'", "collide"),
        (dict(prior_subfolder="."), "prior_subfolder='.'", "not the model folder itself"),
        (dict(prior_subfolder="./"), "prior_subfolder='./'", "not the model folder itself"),
        (dict(prior_subfolder="model.safetensors"), "prior_subfolder='model.safetensors'", "name of a file"),
        (dict(prior_subfolder="config.json/x"), "prior_subfolder='config.json/x'", "name of a file"),
        (dict(prior_subfolder="training_args.bin"), "prior_subfolder='training_args.bin'", "name of a file"),
    ],
)
def test_bad_values_fail_naming_field_value_and_fix(kw: dict, field: str, hint: str) -> None:
    with pytest.raises(ValueError) as e:
        _cfg(**kw)
    msg = str(e.value)
    assert field in msg and hint in msg, msg


@pytest.mark.parametrize("accumulation", ["separate", "merge"])
def test_prior_decay_set_on_a_loaded_prior_acts_as_its_help_says(accumulation: str, tmp_path) -> None:
    """separate: γ is applied at penalty time, so the new γ re-weights the stored tasks at once; merge: the
    past decay is folded into the stored weight, so only the next merge uses the new γ. Weights by hand."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
    from trainer_fixtures import make_model

    from hf_kfac import ContinualTrainer, Prior

    help_text = ContinualConfig.__dataclass_fields__["prior_decay"].metadata["help"]
    assert "only future merges" in help_text and "re-weights every stored task" in help_text
    model = make_model("seq")
    prior = Prior(shape="identity", accumulation=accumulation)  # decay 1 while the tasks were stored
    prior.add_task(model, None, "a", n_examples=4)
    prior.add_task(model, None, "b", n_examples=6)
    cfg = _cfg(penalty="l2", prior_decay=0.5)
    cfg.output_dir = str(tmp_path)
    trainer = ContinualTrainer(model=model, args=cfg, prior=prior)
    assert trainer.prior.config.decay == 0.5
    if accumulation == "separate":
        assert trainer.prior.slot_weights() == [4 * 0.5, 6.0]  # task a is one task old: γ¹ N_a
    else:
        assert trainer.prior.slot_weights() == [4.0 + 6.0]  # merged with γ = 1 before: unchanged
        trainer.prior.add_task(model, None, "c", n_examples=2)
        assert trainer.prior.slot_weights() == [0.5 * 10.0 + 2.0]  # the next merge uses the new γ
