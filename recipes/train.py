#!/usr/bin/env python
"""Sequential medical entity linking with EWC / K-FAC Laplace priors (after McInerney et al. 2021).

    accelerate launch recipes/train.py --config recipes/configs/demo.yaml
    python recipes/train.py --config recipes/configs/demo.yaml --methods finetune,kfac --output_dir out/x
    python recipes/train.py --merge_runs out/a out/b --output_dir out/merged

For each task of the sequence (default A diseases, B drugs, C phenotypes): train, evaluate
every task (seen and unseen; a classifier has no head for an unseen task: null), consolidate
the prior, save (and optionally push to the Hub). Every option is a field of
:class:`RecipeArguments`; a YAML ``--config`` sets them and any ``--flag`` on the command
line overrides the YAML. See recipes/README.md for the protocol (profiles, λ selection,
training budgets, metrics) and the outputs.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("hf_kfac.recipe")

METHOD_PENALTY = {"finetune": "none", "l2": "l2", "ewc": "ewc", "kfac": "kfac", "kfac-compact": "kfac", "joint": "none"}
PENALTY_METHODS = ("l2", "ewc", "kfac", "kfac-compact")
# methods whose prior storage is fixed, whatever --prior_storage says
METHOD_STORAGE = {"kfac-compact": "compact"}

DEFAULT_TEMPERATURE = 0.05  # of a new model; a model loaded with --prior keeps its own unless --temperature is given
CLASSIFIER_FISHER_BATCH_SIZE = 32  # the bi-encoder's default is its training batch size

# Profile presets for the data and budget fields left unset (None) by the config and the command line.
PROFILES: dict[str, dict[str, Any]] = {
    "tiny": dict(num_threads=1, encoder="tiny-random", n_concepts=8, max_train=48, max_eval=24, epochs="2", learning_rate="1e-3",
                 batch_size=16, fisher_max_examples=32, n_boot=200, eval_batch_size=64, eval_splits="test"),
    "demo": dict(n_concepts=200, max_train=600, max_eval=400, epochs="4", learning_rate="2e-4", batch_size=32,
                 fisher_max_examples=400, n_boot=1000, eval_batch_size=256, eval_splits="test"),
    "intermediate": dict(n_concepts=None, max_train=20000, max_eval=3000, epochs="2", learning_rate="1e-4",
                         batch_size=64, fisher_max_examples=4000, n_boot=1000, eval_batch_size=256, eval_splits="test"),
    "full": dict(n_concepts=None, max_train=None, max_eval=None, epochs="2", learning_rate="1e-4", batch_size=64,
                 fisher_max_examples=10000, n_boot=1000, eval_batch_size=256, eval_splits="test"),
}


@dataclass
class RecipeArguments:
    """Options of the recipe (YAML keys and command-line flags)."""

    config: str | None = field(default=None, metadata={"help": "YAML file with any of these options; flags override it."})
    profile: str = field(default="demo", metadata={"help": "tiny | demo | intermediate | full: presets for unset data/budget options."})
    model: str = field(default="classifier", metadata={"help": "classifier | bi-encoder"})
    encoder: str | None = field(default=None, metadata={"help": "Encoder name or folder; default all-MiniLM-L6-v2 (offline); 'tiny-random' builds a tiny BERT."})
    tasks: str = field(default="A,B,C", metadata={"help": "Comma-separated built-in tasks (diseases/drugs/phenotypes or A/B/C), in order."})
    methods: str = field(default="finetune,ewc,kfac", metadata={"help": "Comma-separated: finetune, l2, ewc, kfac, kfac-compact, joint."})
    output_dir: str = field(default="outputs/el", metadata={"help": "Where results, plots and per-method runs go."})
    eval_splits: str | None = field(default=None, metadata={"help": "Splits evaluated after each task: test and/or dev (dev is added when a λ grid is searched)."})
    report_split: str = field(default="test", metadata={"help": "Split of the reported table."})
    # data
    n_concepts: int | None = field(default=None, metadata={"help": "Concepts per task (a seeded subset); None: all."})
    max_train: int | None = field(default=None, metadata={"help": "At most this many training strings per task (seeded sample)."})
    max_eval: int | None = field(default=None, metadata={"help": "At most this many dev/test items per task (seeded sample)."})
    subset_seed: int = field(default=0, metadata={"help": "Seed of the concept, training-string and evaluation-item samples."})
    require_eval_concepts: bool = field(default=True, metadata={"help": "With n_concepts, sample among concepts that have dev or test mentions."})
    # model and training budget
    seed: int = field(default=42, metadata={"help": "Training seed (same for every method)."})
    epochs: str | None = field(default=None, metadata={"help": "Epochs per task: one value, or one per task (comma-separated)."})
    learning_rate: str | None = field(default=None, metadata={"help": "Learning rate per task: one value or one per task."})
    batch_size: int | None = field(default=None, metadata={"help": "Training batch size."})
    warmup: float = field(default=0.1, metadata={"help": "Warm-up (ratio of steps if < 1)."})
    max_length: int = field(default=32, metadata={"help": "Token limit of a mention."})
    freeze_word_embeddings: bool = field(default=True, metadata={"help": "Freeze the token embeddings (kept out of training and the prior)."})
    head_init: str = field(default="names", metadata={"help": "Classifier head init: names (scaled name embeddings) or random."})
    temperature: float | None = field(default=None, metadata={"help": "Bi-encoder temperature (and scale of name-initialised heads). Default: 0.05 for a new model; with --prior, the loaded model's saved value, which a value given here overrides (logged; the value used is recorded)."})
    pairs_per_string: int = field(default=1, metadata={"help": "Bi-encoder positives drawn per training string."})
    # penalty
    lambdas: str = field(default="", metadata={"help": "Fixed λ per method, e.g. 'ewc=100,kfac=100,l2=1' or one value for all."})
    lambda_grid: str = field(default="", metadata={"help": "λ values searched on dev: '1,10,100' for all, or 'ewc=1,10;kfac=10,100'."})
    lambda_relative: bool = field(default=True, metadata={"help": "λ in units of 1/N (N: training examples of the current task); 1 = the Laplace posterior."})
    fisher_type: str = field(default="mc", metadata={"help": "mc | empirical | exact"})
    fisher_n_samples: int = field(default=1, metadata={"help": "Labels drawn per example (mc)."})
    fisher_max_examples: int | None = field(default=None, metadata={"help": "Examples used for the Fisher."})
    fisher_batch_size: int | None = field(default=None, metadata={"help": "Batch size of Fisher estimation. Default: 32 for the classifier; for the bi-encoder the training --batch_size, since its predictive distribution is a softmax over one batch's candidates (a Fisher batch of another size would see another number of candidates than training did)."})
    kfac_approx: str = field(default="expand", metadata={"help": "expand | reduce"})
    fisher_exclude: str = field(default="", metadata={"help": "Comma-separated fnmatch patterns left out of the prior."})
    prior_damping: float = field(default=0.0, metadata={"help": "Damping δ of the prior (0: none; the Fisher of a trained linker is tiny, see recipes/README.md)."})
    prior_storage: str = field(default="full", metadata={"help": "K-FAC prior storage: full | compact (or a JSON object of StorageConfig fields)."})
    prior_accumulation: str = field(default="separate", metadata={"help": "separate | merge"})
    prior_task_weighting: str = field(default="data_size", metadata={"help": "data_size | uniform"})
    prior_decay: float = field(default=1.0, metadata={"help": "Decay γ of older tasks."})
    # continuing, Hub, bookkeeping
    prior: str | None = field(default=None, metadata={"help": "Continue from a saved/pushed model+prior (folder or Hub repo id)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push model+prior to the Hub after each task (via the trainer)."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id (with push_to_hub); '{method}' is replaced."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or the logged-in one); set into HF_TOKEN for this process only and written to no file (prefer HF_TOKEN: a flag is visible to other users in the process list)."})
    merge_runs: list[str] = field(default_factory=list, metadata={"help": "Merge the per-method results of these output dirs into output_dir, then exit.", "nargs": "+"})
    resume: bool = field(default=True, metadata={"help": "Skip tasks a previous run of the same method already finished."})
    save_models: str = field(default="last", metadata={"help": "Keep saved model+prior of: all tasks, the last one, or none."})
    tune_budget: str = field(default="", metadata={"help": "Choose each task's budget under fine-tuning on dev, e.g. 'epochs=1,2,4;learning_rate=1e-4,2e-4'; writes budget.json and exits."})
    budget_workers: int = field(default=1, metadata={"help": "With tune_budget: processes sharing the grid (start one per --budget_worker 0..n-1, same output_dir)."})
    budget_worker: int = field(default=0, metadata={"help": "With tune_budget: this process's index among budget_workers (it trains grid points p with p mod n = index)."})
    n_boot: int | None = field(default=None, metadata={"help": "Bootstrap resamples for CIs."})
    eval_batch_size: int | None = field(default=None, metadata={"help": "Batch size of evaluation."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None: torch's default). 1 avoids thread contention on a busy machine."})
    logging_steps: int = field(default=50, metadata={"help": "Trainer logging interval."})
    quiet: bool = field(default=False, metadata={"help": "Less logging."})


# ------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None = None) -> RecipeArguments:
    """YAML ``--config`` first, then command-line flags on top (HfArgumentParser)."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = HfArgumentParser(RecipeArguments)
    if known.config:
        data = yaml.safe_load(Path(known.config).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{known.config}: expected a mapping of options")
        names = {f.name for f in fields(RecipeArguments)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{known.config}: unknown option(s) {unknown}; see recipes/train.py --help")
        types = {f.name: str(f.type) for f in fields(RecipeArguments)}
        for k, v in list(data.items()):
            if isinstance(v, list) and k != "merge_runs":
                data[k] = ",".join(_yaml_scalar(x) for x in v)
            elif isinstance(v, dict):  # {kfac: [10, 100], ewc: 3} -> 'kfac=10,100;ewc=3'
                data[k] = ";".join(f"{a}=" + (",".join(_yaml_scalar(x) for x in b) if isinstance(b, list)
                                              else _yaml_scalar(b)) for a, b in v.items())
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and types[k].startswith("str"):
                data[k] = _yaml_scalar(v)  # 'lambdas: 100', 'epochs: 2': the option is a string
        parser.set_defaults(**data)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return resolve_profile(args)


def _yaml_scalar(x: Any) -> str:
    """A YAML scalar as the option string (floats in their shortest form: 1e-4, not 0.0001)."""
    return repr(x) if isinstance(x, float) else str(x)


def resolve_profile(args: RecipeArguments) -> RecipeArguments:
    if args.profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {args.profile!r}")
    for k, v in PROFILES[args.profile].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.model in ("biencoder", "bi_encoder"):
        args.model = "bi-encoder"
    if args.model not in ("classifier", "bi-encoder"):
        raise ValueError(f"model must be 'classifier' or 'bi-encoder', got {args.model!r}")
    if args.fisher_batch_size is None:  # the bi-encoder's Fisher softmax is over one batch's candidates, as in training
        args.fisher_batch_size = args.batch_size if args.model == "bi-encoder" else CLASSIFIER_FISHER_BATCH_SIZE
    if args.temperature is None and not args.prior:  # with --prior: the loaded model's (resolve_prior_temperature)
        args.temperature = DEFAULT_TEMPERATURE
    for m in _split(args.methods):
        if m not in METHOD_PENALTY:
            raise ValueError(f"unknown method {m!r}; choose from {sorted(METHOD_PENALTY)}")
    if args.save_models not in ("all", "last", "none"):
        raise ValueError("save_models must be all, last or none")
    # checked now, not after a first task was trained: numbers, known task names, no task twice
    n_tasks = len(resolve_task_names(args.tasks))
    per_task(args.epochs, n_tasks, "epochs")
    per_task(args.learning_rate, n_tasks, "learning_rate")
    for s in _split(args.eval_splits) + [args.report_split]:
        if s not in ("dev", "test"):
            raise ValueError(f"--eval_splits / --report_split: unknown split {s!r}; use dev and/or test")
    return args


def resolve_task_names(spec: str) -> list[str]:
    """The canonical built-in task names of ``--tasks`` (aliases resolved); a task named twice is an error."""
    from hf_kfac.el.builtin import _canonical_task_name

    names = [_canonical_task_name(t) for t in _split(spec)]
    if not names:
        raise ValueError("--tasks is empty; give e.g. 'A,B,C'")
    seen: dict[str, str] = {}
    for given, name in zip(_split(spec), names):
        if name in seen:
            raise ValueError(f"--tasks names {name!r} twice ({seen[name]!r} and {given!r}); each task may appear "
                             "once in the sequence")
        seen[name] = given
    return names


def _split(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _number(text: str, flag: str, whole: str) -> float:
    """``float(text)``, or a ValueError naming the option."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--{flag}: {text!r} is not a number (in {whole!r}); give numbers such as 2 or 1e-4") from None


def per_task(value: str | float | int, n: int, what: str) -> list[float]:
    vals = [_number(x, what, str(value)) for x in _split(str(value))]
    if not vals:
        raise ValueError(f"--{what}: no value given; give one value or one per task ({n})")
    if len(vals) == 1:
        return vals * n
    if len(vals) != n:
        raise ValueError(f"{what}: give one value or one per task ({n}), got {value!r}")
    return vals


def parse_method_values(spec: str | float | int, methods: list[str], flag: str = "lambdas",
                        valid: tuple[str, ...] = PENALTY_METHODS) -> dict[str, list[float]]:
    """'1,10' (every penalty method) or 'ewc=1,10;kfac=10' / 'ewc=100,kfac=100' -> {method: [values]}.

    A key outside ``valid`` is an error (a typo would otherwise be ignored); with ``methods``, a key
    that is valid but not among them is warned about (its values are unused)."""
    spec = str(spec if spec is not None else "").strip()
    if not spec:
        return {}
    if "=" not in spec:
        vals = [_number(x, flag, spec) for x in _split(spec)]
        return {m: vals for m in methods if m in valid}
    out: dict[str, list[float]] = {}
    parts = spec.split(";") if ";" in spec else _merge_eq_parts(spec)
    for part in parts:
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"--{flag}: {part.strip()!r} has no 'name='; write e.g. 'ewc=1,10;kfac=10'")
        name, vals = part.split("=", 1)
        name = name.strip()
        if name not in valid:
            raise ValueError(f"--{flag}: unknown name {name!r} in {spec!r}; valid names: {', '.join(valid)}")
        out[name] = [_number(x, flag, spec) for x in _split(vals)]
        if not out[name]:
            raise ValueError(f"--{flag}: no value given for {name!r} in {spec!r}")
        if methods and name not in methods:
            logger.warning("--%s gives %s, which is not among --methods (%s): unused", flag, name, ",".join(methods))
    return out


def _merge_eq_parts(spec: str) -> list[str]:
    """'ewc=100,kfac=10,30' -> ['ewc=100', 'kfac=10,30']."""
    parts: list[str] = []
    for tok in spec.split(","):
        if "=" in tok or not parts:
            parts.append(tok)
        else:
            parts[-1] += "," + tok
    return parts


# ------------------------------------------------------------------ data
def load_tasks(args: RecipeArguments) -> list[Any]:
    """The built-in tasks of the sequence, sub-sampled as the profile says (deterministic)."""
    from hf_kfac.el import ELTask, load_builtin_task

    out = []
    for name in resolve_task_names(args.tasks):
        task = load_builtin_task(name)
        if args.n_concepts is not None and args.require_eval_concepts:
            keep = {c for _, c in task.dev} | {c for _, c in task.test}
            task = ELTask(name=task.name, concept_names={c: n for c, n in task.concept_names.items() if c in keep},
                          train=[p for p in task.train if p[1] in keep], dev=task.dev, test=task.test,
                          dictionary=[p for p in task.dictionary if p[1] in keep], meta=dict(task.meta))
        if args.n_concepts is not None or args.max_train is not None:
            task = task.subset(args.n_concepts, seed=args.subset_seed, max_train=args.max_train)
        out.append(task)
    return out


def train_dataset(args: RecipeArguments, model: Any, tokenizer: Any, task: Any, seed_offset: int = 0):
    from hf_kfac.el.collate import classifier_dataset, pair_dataset

    if args.model == "classifier":
        return classifier_dataset(task, tokenizer, model.task_index(task.name), "dictionary", args.max_length)
    return pair_dataset(task, tokenizer, seed=args.seed + seed_offset, pairs_per_string=args.pairs_per_string,
                        max_length=args.max_length)


# ------------------------------------------------------------------ model
def tiny_encoder_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")


def initial_model(args: RecipeArguments) -> tuple[Any, Any]:
    """(model, tokenizer): from ``--prior`` when given, else a new model on the encoder."""
    import torch
    from transformers import AutoTokenizer

    from hf_kfac.el.models import ELBiEncoder, ELClassifier, default_encoder_path, load_el_model

    if args.prior:
        model = load_el_model(args.prior, token=args.hub_token)
        if model.formulation != args.model:
            raise ValueError(f"--prior {args.prior} holds a {model.formulation} model but --model is {args.model}")
        if args.temperature is None:  # not resolved yet (resolve_prior_temperature): the saved one
            args.temperature = float(model.config.temperature)
        model.config.temperature = float(args.temperature)  # the value recorded in the run's config
        tok = model.tokenizer or AutoTokenizer.from_pretrained(default_encoder_path())
    else:
        cls = ELClassifier if args.model == "classifier" else ELBiEncoder
        if args.encoder == "tiny-random":
            tok = AutoTokenizer.from_pretrained(default_encoder_path())
            torch.manual_seed(args.seed)
            model = cls.from_encoder_config(tiny_encoder_config(tok.vocab_size), tokenizer=tok,
                                            temperature=args.temperature)
        else:
            model = cls.from_encoder(args.encoder, temperature=args.temperature)
            tok = model.tokenizer
    if args.freeze_word_embeddings:
        model.freeze_word_embeddings()
    model.tokenizer = tok
    return model, tok


def resolve_prior_temperature(args: RecipeArguments) -> None:
    """With ``--prior``: the temperature is the loaded model's saved one unless ``--temperature`` (flag or
    YAML) gives another, which then overrides it (logged). Resolved before any run, so that the recorded
    config, the fingerprints and the model all hold the value really used."""
    if not args.prior:
        return
    from hf_kfac.el.models import read_el_spec

    saved = float(read_el_spec(args.prior, token=args.hub_token).get("temperature", DEFAULT_TEMPERATURE))
    if args.temperature is None:
        args.temperature = saved
    elif float(args.temperature) != saved:
        logger.warning("--temperature %g overrides the temperature %g saved with --prior %s: the loaded model "
                       "continues with %g", args.temperature, saved, args.prior, args.temperature)


def add_head(args: RecipeArguments, model: Any, tokenizer: Any, task: Any) -> None:
    """Add the classifier head of ``task``: name-embedding prototypes (``head_init=names``) or random.

    ``names``: row c = e_c / (|e_c| · mean_c |e_c|) / temperature, with e_c the pooled embedding
    of concept c's preferred name, so that the initial logits are about cos(mention, name) / τ
    (a zero-shot linker to start from).
    """
    if model.has_head(task.name):
        model.active_task = task.name
        return
    weight = None
    if args.head_init == "names":
        names = [task.concept_names[c] for c in task.concept_ids]
        emb = _pooled(model, tokenizer, names, args)
        norms = emb.norm(dim=1, keepdim=True).clamp_min(1e-6)
        weight = emb / norms / norms.mean() / args.temperature
    elif args.head_init != "random":
        raise ValueError("head_init must be 'names' or 'random'")
    model.add_task_head(task.name, task.concept_ids, weight=weight)


def _pooled(model: Any, tokenizer: Any, texts: list[str], args: RecipeArguments):
    """Un-normalised pooled embeddings (the classifier head's input) of ``texts``."""
    from hf_kfac.el.evaluation import map_texts

    return map_texts(model, tokenizer, texts, model.embed, int(model.config.hidden_size), args.eval_batch_size,
                     args.max_length)


# ------------------------------------------------------------------ one method's run
def _num_processes() -> int:
    """Processes training together (``--batch_size`` is per process: the effective batch is their product).

    From the launcher's ``WORLD_SIZE`` (torchrun, accelerate launch), known before the process group
    is set up (the Trainer's arguments do that)."""
    from hf_kfac.distributed import get_world_size

    if get_world_size() > 1:
        return get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _data_model_keys(a: RecipeArguments) -> dict[str, Any]:
    """The options every fingerprint shares: data subset, model, seed and training set-up. The process
    count enters only when it is not 1 (runs made before it was recorded were single-process)."""
    keys = dict(model=a.model, encoder=a.encoder, n_concepts=a.n_concepts, max_train=a.max_train,
                max_eval=a.max_eval, subset_seed=a.subset_seed, require=a.require_eval_concepts, seed=a.seed,
                bs=a.batch_size, warmup=a.warmup, max_length=a.max_length, freeze=a.freeze_word_embeddings,
                head_init=a.head_init, temperature=a.temperature, pairs=a.pairs_per_string)
    if _num_processes() != 1:
        keys["processes"] = _num_processes()
    return keys


def data_options(a: RecipeArguments, tasks: list[Any]) -> dict[str, Any]:
    """What makes two runs' evaluations pairable item by item: the tasks, the data subset and evaluated
    items, the model and its starting point. Recorded in progress.json; ``--merge_runs`` refuses runs
    that differ in any of these (naming the option)."""
    return dict(_data_model_keys(a), tasks=[t.name for t in tasks], prior=a.prior)


# options left out of a recorded config: the secret, and what belongs to one command rather than the run
_UNRECORDED = ("hub_token", "merge_runs", "config", "quiet")


def recorded_config(a: RecipeArguments, splits: list[str] | None = None) -> dict[str, Any]:
    """The resolved options of a run, as stored in progress.json and results.json (never the Hub token)."""
    cfg = {k: v for k, v in asdict(a).items() if k not in _UNRECORDED}
    if splits is not None:
        cfg["eval_splits"] = ",".join(splits)
    cfg["num_processes"] = _num_processes()  # batch_size is per process
    return _clean(cfg)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (hf_kfac's writer: a temporary file beside ``path``, fsynced, then renamed over it)."""
    from hf_kfac.serialization import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1, default=_json_default) + "\n")


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _clean(x: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _is_main() -> bool:
    from hf_kfac.distributed import is_main_process

    return is_main_process()


def _wait_for_everyone() -> None:
    """A barrier across processes (none in a single process): what the main process just wrote
    (a shared stage, progress.json) is on disk before any process reads it or goes on."""
    from hf_kfac.distributed import barrier

    barrier()


def _save_shared_stage(model: Any, stage0: Path, row: dict[str, Any]) -> None:
    """Write the shared first-task stage (model + row.json) into a private folder, then rename it into place.

    Sessions sharing an output dir (a λ grid split over sessions) may finish the same first task at
    once: the first rename wins and the other session's copy (the same model) is dropped. A stage
    left without row.json by a killed run of an older recipe is replaced."""
    tmp = stage0.parent / f".{stage0.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    _write_json(tmp / "row.json", row)
    if stage0.is_dir() and not (stage0 / "row.json").is_file():
        shutil.rmtree(stage0, ignore_errors=True)
    try:
        os.rename(tmp, stage0)
    except OSError:  # another session put its stage in place first
        shutil.rmtree(tmp, ignore_errors=True)


def _no_accelerator() -> bool:
    """No CUDA, MPS or XPU device: the Trainer must be told ``use_cpu``, else under ``torchrun`` each CPU
    process trains alone (transformers' ``NOT_PARALLEL``) instead of data-parallel (Accelerate's ``MULTI_CPU``)."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (xpu is not None and xpu.is_available()))


def lambda_abs(args: RecipeArguments, lam: float, n_train: int) -> float:
    return lam / max(n_train, 1) if args.lambda_relative else lam


def method_storage(args: RecipeArguments, method: str) -> str:
    """The K-FAC prior storage of ``method``: ``kfac-compact`` is always compact, else ``--prior_storage``."""
    return METHOD_STORAGE.get(method, args.prior_storage)


def continual_config(args: RecipeArguments, method: str, lam: float, n_train: int, out: Path, epochs: float,
                     lr: float) -> Any:
    from hf_kfac.trainer_config import ContinualConfig

    penalty = METHOD_PENALTY[method]
    hub_id = args.hub_model_id.replace("{method}", method) if args.hub_model_id else None
    return ContinualConfig(
        output_dir=str(out),
        penalty=penalty,
        penalty_lambda=None if penalty == "none" else lambda_abs(args, lam, n_train),
        fisher_type=args.fisher_type,
        fisher_n_samples=args.fisher_n_samples,
        fisher_max_examples=args.fisher_max_examples,
        fisher_batch_size=args.fisher_batch_size,
        kfac_approx=args.kfac_approx,
        fisher_exclude=_split(args.fisher_exclude),
        prior_damping=args.prior_damping if penalty != "none" else None,
        prior_accumulation=args.prior_accumulation if penalty not in ("none",) and not args.prior else None,
        prior_task_weighting=args.prior_task_weighting if penalty != "none" and not args.prior else None,
        prior_decay=args.prior_decay if penalty != "none" else None,
        prior_storage=method_storage(args, method) if penalty == "kfac" and not args.prior else None,
        num_train_epochs=epochs,
        learning_rate=lr,
        per_device_train_batch_size=args.batch_size,
        weight_decay=0.0,
        warmup_steps=args.warmup,
        lr_scheduler_type="linear",
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        push_to_hub=args.push_to_hub,
        hub_model_id=hub_id,
        hub_token=None,  # never stored: the token travels in HF_TOKEN (see _main), not in training_args.bin
        hub_strategy="end",
        use_cpu=_no_accelerator(),
    )


class MethodRun:
    """One method (and λ) over the whole task sequence; resumable from ``run_dir/progress.json``."""

    def __init__(self, args: RecipeArguments, method: str, lam: float | None, tasks: list[Any], run_dir: Path,
                 splits: list[str], shared_dir: Path) -> None:
        self.args, self.method, self.lam, self.tasks = args, method, lam, tasks
        self.run_dir, self.splits, self.shared_dir = run_dir, splits, shared_dir
        self.penalty = METHOD_PENALTY[method]

    # ---------------------------------------------------------- state
    def _state_path(self) -> Path:
        return self.run_dir / "progress.json"

    def _new_state(self) -> dict[str, Any]:
        return {"method": self.method, "lambda": self.lam, "penalty": self.penalty,
                "tasks": [t.name for t in self.tasks], "rows": [], "row_task": [], "start_rows": None,
                "train_time": [], "consolidation_time": [], "eval_time": [], "lambda_abs": [], "n_train": [],
                "checkpoint": None, "complete": False, "fingerprint": self.fingerprint(),
                "profile": self.args.profile, "model": self.args.model, "encoder": self.args.encoder,
                "data_options": data_options(self.args, self.tasks),
                "data_fingerprint": _fingerprint(data_options(self.args, self.tasks)),
                "config": recorded_config(self.args, self.splits)}

    def matches(self, st: dict[str, Any]) -> bool:
        """Whether the saved state ``st`` was made with this run's options. A state of an older recipe,
        which kept the evaluated splits in the order given (its rows' order), matches too."""
        if st.get("fingerprint") == self.fingerprint():
            return True
        rows = st.get("rows") or []
        legacy = list(rows[0]) if rows and isinstance(rows[0], dict) else []
        return (set(legacy) == set(self.splits) and legacy != self.splits
                and st.get("fingerprint") == self.fingerprint(legacy))

    def fingerprint(self, splits: list[str] | None = None) -> str:
        a = self.args
        storage = method_storage(a, self.method)
        keys = dict(_data_model_keys(a), tasks=[t.name for t in self.tasks], epochs=a.epochs, lr=a.learning_rate,
                    prior=a.prior, method=self.method, lam=self.lam, rel=a.lambda_relative, fisher=[a.fisher_type, a.fisher_n_samples,
                    a.fisher_max_examples, a.fisher_batch_size, a.kfac_approx, a.fisher_exclude],
                    prior_opts=[a.prior_damping, a.prior_accumulation, a.prior_task_weighting, a.prior_decay]
                    + ([storage] if storage != "full" and self.penalty == "kfac" else []),
                    splits=self.splits if splits is None else splits)
        return _fingerprint(keys)

    def _stage0_key(self) -> str:
        a = self.args
        return _fingerprint(dict(_data_model_keys(a), task=self.tasks[0].name,
                                 epochs=per_task(a.epochs, len(self.tasks), "epochs")[0],
                                 lr=per_task(a.learning_rate, len(self.tasks), "learning_rate")[0],
                                 all_tasks=[t.name for t in self.tasks], splits=self.splits, n_boot=a.n_boot))

    # ---------------------------------------------------------- evaluation
    def evaluate_all(self, model: Any, tokenizer: Any) -> tuple[dict[str, list[Any]], float]:
        from hf_kfac.el.evaluation import evaluate_task

        t0 = time.perf_counter()
        row: dict[str, list[Any]] = {s: [] for s in self.splits}
        for task in self.tasks:
            res = evaluate_task(model, tokenizer, task, self.splits, max_items=self.args.max_eval,
                                item_seed=self.args.subset_seed, n_boot=self.args.n_boot, seed=0,
                                batch_size=self.args.eval_batch_size, max_length=self.args.max_length)
            for s in self.splits:
                row[s].append(None if res[s] is None else res[s].to_dict(flags=True))
        return row, time.perf_counter() - t0

    # ---------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        import torch

        from hf_kfac import Prior
        from hf_kfac.el.collate import ELCollator
        from hf_kfac.el.models import load_el_model, predictive_fn_for
        from hf_kfac.trainer import ContinualTrainer

        args = self.args
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = self._new_state()
        if args.resume and self._state_path().is_file():
            old = json.loads(self._state_path().read_text(encoding="utf-8"))
            if self.matches(old):
                # a run of an older recipe: the splits in the canonical order, and what it did not record
                changed = old.get("fingerprint") != state["fingerprint"]
                if changed:
                    old["fingerprint"] = state["fingerprint"]
                    old["rows"] = [{sp: row[sp] for sp in self.splits} for row in old["rows"]]
                added = [k for k in ("data_options", "data_fingerprint", "config") if k not in old]
                for k in added:
                    old[k] = state[k]
                state = old
                if (added or changed) and _is_main():
                    _write_json(self._state_path(), state)
                if state.get("complete"):
                    logger.info("[%s] already complete in %s", self.tag, self.run_dir)
                    return state
            else:
                logger.warning("[%s] %s holds a run with other options; starting over", self.tag, self.run_dir)
        done = len(state["train_time"])
        prior: Any = None
        missing = self._checkpoint_problem(state) if done and state.get("checkpoint") else None
        if missing:
            logger.warning("[%s] %s names the checkpoint %s of task %d, but %s; its trained model and prior are "
                           "lost, so the method starts over from the first task", self.tag, self._state_path(),
                           state["checkpoint"], done, missing)
            state, done = self._new_state(), 0
            model, tokenizer = initial_model(args)
        elif done and state.get("checkpoint"):
            ckpt = Path(state["checkpoint"])
            self._remove_stale_checkpoints(state, ckpt)
            model = load_el_model(ckpt)
            if args.freeze_word_embeddings:
                model.freeze_word_embeddings()
            tokenizer = model.tokenizer
            if (ckpt / "fisher" / "prior_config.json").is_file() and self.penalty != "none":
                prior = Prior.from_pretrained(ckpt, model=model)
            logger.info("[%s] resuming after task %d from %s", self.tag, done, ckpt)
        elif done:
            logger.warning("[%s] progress without a checkpoint; starting over", self.tag)
            state, done = self._new_state(), 0
            model, tokenizer = initial_model(args)
        else:
            model, tokenizer = initial_model(args)
        if done == 0 and args.prior and self.penalty != "none":
            prior = Prior.from_pretrained(args.prior, token=args.hub_token, model=model)
        skip: set[str] = set(state.get("skipped_tasks", []))
        if done == 0 and args.prior:
            # tasks already learnt by the loaded model: in its prior, or (classifier) with a head
            learnt = {t.name for t in Prior.from_pretrained(args.prior, token=args.hub_token).tasks} \
                if _has_prior(args.prior) else set()
            skip = {t.name for t in self.tasks if t.name in learnt
                    or (model.formulation == "classifier" and model.has_head(t.name))}
            state["rows"], state["row_task"] = [], []
            row, _ = self.evaluate_all(model, tokenizer)
            state["rows"].append(row)
            state["row_task"].append(None)
            state["skipped_tasks"] = sorted(skip)
        epochs = per_task(args.epochs, len(self.tasks), "epochs")
        lrs = per_task(args.learning_rate, len(self.tasks), "learning_rate")
        collator = ELCollator.for_tokenizer(tokenizer)
        datasets_so_far: list[Any] = []
        from datasets import concatenate_datasets

        for i, task in enumerate(self.tasks):
            if task.name in skip:
                continue
            if model.formulation == "classifier":
                add_head(args, model, tokenizer, task)
            ds = train_dataset(args, model, tokenizer, task, seed_offset=i)
            datasets_so_far.append(ds)
            if task.name in state["row_task"]:  # trained by the run being resumed
                continue
            train_ds = concatenate_datasets(datasets_so_far) if self.method == "joint" else ds
            stage_dir = self.run_dir / f"task{i}-{task.name}"
            cfg = continual_config(args, self.method, self.lam or 0.0, len(ds), stage_dir, epochs[i], lrs[i])
            trainer = ContinualTrainer(model=model, args=cfg, train_dataset=train_ds, data_collator=collator,
                                       processing_class=tokenizer, prior=prior, predictive_fn=predictive_fn_for(model))
            stage0 = self.shared_dir / f"stage0-{self._stage0_key()}"
            reuse = i == 0 and not args.prior and (stage0 / "row.json").is_file()
            if reuse:
                cached = load_el_model(stage0)
                model.load_state_dict(cached.state_dict())
                info = json.loads((stage0 / "row.json").read_text(encoding="utf-8"))
                row, et, tt = info["row"], info["eval_time"], info["train_time"]
                logger.info("[%s] task %s: reusing the shared first-task model (%s)", self.tag, task.name, stage0)
            else:
                logger.info("[%s] task %d/%d %s: training on %d examples (%g epochs, lr %g, λ=%s) on %d process(es)",
                            self.tag, i + 1, len(self.tasks), task.name, len(train_ds), epochs[i], lrs[i],
                            cfg.penalty_lambda, cfg.world_size)
                torch.manual_seed(args.seed + i)
                t0 = time.perf_counter()
                trainer.train()
                tt = time.perf_counter() - t0
                row, et = self.evaluate_all(model, tokenizer)
                if i == 0 and not args.prior and _is_main():
                    _save_shared_stage(model, stage0, {"row": row, "eval_time": et, "train_time": tt})
                _wait_for_everyone()  # the next method's processes all see the shared stage, or none does
            ct = 0.0
            if self.penalty != "none":
                t0 = time.perf_counter()
                trainer.consolidate(task_name=task.name, n_examples=len(ds), metadata={
                    "recipe_method": self.method, "lambda_relative": self.lam, "stage": i,
                    "dev_or_test": {s: [None if r is None else r["acc1"] for r in row[s]] for s in self.splits},
                    # what the model card's accuracy table reads: task name -> acc@1 on the reported split
                    "accuracy": {t.name: r["acc1"] for t, r in zip(self.tasks, row[args.report_split])
                                 if r is not None}, "accuracy_split": args.report_split})
                ct = time.perf_counter() - t0
                prior = trainer.prior
            state["rows"].append(row)
            state["row_task"].append(task.name)
            state["train_time"].append(tt)
            state["consolidation_time"].append(ct)
            state["eval_time"].append(et)
            state["lambda_abs"].append(cfg.penalty_lambda)
            state["n_train"].append(len(train_ds))
            last = i == len(self.tasks) - 1
            # every stage is saved (model + prior) so that the run can resume; earlier stages are
            # removed unless save_models=all, the last one at the end with save_models=none.
            # Order: save the new stage, then progress.json (atomically) naming it, and only then remove
            # the previous stage: a crash at any point leaves progress.json naming a complete checkpoint.
            if args.push_to_hub:  # saves model + prior into stage_dir (all processes), then uploads it
                trainer.push_to_hub(commit_message=f"hf_kfac recipe: {self.method} after task {task.name}")
            else:
                trainer.save_model(str(stage_dir))
            prev = state.get("checkpoint")
            state["checkpoint"] = str(stage_dir)
            state["complete"] = last
            if _is_main():
                _write_json(self._state_path(), state)
                if args.save_models != "all" and prev and Path(prev) != stage_dir:
                    shutil.rmtree(prev, ignore_errors=True)
            _wait_for_everyone()
            acc = {s: [None if r is None else round(r["acc1"], 4) for r in row[s]] for s in self.splits}
            logger.info("[%s] after %s: acc@1 %s (train %.0fs, consolidate %.0fs, eval %.0fs)", self.tag, task.name,
                        acc, tt, ct, et)
        drop = None
        if args.save_models == "none" and state.get("checkpoint"):
            drop, state["checkpoint"] = state["checkpoint"], None
        state["complete"] = True
        if _is_main():
            _write_json(self._state_path(), state)  # first forget the checkpoint, then remove it
            if drop:
                shutil.rmtree(drop, ignore_errors=True)
        _wait_for_everyone()
        return state

    def _checkpoint_problem(self, state: dict[str, Any]) -> str | None:
        """Why the checkpoint named by ``state`` cannot be resumed from (``None``: it can)."""
        from hf_kfac.el.models import EL_MODEL_FILE
        from hf_kfac.serialization import DEFAULT_PRIOR_SUBFOLDER, PRIOR_CONFIG_NAME

        ckpt = Path(state["checkpoint"])
        if not ckpt.is_dir():
            return "that folder does not exist (deleted, or removed by an interrupted run of an older recipe)"
        if not (ckpt / EL_MODEL_FILE).is_file():
            return f"it holds no {EL_MODEL_FILE} (an incomplete save)"
        if self.penalty != "none" and not (ckpt / DEFAULT_PRIOR_SUBFOLDER / PRIOR_CONFIG_NAME).is_file():
            return f"it holds no prior ({DEFAULT_PRIOR_SUBFOLDER}/{PRIOR_CONFIG_NAME}; an incomplete save)"
        return None

    def _remove_stale_checkpoints(self, state: dict[str, Any], ckpt: Path) -> None:
        """Remove earlier stages a run stopped between saving progress.json and removing them would leave."""
        if self.args.save_models == "all" or not _is_main():
            return
        for j, t in enumerate(self.tasks):
            stage = self.run_dir / f"task{j}-{t.name}"
            if t.name in state["row_task"] and stage.resolve() != ckpt.resolve() and stage.is_dir():
                logger.info("[%s] removing %s, left by the interrupted run", self.tag, stage)
                shutil.rmtree(stage, ignore_errors=True)

    @property
    def tag(self) -> str:
        return self.method if self.lam is None else f"{self.method} λ={self.lam:g}"


def _has_prior(path: str) -> bool:
    p = Path(path)
    if p.is_dir():
        return (p / "fisher" / "prior_config.json").is_file() or (p / "prior_config.json").is_file()
    return True


# ------------------------------------------------------------------ summary
def _matrix(state: dict[str, Any], split: str, key: str) -> list[list[Any]]:
    return [[None if r is None else r[key] for r in row[split]] for row in state["rows"]]


def _flags(state: dict[str, Any], split: str, key: str = "correct1") -> list[list[Any]]:
    from hf_kfac.el.evaluation import flags_from_str

    return [[None if r is None else flags_from_str(r[key]) for r in row[split]] for row in state["rows"]]


def _start_rows(state: dict[str, Any]) -> list[int]:
    """First row at which each task counts as learnt."""
    starts = []
    for name in state["tasks"]:
        if name in state.get("skipped_tasks", []):
            starts.append(0)
        elif name in state["row_task"]:
            starts.append(state["row_task"].index(name))
        else:
            starts.append(len(state["rows"]))
    return starts


def method_entry(state: dict[str, Any], split: str, baseline: dict[str, Any] | None, n_boot: int) -> dict[str, Any]:
    from hf_kfac.el.evaluation import bootstrap_sequence_metrics

    R = _matrix(state, split, "acc1")
    entry: dict[str, Any] = {
        "R": R,
        "R_ci": _matrix(state, split, "acc1_ci"),
        "R5": _matrix(state, split, "acc5"),
        "R5_ci": _matrix(state, split, "acc5_ci"),
        "n_items": [next((r["n"] for r in col if r is not None), None)
                    for col in zip(*[row[split] for row in state["rows"]])],
        "row_task": state["row_task"],
        "penalty": state["penalty"],
        "lambda": state["lambda"],
        "lambda_abs": state["lambda_abs"],
        "train_time_s": [round(x, 1) for x in state["train_time"]],
        "consolidation_time_s": [round(x, 1) for x in state["consolidation_time"]],
        "eval_time_s": [round(x, 1) for x in state["eval_time"]],
        "total_train_time_s": round(sum(state["train_time"]), 1),
        "total_consolidation_time_s": round(sum(state["consolidation_time"]), 1),
    }
    starts = _start_rows(state)
    base_flags = None
    if baseline is not None and baseline is not state and len(baseline["rows"]) == len(state["rows"]):
        base_flags = _flags(baseline, split)
    stats = bootstrap_sequence_metrics(_flags(state, split), base_flags, n_boot=n_boot, seed=0, start_rows=starts)
    entry.update(stats)
    if baseline is state:
        entry["reduction"], entry["reduction_ci"] = 0.0, [0.0, 0.0]
    elif entry.get("reduction") is None or (isinstance(entry["reduction"], float) and math.isnan(entry["reduction"])):
        # always present: null, with the reason
        if baseline is None:
            why = "no finetune run to compare with (add finetune to --methods or --merge_runs)"
        elif base_flags is None:
            why = "the finetune run has another number of evaluation rows (e.g. one continued from --prior)"
        else:
            why = "finetune forgets nothing (forgetting <= 0): the reduction is undefined"
        entry["reduction"], entry["reduction_ci"], entry["reduction_reason"] = None, None, why
    from hf_kfac.el.evaluation import forgetting

    entry["forgetting_per_task"] = forgetting(R, starts)[0]
    if "lambda_selection" in state:
        entry["lambda_selection"] = state["lambda_selection"]
    return entry


def _is_method_dir(path: Path) -> bool:
    return (path / "progress.json").is_file() or (path / "selected.json").is_file()


def collect_states(run_roots: list[Path]) -> dict[str, dict[str, Any]]:
    """method -> final state (λ already selected), from output dirs (``<root>/runs/<method>/...``),
    ``runs`` folders, or method folders (a method folder gives that method only). A method found
    in two places is an error naming both."""
    out: dict[str, dict[str, Any]] = {}
    for root in run_roots:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"--merge_runs: {root} is not a folder")
        if _is_method_dir(root):
            mdirs = [root]
        else:
            base = root / "runs" if (root / "runs").is_dir() else root
            mdirs = sorted(p for p in base.iterdir() if p.is_dir() and _is_method_dir(p))
        for mdir in mdirs:
            sel = mdir / "selected.json"
            st = json.loads((sel if sel.is_file() else mdir / "progress.json").read_text(encoding="utf-8"))
            if not st.get("complete"):
                logger.warning("%s is not complete; left out", mdir)
                continue
            if st["method"] in out:
                raise ValueError(f"--merge_runs: method {st['method']} is found twice, in {out[st['method']]['run_dir']} "
                                 f"and in {mdir}; name the method folders to merge (e.g. <out>/runs/{st['method']}) "
                                 "so that each method comes from one of them")
            st["run_dir"] = str(mdir)
            out[st["method"]] = st
    return out


def _describe_from_runs(args: RecipeArguments, states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Merging: check that the runs are pairable and take their options from the runs themselves.

    Runs whose recorded data options differ (tasks, data subset, evaluated items, model, seed...)
    cannot share one table of paired comparisons: a ValueError names the option. Profile, model,
    encoder and the options every run recorded alike (e.g. ``n_boot``) replace the merge command's;
    returns the common recorded config (runs made before configs were recorded keep the command's)."""
    for key in ("profile", "model", "encoder"):
        values = {st[key] for st in states.values() if st.get(key) is not None}
        if len(values) > 1:
            raise ValueError(f"the runs to merge were made with different {key}s ({', '.join(sorted(values))}); "
                             f"merge runs of one {key} at a time")
        if values:
            value = values.pop()
            if getattr(args, key) != value:
                logger.info("merge: %s %r, as recorded by the runs", key, value)
            setattr(args, key, value)
    recorded = {m: st["data_options"] for m, st in states.items() if st.get("data_options") is not None}
    unrecorded = sorted(set(states) - set(recorded))
    if unrecorded:
        logger.warning("merge: the runs of %s recorded no data options (an older recipe); that they were made on "
                       "the same data and evaluation items cannot be checked", ", ".join(unrecorded))
    if recorded:
        ref_m, ref = next(iter(recorded.items()))
        for m, opts in recorded.items():
            for key in sorted(set(ref) | set(opts)):
                if ref.get(key) != opts.get(key):
                    raise ValueError(
                        f"the runs to merge differ in {key} ({ref_m}: {ref.get(key)!r}, {m}: {opts.get(key)!r}; "
                        f"{states[ref_m]['run_dir']} vs {states[m]['run_dir']}): their evaluations cannot be paired; "
                        f"merge runs made with the same {key}")
    configs = [st["config"] for st in states.values() if st.get("config") is not None]
    common: dict[str, Any] = {}
    if configs and len(configs) == len(states):
        common = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs[1:])}
        for k in ("n_boot", "eval_splits", "n_concepts", "max_train", "max_eval", "subset_seed", "seed", "epochs",
                  "learning_rate", "batch_size", "eval_batch_size", "lambda_relative", "prior"):
            if k in common and hasattr(args, k):
                setattr(args, k, common[k])
    return common


def summarize(args: RecipeArguments, states: dict[str, dict[str, Any]], out_dir: Path,
              extra: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write results.json, results.md and accuracy.png for the methods' final states."""
    if not states:
        raise ValueError("no complete method run to summarize")
    order = [m for m in METHOD_PENALTY if m in states]
    first = states[order[0]]
    split = args.report_split
    baseline = states.get("finetune")
    tasks = first["tasks"]
    methods: dict[str, Any] = {}
    for m in order:
        st = states[m]
        if st["tasks"] != tasks:
            raise ValueError(f"method {m} ran tasks {st['tasks']}, others {tasks}: not comparable")
        if split not in st["rows"][0]:
            raise ValueError(f"method {m} was not evaluated on {split!r}")
        methods[m] = method_entry(st, split, baseline, args.n_boot or 1000)
        methods[m]["run_dir"] = st.get("run_dir")
        if st.get("config") is not None:
            methods[m]["config"] = st["config"]
        grid = grid_entries(st, split, baseline, args.n_boot or 1000, chosen_entry=methods[m])
        if grid:
            methods[m]["lambda_grid"] = grid
    results = {
        "profile": args.profile,
        "model": args.model,
        "encoder": args.encoder or "all-MiniLM-L6-v2",
        "tasks": tasks,
        "split": split,
        "metric": "accuracy@1 (R[i][j]: task j after training task i)",
        "methods": methods,
        "config": config if config is not None else recorded_config(args),
    }
    if extra:
        results.update(extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "results.json", _clean(results))
    (out_dir / "results.md").write_text(markdown_table(results))
    plot(results, out_dir / "accuracy.png")
    if any(len(e.get("lambda_grid", [])) > 1 for e in methods.values()):
        plot_lambda_grid(results, out_dir / "lambda_grid.png")
    return results


_GRID_KEYS = ("forgetting", "forgetting_ci", "reduction", "reduction_ci", "reduction_ci_reason", "final_avg_acc",
              "final_avg_acc_ci", "last_task_acc", "last_task_acc_ci")


def grid_entries(state: dict[str, Any], split: str, baseline: dict[str, Any] | None,
                 n_boot: int, chosen_entry: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every λ that took part in the dev selection of ``state``, scored on ``split`` like the chosen one.

    ``chosen_entry``: the chosen λ's ``method_entry``, when the caller has it (not bootstrapped again).

    The runs are read from the method's ``lambda-*`` folders (only the λ values listed in
    ``lambda_selection``, i.e. those that passed the option check); a folder that is gone is skipped.
    ``run_dir`` is the chosen ``lambda-*`` folder, or (merged runs) the method folder holding them."""
    sel = state.get("lambda_selection") or {}
    run_dir = state.get("run_dir")
    if len(sel) < 2 or not run_dir:
        return []
    root = Path(run_dir).parent if Path(run_dir).name.startswith("lambda-") else Path(run_dir)
    out = []
    for lam, dev in sel.items():
        path = root / f"lambda-{lam}" / "progress.json"
        if not path.is_file():
            continue
        st = json.loads(path.read_text(encoding="utf-8"))
        if not st.get("complete") or split not in st["rows"][0]:
            continue
        chosen = st["lambda"] == state["lambda"]
        e = chosen_entry if chosen and chosen_entry is not None else method_entry(st, split, baseline, n_boot)
        out.append({"lambda": st["lambda"], "dev_final_avg_acc": dev, "chosen": chosen,
                    **{k: e.get(k) for k in _GRID_KEYS}})
    return sorted(out, key=lambda r: r["lambda"])


def _fmt(x: Any, ci: Any = None, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    s = f"{100 * x:.1f}" if pct else f"{x:.2f}"
    if ci and ci[0] is not None and not (isinstance(ci[0], float) and math.isnan(ci[0])):
        s += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if pct else f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return s


def _fmt_reduction(e: dict[str, Any], mark: str = " (no CI, see notes)") -> str:
    """The reduction with its CI; a reduction whose CI was withheld (``reduction_ci_reason``) gets ``mark``."""
    s = _fmt(e.get("reduction"), e.get("reduction_ci"))
    if e.get("reduction") is not None and e.get("reduction_ci") is None and e.get("reduction_ci_reason"):
        s += mark
    return s


def reduction_notes(methods: dict[str, Any]) -> list[str]:
    """Why a reduction or its CI is missing, and how many bootstrap draws its CI left out, per method."""
    notes = []
    for m, e in methods.items():
        if m == "finetune":
            continue
        if e.get("reduction_reason"):
            notes.append(f"* {m}: no reduction: {e['reduction_reason']}.")
        elif e.get("reduction_ci_reason"):
            notes.append(f"* {m}: reduction without CI: {e['reduction_ci_reason']}.")
        elif e.get("reduction_ci_dropped"):
            notes.append(f"* {m}: the reduction's CI leaves out the {100 * e['reduction_ci_dropped']:.1f}% of "
                         "bootstrap draws in which fine-tuning forgets nothing (no reduction there).")
    return notes


def markdown_table(results: dict[str, Any]) -> str:
    """The model-card table: one row per method, then each method's R matrix."""
    tasks = results["tasks"]
    lines = [
        f"### Sequential entity linking ({results['model']}, {results['encoder']}, profile `{results['profile']}`)",
        "",
        f"Tasks in order: {', '.join(tasks)}. Accuracy@1 on {results['split']} mentions, in %, with bootstrap 95% CIs "
        "(paired over items). Forgetting of task j = best accuracy after learning it − final accuracy, averaged "
        "over all but the last task; reduction = 1 − forgetting / forgetting(finetune).",
        "",
        "| method | λ | forgetting ↓ | reduction ↑ | final avg acc ↑ | last-task acc | train s | consolidation s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, e in results["methods"].items():
        lam = "–" if e.get("lambda") is None else f"{e['lambda']:g}"
        red = _fmt_reduction(e) if m != "finetune" else "0 (reference)"
        lines.append(f"| {m} | {lam} | {_fmt(e.get('forgetting'), e.get('forgetting_ci'))} | {red} | "
                     f"{_fmt(e.get('final_avg_acc'), e.get('final_avg_acc_ci'))} | "
                     f"{_fmt(e.get('last_task_acc'), e.get('last_task_acc_ci'))} | {e['total_train_time_s']:.0f} | "
                     f"{e['total_consolidation_time_s']:.0f} |")
    notes = reduction_notes(results["methods"])
    if notes:
        lines += ["", "Notes on the reduction:", "", *notes]
    for m, e in results["methods"].items():
        lines += ["", f"**{m}**: R (rows: after training; columns: evaluated task; acc@1 %)", "",
                  "| after \\ on | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for name, row, cis in zip(e["row_task"], e["R"], e["R_ci"]):
            label = name if name is not None else "(loaded prior)"
            lines.append(f"| {label} | " + " | ".join(_fmt(x, c) for x, c in zip(row, cis)) + " |")
        if e.get("lambda_selection"):
            sel = ", ".join(f"λ={k}: {100 * v:.1f}" for k, v in e["lambda_selection"].items() if v is not None)
            lines.append(f"\nλ chosen on dev (final average dev acc@1 %): {sel}")
    grids = {m: e["lambda_grid"] for m, e in results["methods"].items() if len(e.get("lambda_grid", [])) > 1}
    if grids:
        lines += ["", f"**Every λ of the grids** ({results['split']}; the chosen λ, best final average dev acc@1, in bold)",
                  "", "| method | λ | dev final avg | forgetting ↓ | reduction ↑ | final avg acc ↑ | last-task acc |",
                  "|---|---|---|---|---|---|---|"]
        for m, rows in grids.items():
            for r in rows:
                lam = f"**{r['lambda']:g}**" if r["chosen"] else f"{r['lambda']:g}"
                lines.append(f"| {m} | {lam} | {_fmt(r['dev_final_avg_acc'])} | "
                             f"{_fmt(r['forgetting'], r['forgetting_ci'])} | {_fmt_reduction(r, ' (no CI)')} | "
                             f"{_fmt(r['final_avg_acc'], r['final_avg_acc_ci'])} | "
                             f"{_fmt(r['last_task_acc'], r['last_task_acc_ci'])} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy of each task across the sequence, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), sharey=True, squeeze=False)
    for j, (ax, name) in enumerate(zip(axes[0], tasks)):
        for k, (m, e) in enumerate(results["methods"].items()):
            xs, ys, lo, hi = [], [], [], []
            for i, (row, cis) in enumerate(zip(e["R"], e["R_ci"])):
                if row[j] is None:
                    continue
                xs.append(i)
                ys.append(100 * row[j])
                lo.append(100 * cis[j][0])
                hi.append(100 * cis[j][1])
            if xs:
                ax.plot(xs, ys, marker="osD^v<>"[k % 7], linestyle=["-", "--", "-.", ":"][k % 4], label=m, alpha=0.9)
                ax.fill_between(xs, lo, hi, alpha=0.15)
        first = next(iter(results["methods"].values()))
        ax.set_xticks(range(len(first["row_task"])))
        ax.set_xticklabels([t if t else "prior" for t in first["row_task"]], fontsize=8)
        ax.set_title(f"accuracy@1 on {name}")
        ax.set_xlabel("after training")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{results['split']} acc@1 (%)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{results['model']} · {results['encoder']} · profile {results['profile']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lambda_grid(results: dict[str, Any], path: Path) -> None:
    """Trade-off over λ: forgetting (x) against final average and last-task accuracy (y), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for k, (m, e) in enumerate(results["methods"].items()):
        rows = e.get("lambda_grid") or [{"lambda": e.get("lambda"), "chosen": True, **{key: e.get(key) for key in _GRID_KEYS}}]
        for ax, key in zip(axes[0], ("final_avg_acc", "last_task_acc")):
            xs = [100 * r["forgetting"] for r in rows]
            ys = [100 * r[key] for r in rows]
            line, = ax.plot(xs, ys, marker="osD^v<>"[k % 7], linestyle="-" if len(rows) > 1 else "none", label=m)
            for r, x, y in zip(rows, xs, ys):
                if r["lambda"] is not None:
                    ax.annotate(f"{r['lambda']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=line.get_color(), fontweight="bold" if r["chosen"] else "normal")
    for ax, label in zip(axes[0], ("final average acc@1 (%)", "last-task acc@1 (%)")):
        ax.set_xlabel(f"forgetting ({results['split']}, points; lower is better)")
        ax.set_ylabel(f"{results['split']} {label}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"λ trade-off (labels: λ; bold: chosen on dev) · {results['model']} · profile {results['profile']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ λ selection and budget tuning
def select_lambda(method: str, states: dict[float, dict[str, Any]], run_root: Path) -> dict[str, Any]:
    """The run with the best final average dev accuracy@1 (ties: the smaller λ)."""
    from hf_kfac.el.evaluation import sequence_metrics

    scores = {}
    for lam, st in states.items():
        R = _matrix(st, "dev", "acc1")
        scores[lam] = sequence_metrics(R, start_rows=_start_rows(st))["final_avg_acc"]
    best = max(sorted(scores), key=lambda k: (scores[k] if not math.isnan(scores[k]) else -1, -k))
    chosen = dict(states[best])
    chosen["lambda_selection"] = {f"{k:g}": _clean(v) for k, v in sorted(scores.items())}
    chosen["run_dir"] = str(run_root / f"lambda-{best:g}")
    if _is_main():
        _write_json(run_root / "selected.json", chosen)
    logger.info("[%s] λ on dev: %s -> %g", method, chosen["lambda_selection"], best)
    return chosen


def finished_grid_runs(args: RecipeArguments, method: str, tasks: list[Any], root: Path, splits: list[str],
                       shared: Path, skip: set[float]) -> dict[float, dict[str, Any]]:
    """Complete runs of other λ values under ``root/lambda-*`` made with the same options (e.g. by
    other processes, one grid value each): they take part in the λ selection."""
    found: dict[float, dict[str, Any]] = {}
    for d in sorted(root.glob("lambda-*")):
        path = d / "progress.json"
        if not path.is_file():
            continue
        st = json.loads(path.read_text(encoding="utf-8"))
        lam = st.get("lambda")
        if lam is None or lam in skip or not st.get("complete"):
            continue
        if not MethodRun(args, method, lam, tasks, d, splits, shared).matches(st):
            logger.warning("[%s] %s was run with other options; left out of the λ selection", method, d)
            continue
        logger.info("[%s] λ=%g: finished run found in %s, included in the λ selection", method, lam, d)
        found[lam] = st
    return found


def _budget_key(args: RecipeArguments, tasks: list[Any], i: int, history: list[tuple[float, float]]) -> str:
    """What a grid point's result depends on: data, model and training options, and the budgets chosen
    for the earlier tasks (its starting model)."""
    return _fingerprint(dict(_data_model_keys(args), tasks=[t.name for t in tasks[: i + 1]], prior=args.prior,
                             history=history))


def _wait_for(paths: list[Path], what: str, poll_s: float = 10.0) -> None:
    """Block until every path exists (other workers' grid points), logging every few minutes."""
    t0 = last = time.perf_counter()
    while True:
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            return
        if time.perf_counter() - last > 300 or last == t0:
            logger.info("[budget] %s: waiting for %d grid point(s) of other workers, e.g. %s", what, len(missing),
                        missing[0].parent.name)
            last = time.perf_counter()
        time.sleep(poll_s)


def tune_budget(args: RecipeArguments, tasks: list[Any], out_dir: Path) -> dict[str, Any]:
    """For each task in turn (fine-tuning), the (epochs, learning_rate) with the best dev acc@1 on that task.

    Every grid point is kept in ``budget/task<i>-<name>/epochs-<e>_lr-<lr>/`` (its model and
    ``result.json``), so a stopped search resumes, and ``budget_workers`` processes can share it:
    worker k trains points p with p % n == k, then waits for the others' points of that task; all
    workers pick the same best point (ties: the first in grid order) and go on from its model."""
    import torch

    from hf_kfac.el.collate import ELCollator
    from hf_kfac.el.evaluation import evaluate_task
    from hf_kfac.el.models import load_el_model, predictive_fn_for
    from hf_kfac.trainer import ContinualTrainer

    n_workers, worker = args.budget_workers, args.budget_worker
    if n_workers < 1 or not 0 <= worker < n_workers:
        raise ValueError(f"--budget_worker must be in 0..{n_workers - 1} (--budget_workers {n_workers}), got {worker}")
    grid = budget_grid(args)
    epochs_grid = grid.get("epochs") or per_task(args.epochs, len(tasks), "epochs")[:1]
    lr_grid = grid.get("learning_rate") or per_task(args.learning_rate, len(tasks), "learning_rate")[:1]
    points = [(float(ep), float(lr)) for ep in epochs_grid for lr in lr_grid]
    model, tokenizer = initial_model(args)
    collator = ELCollator.for_tokenizer(tokenizer)
    chosen: dict[str, Any] = {}
    history: list[tuple[float, float]] = []
    for i, task in enumerate(tasks):
        if model.formulation == "classifier":
            add_head(args, model, tokenizer, task)
        ds = train_dataset(args, model, tokenizer, task, seed_offset=i)
        start = copy.deepcopy(model.state_dict())
        key = _budget_key(args, tasks, i, history)
        tdir = out_dir / "budget" / f"task{i}-{task.name}"
        pdirs = [tdir / f"epochs-{ep:g}_lr-{lr:g}" for ep, lr in points]
        for p, ((ep, lr), pdir) in enumerate(zip(points, pdirs)):
            done = pdir / "result.json"
            if done.is_file():
                if json.loads(done.read_text(encoding="utf-8")).get("key") != key:
                    raise ValueError(f"{pdir} holds a budget search made with other options (or another budget for "
                                     "an earlier task); use another --output_dir, or delete its budget/ folder")
                continue
            if p % n_workers != worker:
                continue
            model.load_state_dict(start)
            cfg = continual_config(args, "finetune", 0.0, len(ds), out_dir / f"budget-tmp-{worker}", ep, lr)
            trainer = ContinualTrainer(model=model, args=cfg, train_dataset=ds, data_collator=collator,
                                       predictive_fn=predictive_fn_for(model))
            torch.manual_seed(args.seed + i)
            t0 = time.perf_counter()
            trainer.train()
            res = evaluate_task(model, tokenizer, task, ["dev"], max_items=args.max_eval,
                                item_seed=args.subset_seed, n_boot=100, batch_size=args.eval_batch_size)["dev"]
            took = time.perf_counter() - t0
            logger.info("[budget] %s epochs=%g lr=%g: dev acc@1 %.4f (%.0fs)", task.name, ep, lr, res.acc1, took)
            if _is_main():  # the processes of one (data-parallel) worker hold the same model
                model.save_pretrained(pdir / "model")
                _write_json(done, {"epochs": ep, "learning_rate": lr, "dev_acc1": res.acc1, "seconds": round(took, 1),
                                   "worker": worker, "key": key})
            _wait_for_everyone()
        _wait_for([d / "result.json" for d in pdirs], task.name)
        results = [json.loads((d / "result.json").read_text(encoding="utf-8")) for d in pdirs]
        best = max(range(len(points)), key=lambda p: (results[p]["dev_acc1"], -p))
        model.load_state_dict(load_el_model(pdirs[best] / "model").state_dict())
        ep, lr = points[best]
        history.append((ep, lr))
        chosen[task.name] = {"epochs": ep, "learning_rate": lr, "dev_acc1": results[best]["dev_acc1"],
                             "grid": {d.name: r["dev_acc1"] for d, r in zip(pdirs, results)}}
    _wait_for_everyone()
    result = {"budget": chosen, "epochs": ",".join(f"{v['epochs']:g}" for v in chosen.values()),
              "learning_rate": ",".join(f"{v['learning_rate']:g}" for v in chosen.values())}
    if _is_main():
        shutil.rmtree(out_dir / f"budget-tmp-{worker}", ignore_errors=True)
        if worker == 0:
            _write_json(out_dir / "budget.json", result)
        print(f"epochs: \"{result['epochs']}\"\nlearning_rate: \"{result['learning_rate']}\"")
    return result


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe (or merge runs); returns what results.json holds. Restores torch's thread count."""
    import torch

    threads = torch.get_num_threads()
    token = os.environ.get("HF_TOKEN")
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)
        if token is None:  # --hub_token is set into HF_TOKEN for this run only
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = token


def budget_grid(args: RecipeArguments) -> dict[str, list[float]]:
    """``--tune_budget`` as {"epochs": [...], "learning_rate": [...]} (``lr=`` is ``learning_rate=``)."""
    grid = parse_method_values(args.tune_budget.replace("lr=", "learning_rate="), [], "tune_budget",
                               valid=("epochs", "learning_rate"))
    if not grid:
        raise ValueError(f"--tune_budget {args.tune_budget!r}: name the grid, e.g. 'epochs=1,2;learning_rate=1e-4,2e-4'")
    return grid


def use_hub_token(args: RecipeArguments) -> None:
    """Move ``--hub_token`` into ``HF_TOKEN`` for this process (huggingface_hub reads it on every call)
    and blank the option, so that it reaches no results.json, progress.json or training_args.bin."""
    if args.hub_token:
        os.environ["HF_TOKEN"] = args.hub_token
        args.hub_token = None
        logger.info("--hub_token: used through HF_TOKEN for this process; it is written to no file")


def eval_splits(args: RecipeArguments, methods: list[str], grids: dict[str, list[float]]) -> list[str]:
    """The splits evaluated after each task, in a fixed order (``test,dev`` and ``dev,test`` are one option)."""
    splits = set(_split(args.eval_splits))
    if any(m in grids for m in methods):
        splits.add("dev")
    splits.add(args.report_split)
    return [s for s in ("dev", "test") if s in splits]


def check_eval_items(args: RecipeArguments, tasks: list[Any], splits: list[str]) -> None:
    """Every task has items in every evaluated split (checked before any training)."""
    from hf_kfac.el.evaluation import eval_pairs

    for task in tasks:
        for split in splits:
            if not eval_pairs(task, split, args.max_eval, args.subset_seed):
                raise ValueError(
                    f"task {task.name!r} has no {split} items with --n_concepts {args.n_concepts} and --subset_seed "
                    f"{args.subset_seed} (its sampled concepts have no {split} mentions); raise --n_concepts or try "
                    "another --subset_seed" + ("" if args.require_eval_concepts else
                                               ", or set --require_eval_concepts true"))


def _main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    use_hub_token(args)
    # progress is logged by the main process; the others say only what goes wrong
    quiet = args.quiet or int(os.environ.get("RANK", "0")) != 0
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hf_kfac.recipe").setLevel(logging.WARNING if quiet else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.num_threads:
        import torch

        torch.set_num_threads(int(args.num_threads))
    import transformers

    transformers.logging.set_verbosity_error()
    out_dir = Path(args.output_dir)
    if args.merge_runs:
        states = collect_states([Path(p) for p in args.merge_runs])
        common = _describe_from_runs(args, states)
        config = dict(common or recorded_config(args), report_split=args.report_split)
        results = summarize(args, states, out_dir, {"merged_from": list(args.merge_runs)}, config=config)
        print((out_dir / "results.md").read_text(encoding="utf-8"))
        return results
    t_start = time.perf_counter()
    if args.tune_budget:  # a typo is refused before the tasks are loaded
        budget_grid(args)
    resolve_prior_temperature(args)
    tasks = load_tasks(args)
    for t in tasks:
        logger.info("task %s: %s", t.name, t.stats())
    if args.tune_budget:
        check_eval_items(args, tasks, ["dev"])  # the budget is chosen on dev
        return tune_budget(args, tasks, out_dir)
    methods = _split(args.methods)
    fixed = parse_method_values(args.lambdas, methods, "lambdas")
    grids = parse_method_values(args.lambda_grid, methods, "lambda_grid")
    splits = eval_splits(args, methods, grids)
    check_eval_items(args, tasks, splits)
    several = [m for m, v in fixed.items() if len(v) > 1 and m not in grids]
    if several:
        raise ValueError(f"--lambdas gives {len(fixed[several[0]])} values for {several[0]}: give one per method, "
                         f"or search several on dev with --lambda_grid")
    states: dict[str, dict[str, Any]] = {}
    shared = out_dir / "runs" / "_shared"
    for m in methods:
        if METHOD_PENALTY[m] == "none":
            states[m] = MethodRun(args, m, None, tasks, out_dir / "runs" / m, splits, shared).run()
            states[m]["run_dir"] = str(out_dir / "runs" / m)
            continue
        if m not in grids:
            states[m] = MethodRun(args, m, (fixed.get(m) or [1.0])[0], tasks, out_dir / "runs" / m, splits, shared).run()
            states[m]["run_dir"] = str(out_dir / "runs" / m)
            continue
        root = out_dir / "runs" / m
        per_lam = {lam: MethodRun(args, m, lam, tasks, root / f"lambda-{lam:g}", splits, shared).run() for lam in grids[m]}
        per_lam.update(finished_grid_runs(args, m, tasks, root, splits, shared, skip=set(per_lam)))
        states[m] = select_lambda(m, per_lam, root)
    # the main process writes the results; the others return what it wrote
    results = summarize(args, states, out_dir, {"wall_time_s": round(time.perf_counter() - t_start, 1)}) \
        if _is_main() else None
    _wait_for_everyone()
    if results is None:
        results = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    if args.save_models == "none" and _is_main():
        shutil.rmtree(shared, ignore_errors=True)
    if not args.quiet and _is_main():
        print((out_dir / "results.md").read_text(encoding="utf-8"))
    return results


if __name__ == "__main__":
    main()
