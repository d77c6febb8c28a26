"""Orchestration: the stages glued into the jobs the CLI runs.

``rcomp prune`` = data → model → masks → train → surgery → count → export → attack set → check,
written into an output folder that is published as a whole: everything is built in
``OUT.partial/`` and swapped into ``OUT/`` only when every artifact exists, so an interrupted or
failed job leaves the previous complete folder (or none), never a half-written one. The training
checkpoints live in ``OUT.partial/checkpoints`` while the job runs, which is what ``--resume`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcomp import __version__
from rcomp.config import Field, read_yaml, validate
from rcomp.errors import RcompError
from rcomp.distributed import resolve_device


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything one ``rcomp train`` / ``rcomp prune`` needs, resolved from CLI, recipe and profile."""

    model_name: str
    data_spec: str
    out: Path
    method: str  # intrain | posttrain | rl | dense
    train: Any  # rcomp.train.TrainConfig
    profile: Any = None  # rcomp.config.Profile
    input_shape: tuple[int, int, int] | None = None
    download: bool = False
    resume: bool = False
    attack_set_size: int = 500
    square_queries: int = 100  # the gate's own Square attack (rcomp.export.check.DEFAULT_SQUARE_QUERIES)
    latency_runs: int = 200
    rl_episodes: int | None = None  # --method rl: search episodes (None: rcomp.rl.RLConfig's default)
    arch: Any = None  # rcomp.surgery.Architecture: train these widths densely from fresh weights (--arch-from)
    model_kwargs: dict = field(default_factory=dict)  # --model-kwargs: extra arguments of a non-zoo factory
    model_normalizes: bool = False  # --model-normalizes: the user's module normalizes its input itself
    weights: str | None = None  # --weights: start from this state dict (post-train methods skip their dense phase)
    weights_key: str | None = None  # --weights-key: the state dict's key inside a checkpoint dict


def parse_eps(text: str | float | None, what: str = "--eps") -> float | None:
    """``8/255`` or ``0.0314`` → a float in (0, 1]."""
    if text is None or isinstance(text, float):
        return text
    try:
        if "/" in str(text):
            num, den = str(text).split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise RcompError(f"{what} {text!r}: expected a number like 8/255 or 0.031") from None
    if not 0 < value <= 1:
        raise RcompError(f"{what} {text!r}: must be in (0, 1] (pixel units)")
    return value


def _recipe_schema() -> dict[str, Field]:
    """Recipe YAML keys = TrainConfig's keys (machine settings left out), each with the check its
    group declares (:func:`rcomp.recipe.key_checks`): the same ranges TrainConfig.validate applies."""
    from rcomp.recipe import key_checks
    from rcomp.train import TrainConfig

    return {name: Field(check) for name, check in key_checks(TrainConfig).items()}


def load_recipe(path: str) -> dict:
    """A training recipe: a YAML mapping of TrainConfig keys, unknown keys rejected."""
    data = read_yaml(path)
    if isinstance(data, dict):
        from rcomp.recipe import reject_removed_keys

        reject_removed_keys(data, str(path))
    values = validate(data, _recipe_schema(), source=str(path))
    return {k: v for k, v in values.items() if v is not None}


_CLI_TO_CONFIG = (
    "epochs", "batch_size", "lr_max", "schedule", "attack", "attack_labels", "regularity", "target_ops", "target_params",
    "channel_multiple", "finetune_epochs",
    "target_latency", "latency_table",
    "seed", "hflip",
)


def build_job(opts: dict, *, profile, out: str | None, method: str | None) -> Job:
    """Merge recipe, profile and CLI options into one Job; reject combinations that conflict."""
    from rcomp.models import get_model_info
    from rcomp.train import TrainConfig

    arch = _architecture(opts)
    model_name = arch.model_name if arch else opts.get("model_name") or DEFAULT_MODEL
    model_kwargs = _check_model_ref(model_name, opts)  # unknown model, missing file or factory → exit 2 before any work
    values = load_recipe(opts["recipe"]) if opts.get("recipe") else {}
    for key in _CLI_TO_CONFIG:
        if opts.get(key) is not None:
            values[key] = opts[key]
    if opts.get("eps") is not None:
        values["eps"] = parse_eps(opts["eps"])
    if opts.get("amp"):
        values["amp"] = True
    _apply_data_defaults(values, opts["data_spec"])
    if values.get("regularity") == "none":
        values["regularity"] = None
    _merge_profile_budget(values, profile)
    _merge_latency_budget(values, profile)
    _merge_profile_channel_multiple(values, profile)
    has_budget = any(values.get(k) is not None for k in ("target_ops", "target_params", "mops", "params",
                                                         "target_latency", "latency_p90_ms"))
    method = method or ("intrain" if has_budget else "dense")
    _check_method(method, values, has_budget)
    if arch is not None and method != "dense":
        raise RcompError(f"--arch-from trains a fixed architecture densely, without a budget; got --method {method} "
                         "(drop --target-ops/--target-params, the profile's budgets and --method, or --arch-from)")
    _check_distributed(method)
    if opts.get("rl_episodes") is not None and method != "rl":
        raise RcompError("--rl-episodes applies to --method rl only")
    if method == "intrain":
        values.setdefault("regularity", "channel")
        if values["regularity"] is None:
            values["regularity"] = "channel"
    values.update(device=resolve_device(opts.get("device", "cpu")), num_workers=opts.get("num_workers", 0),
                  progress=not opts.get("no_progress", False))
    config = TrainConfig(**values)
    input_shape = tuple(profile.input_shape[1:]) if profile is not None else _default_input(model_name)
    if arch is not None and tuple(arch.input_shape[-3:]) != tuple(input_shape):
        raise RcompError(f"--arch-from {arch.source} was pruned for inputs {tuple(arch.input_shape[-3:])}, "
                         f"this run trains on {tuple(input_shape)}")
    out_dir = Path(out) if out else Path("runs") / f"{profile.name if profile else 'train'}-{model_name}"
    return Job(model_name, opts["data_spec"], out_dir, method, config, profile, input_shape,
               download=opts.get("download", False), resume=opts.get("resume", False),
               rl_episodes=opts.get("rl_episodes"), arch=arch, model_kwargs=model_kwargs,
               model_normalizes=bool(opts.get("model_normalizes")), weights=opts.get("weights"),
               weights_key=opts.get("weights_key"))


def _check_model_ref(model_name: str, opts: dict) -> dict:
    """The factory kwargs of ``--model``, after checking the reference resolves (zoo name, torchvision
    builder, file and factory, module and factory) and that the model options fit it."""
    from rcomp.models import get_model_info
    from rcomp.models.reference import is_zoo_name, parse_model_kwargs, resolve_factory

    kwargs = parse_model_kwargs(opts.get("model_kwargs"))
    if is_zoo_name(model_name):
        get_model_info(model_name)
        if kwargs or opts.get("model_normalizes"):
            raise RcompError(f"--model-kwargs / --model-normalizes apply to torchvision:NAME and file.py:factory "
                             f"models, not to the zoo's {model_name}")
    else:
        resolve_factory(model_name)
    if opts.get("weights_key") and not opts.get("weights"):
        raise RcompError("--weights-key needs --weights FILE")
    if opts.get("weights") and not Path(opts["weights"]).is_file():
        raise RcompError(f"--weights {opts['weights']}: file not found")
    return kwargs


def _default_input(model_name: str) -> tuple[int, int, int]:
    from rcomp.models import default_input

    return default_input(model_name)


#: --model when neither it nor --arch-from names one.
DEFAULT_MODEL = "resnet20"


def _architecture(opts: dict):
    """--arch-from's widths, with --model (when given) checked against the model they were cut from."""
    if not opts.get("arch_from"):
        return None
    from rcomp.surgery import read_architecture

    arch = read_architecture(opts["arch_from"])
    if opts.get("model_name") and opts["model_name"] != arch.model_name:
        raise RcompError(f"--arch-from {opts['arch_from']} is a pruned {arch.model_name}, not --model {opts['model_name']}")
    return arch


#: Recipe defaults that depend on the data: the 1,617 training digits give 13 steps per epoch at
#: batch 128, too few for the masks to move before the budget freezes them. At batch 32 the whole
#: default run is 510 steps, and the budget's multiplier, wound up while the masks lagged the ramp,
#: carried the main job's ResNet20 on from 0.41 of the ops (epoch 4) to 0.18 (epoch 6, target 0.59)
#: and then, turned negative, pulled channels back on in the epoch of the freeze, whose validation
#: accuracy fell to 9 %. With the anti-windup reset the run is back at the target after epoch 5 and
#: keeps 97 % through the freeze, to the same final widths (README's main-job section). CIFAR-10
#: runs keep rcomp's default (off), which the benchmark rows were trained with.
_SMALL_DATA = {"batch_size": 32, "dual_reset": True}
_DATA_DEFAULTS = {"digits": _SMALL_DATA, "synthetic": _SMALL_DATA}


def _apply_data_defaults(values: dict, data_spec: str) -> None:
    kind = str(data_spec).split(":", 1)[0]
    for key, value in _DATA_DEFAULTS.get(kind, {}).items():
        values.setdefault(key, value)


def _merge_profile_budget(values: dict, profile) -> None:
    """The shipped model must meet the profile, so its budgets join any CLI target (tightest wins)."""
    if profile is None:
        return
    b = profile.budgets
    for key, frac in (("target_ops", b.ops_fraction), ("target_params", b.params_fraction)):
        if frac is not None:
            values[key] = min(frac, values[key]) if values.get(key) is not None else frac
    if b.mops is not None:
        values["mops"] = b.mops
    if b.params is not None:
        values["params"] = b.params


def _merge_latency_budget(values: dict, profile) -> None:
    """With a latency table, the profile's latency_p90_ms becomes a training budget too; the table
    must come from this onnxruntime and this profile (else exit 2, before any training)."""
    if values.get("latency_table") is None:
        if values.get("target_latency") is not None:
            raise RcompError("--target-latency needs --latency-table (measure one with rcomp latency-table)")
        return
    from rcomp.budget import load_latency_table

    load_latency_table(values["latency_table"], profile)
    if profile is not None and profile.budgets.latency_p90_ms is not None:
        values["latency_p90_ms"] = profile.budgets.latency_p90_ms
    if values.get("target_latency") is None and values.get("latency_p90_ms") is None:
        raise RcompError("--latency-table needs a latency budget: --target-latency or a --profile with budgets.latency_p90_ms")


def _merge_profile_channel_multiple(values: dict, profile) -> None:
    """The target's preferred channel multiple, unless the CLI or the recipe set one (weight masks have no widths)."""
    if profile is not None and profile.target.channel_multiple > 1 and values.get("regularity") != "weight":
        values.setdefault("channel_multiple", profile.target.channel_multiple)


#: The methods that train dense, prune once, then fine-tune: they remove their channels themselves,
#: charge a resumed phase its logged epochs, and alone take --finetune-epochs.
POST_METHODS = ("posttrain", "rl")
#: The methods that prune, so need a budget: in-train (the poster) first.
BUDGETED_METHODS = ("intrain", *POST_METHODS)
#: Every --method the CLI offers.
METHODS = (*BUDGETED_METHODS, "dense")


def _check_method(method: str, values: dict, has_budget: bool) -> None:
    if method == "dense" and has_budget:
        raise RcompError("--method dense takes no budget: drop --target-ops/--target-params/--profile budgets, or use --method intrain")
    if method in BUDGETED_METHODS and not has_budget:
        raise RcompError(f"--method {method} needs a budget: --target-ops, --target-params or a --profile with budgets")
    if method in POST_METHODS and values.get("regularity") == "weight":
        raise RcompError(f"--method {method} prunes channels; --regularity weight is in-train only")
    if method == "intrain" and "regularity" in values and values["regularity"] is None and has_budget:
        raise RcompError("--regularity none conflicts with a pruning budget")
    if values.get("finetune_epochs") is not None and method not in POST_METHODS:
        raise RcompError("--finetune-epochs applies to the post-train methods (--method posttrain or rl) only")


def _check_distributed(method: str) -> None:
    """Under torchrun only the single training loop (intrain, dense) is data-parallel."""
    from rcomp.distributed import world

    if world().active and method not in ("intrain", "dense"):
        raise RcompError(f"--method {method} does not run under torchrun (WORLD_SIZE > 1); "
                         "use --method intrain or dense, or a single process")


def recipe_hash(config) -> str:
    """A short stable hash of the training recipe (machine settings excluded), for ONNX metadata."""
    recipe = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("device", "progress", "num_workers")}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Output folder published as a whole
# --------------------------------------------------------------------------------------------


class StagedOutput:
    """Builds ``OUT.partial/`` and swaps it into ``OUT/`` when complete.

    Used as a context manager for the life of a job: it checks OUT before any work (an existing
    file there is an error, never moved aside), holds OUT's lock (a second job on OUT exits 2 at
    once, rcomp.guards.OutputLock), and on a failure removes a ``OUT.partial/`` that holds no file,
    while one with checkpoints stays for ``--resume``.
    """

    def __init__(self, out: Path, resume: bool):
        from rcomp.distributed import is_main
        from rcomp.guards import OutputLock, check_output_dir

        self.final = Path(out)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.owner = is_main()  # under torchrun rank 0 alone touches the folder
        self.lock = None
        if not self.owner:
            return
        check_output_dir(self.final)
        self.lock = OutputLock(self.final).acquire()
        try:
            self._prepare(resume)
        except BaseException:
            self.lock.release()
            raise

    def _prepare(self, resume: bool) -> None:
        if self.partial.exists() and not resume:
            if any(self.partial.glob("**/ckpt-*.pt")):
                raise RcompError(f"{self.partial} holds an interrupted run: pass --resume to continue it, or delete it")
            shutil.rmtree(self.partial)  # a failed start with nothing worth resuming
        if resume and not self.partial.exists() and (self.final / "checkpoints").is_dir():
            shutil.copytree(self.final / "checkpoints", self.partial / "checkpoints")
        self.partial.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.partial / name

    def publish(self) -> Path:
        if not self.owner:
            return self.final
        old = self.final.with_name(self.final.name + ".previous")
        if old.exists():
            shutil.rmtree(old)
        if self.final.exists():
            os.rename(self.final, old)
        os.rename(self.partial, self.final)
        if old.exists():
            shutil.rmtree(old)
        return self.final

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Release the lock; after a failure drop an ``OUT.partial/`` with nothing in it to resume."""
        try:
            if exc_type is not None and self.owner and self.partial.is_dir() and not _holds_files(self.partial):
                shutil.rmtree(self.partial, ignore_errors=True)
        finally:
            if self.lock is not None:
                self.lock.release()


def _holds_files(folder: Path) -> bool:
    return any(p.is_file() for p in folder.rglob("*"))


# --------------------------------------------------------------------------------------------
# train / prune
# --------------------------------------------------------------------------------------------


@dataclass
class TrainOutcome:
    out: Path
    checkpoint: Path
    pruned: Any
    dense_model: Any
    bundle: Any
    result: Any
    cost: Any = None
    dense_cost: Any = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        last = self.result.history[-1] if self.result.history else None
        lines = [f"model written to {self.checkpoint}"]
        if last is not None:
            lines.append(
                f"final epoch {last.epoch}: val clean {last.val_clean:.2%}  val PGD {last.val_pgd:.2%}"
            )
        if self.cost is not None:
            lines.append(f"fvcore: {self.cost.macs / 1e6:.3f} MOps, {self.cost.params:,} params "
                         f"({self.cost.macs / self.dense_cost.macs:.3f} / {self.cost.params / self.dense_cost.params:.3f} of dense)")
        for event in self.result.co_events:
            lines.append(f"warning: {event}")
        return "\n".join(lines)


def _build_model(job: Job, bundle):
    """The model a job trains: the zoo model, or with ``--arch-from`` its pruned widths, cut from
    the very initial weights the zoo model of the same seed starts from (so a from-scratch run and
    the pruning run of that architecture began from the same numbers on the units both keep)."""
    model = _zoo_model(job, bundle)
    _check_and_load_weights(job, bundle, model)
    if job.arch is not None:
        import torch

        from rcomp.surgery import apply_pruning

        apply_pruning(model, job.arch.pruned_channels, torch.zeros(1, *bundle.input_shape))
    return model


def _groups_left_alone(job: Job, bundle, model, log) -> list[str]:
    """The coupled channel groups a channel-pruning run leaves unpruned as unsafe (LayerNorm, grouped
    convs, channel shuffle ...; see rcomp.masks.classify_channel_groups), logged and kept in train.json."""
    if job.arch is not None or not (job.method in POST_METHODS or job.train.regularity == "channel"):
        return []
    import torch

    from rcomp.masks import classify_channel_groups
    from rcomp.models.reference import is_zoo_name

    if is_zoo_name(job.model_name):
        return []  # every group of the zoo's models is prunable: no second graph trace for them
    _, skipped = classify_channel_groups(model, torch.rand(1, *bundle.input_shape))
    lines = [f"{name} ({why})" for name, why in skipped]
    if lines:
        log(f"pruning: {len(lines)} coupled channel group(s) left alone (not prunable exactly): " + "; ".join(lines[:6])
            + (f"; and {len(lines) - 6} more" if len(lines) > 6 else ""))
    return lines


def _check_and_load_weights(job: Job, bundle, model) -> None:
    """A non-zoo model must map a batch to ``[N, classes]`` logits; ``--weights`` are loaded by name
    and shape (exit 2 naming what does not fit). Both before any output is written."""
    from rcomp.models.reference import check_logits, is_zoo_name, load_weights

    if not is_zoo_name(job.model_name):
        check_logits(model, bundle.input_shape, bundle.num_classes, job.model_name)
    if job.weights:
        load_weights(model, job.weights, job.weights_key)


def _zoo_model(job: Job, bundle):
    """The zoo model, its initial weights drawn from ``job.train.seed``.

    torch (2.14 here) seeds its global generator randomly at start-up, and the trainer seeds only
    after it gets the model, so without this every process started from other weights: two runs of
    one command differed from their first epoch on, and ``--seed`` decided the data order but not
    the init.
    """
    import torch

    from rcomp.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.train.seed)
        return create_model(job.model_name, bundle.num_classes, bundle.input_shape[0], bundle.mean, bundle.std,
                            **_factory_options(job))


def _factory_options(job: Job) -> dict:
    """create_model's options for a non-zoo model (none for the zoo: its checkpoints stay as they were)."""
    if not job.model_kwargs and not job.model_normalizes:
        return {}
    return {"factory_kwargs": dict(job.model_kwargs), "normalizes": bool(job.model_normalizes)}


def load_job_data(job: Job, log=print):
    """The data, loaded (and so validated) before anything is written to the output folder."""
    from rcomp.data import load_data

    from rcomp.distributed import is_main, main_only

    bundle = load_data(job.data_spec, job.input_shape, download=job.download, progress=job.train.progress and is_main())
    log = main_only(log)
    for note in bundle.notes:
        log(f"data: {note}")
    return bundle


def _train_stage(job: Job, bundle, staged: StagedOutput, log=print) -> TrainOutcome | None:
    """Train (in-train, post-train, RL post-train or dense), remove pruned channels, save ``model.pt`` and ``train.json``."""
    import torch

    from rcomp.count import count_model
    from rcomp.reports import write_json_atomic
    from rcomp.surgery import save_pruned

    model = _build_model(job, bundle)
    left_alone = _groups_left_alone(job, bundle, model, log)
    started = time.perf_counter()
    result = _run_method(job, bundle, model, staged, log)
    process_seconds = wall = time.perf_counter() - started
    if job.method in POST_METHODS:  # their phases charge a resumed or shared phase its logged epochs
        wall = result.phase_seconds["total"]
    else:
        from rcomp.train import train_seconds

        wall = train_seconds(result, wall)
    if not staged.owner:
        return None  # torchrun: the other ranks hold rank 0's weights; rank 0 writes the outputs
    pruned = _physically_pruned(job, result, torch.rand(1, *bundle.input_shape))
    shape = (1, *bundle.input_shape)
    dense_model = _zoo_model(job, bundle)  # the dense architecture: reference count and latency
    cost, dense_cost = count_model(pruned.model, shape), count_model(dense_model, shape)
    extra = {
        "model": job.model_name, "method": job.method, "data": job.data_spec, "recipe": _plain(dataclasses.asdict(job.train)),
        "recipe_hash": recipe_hash(job.train), "dense_macs": dense_cost.macs, "dense_params": dense_cost.params,
        "macs": cost.macs, "params": cost.params, "wall_seconds": wall, "process_seconds": process_seconds,
        "classes": list(bundle.classes), **({"groups_left_alone": left_alone} if left_alone else {}),
        "rcomp_version": __version__, **({"arch_from": job.arch.source} if job.arch else {}),
    }
    checkpoint = staged.path("model.pt")
    save_pruned(checkpoint, pruned, model_name=job.model_name, model_kwargs=_model_kwargs(bundle, job),
                input_shape=tuple(bundle.input_shape), extra=extra)
    write_json_atomic(staged.path("train.json"), {
        **extra, "history": [_plain(dataclasses.asdict(h)) for h in result.history],
        "co_events": list(result.co_events), "budget": _plain(result.budget_status),
        "projection": _plain(result.projection), "count": cost.to_dict(), "dense_count": dense_cost.to_dict(),
        "resumed_from": result.resumed_from, "sparsity": pruned.sparsity, "regularity": pruned.regularity,
        "dense_history": _plain(getattr(result, "dense_history", [])),
        "phase_seconds": _plain(getattr(result, "phase_seconds", {})),
        **({"rl_search": _plain(result.search)} if job.method == "rl" else {}),
    })
    return TrainOutcome(staged.final, staged.final / "model.pt", pruned, dense_model, bundle, result,
                        cost, dense_cost, extra)


def _run_method(job: Job, bundle, model, staged: StagedOutput, log):
    """The job's method from its first (or resumed) epoch to a trained model; checkpoints go to the partial folder."""
    if job.method == "posttrain":
        from rcomp.posttrain import train_posttrain

        return train_posttrain(job.train, bundle, model, model_name=job.model_name, model_kwargs=_model_kwargs(bundle, job),
                               out_dir=staged.partial, resume=job.resume, log=log, pretrained=bool(job.weights))
    if job.method == "rl":
        from rcomp.rl import RLConfig, train_rl

        rl = RLConfig(seed=job.train.seed, **({"episodes": job.rl_episodes} if job.rl_episodes is not None else {}))
        return train_rl(job.train, bundle, model, model_name=job.model_name, model_kwargs=_model_kwargs(bundle, job),
                        out_dir=staged.partial, resume=job.resume, log=log, rl=rl, pretrained=bool(job.weights))
    from rcomp.train import train

    return train(job.train, bundle, model, out_dir=staged.partial, resume=job.resume, log=log)


def _physically_pruned(job: Job, result, example):
    """The trained model as it ships: zero-mask channels removed (in-train), weight masks folded in,
    or as trained (the post-train methods removed their channels already, and so did in-train
    training with ``slim_at_freeze``; dense has none; an ``--arch-from`` run has its checkpoint's)."""
    from rcomp.surgery import PrunedModel, fold_weight_masks, remove_channels, weight_sparsity

    trained = result.model.cpu().eval()
    if job.arch is not None:  # trained in its pruned shape: the removals rebuild it from the zoo model
        return PrunedModel(trained, list(job.arch.pruned_channels), "channel", 0.0)
    post = job.method in POST_METHODS
    if post or job.train.regularity is None:
        return PrunedModel(trained, list(result.pruned_channels or []), "channel" if post else "dense", 0.0)
    if job.train.regularity == "channel" and result.pruned_channels is not None:
        return PrunedModel(trained, list(result.pruned_channels), "channel", weight_sparsity(trained))
    if job.train.regularity == "channel":
        return remove_channels(trained, example)
    return fold_weight_masks(trained)


def _model_kwargs(bundle, job: Job | None = None) -> dict:
    """create_model's arguments as the checkpoint stores them: a foreign model's factory kwargs and
    normalization flag too, so ``load_pruned`` rebuilds it by importing the same code."""
    return {"num_classes": int(bundle.num_classes), "in_channels": int(bundle.input_shape[0]),
            "mean": [float(v) for v in bundle.mean], "std": [float(v) for v in bundle.std],
            **(_factory_options(job) if job is not None else {})}


def _plain(obj):
    """JSON-safe copy (tuples → lists, tensors → numbers) of results headed for a report."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def run_train(job: Job) -> TrainOutcome | None:
    with StagedOutput(job.out, job.resume) as staged:  # checked and locked before the data loads
        bundle = load_job_data(job)
        outcome = _train_stage(job, bundle, staged)
        staged.publish()
    return outcome


@dataclass
class PruneJobOutcome:
    """What ``rcomp prune`` produced: the published folder, its training stage and the check's report
    (not :class:`rcomp.posttrain.PruneOutcome`, which is one post-train pruning step's result)."""

    out: Path
    train: TrainOutcome
    report: Any
    passed: bool

    def summary(self) -> str:
        return "\n".join([
            self.train.summary().replace(str(self.train.out / "model.pt"), str(self.out / "model.pt")),
            "",
            self.report.to_text(),
            "",
            f"artifacts in {self.out}/: model.pt model.onnx dense.onnx adv.npz count.json train.json report.json report.md"
            + (" model.fp32.onnx (model.onnx is INT8)" if (self.out / "model.fp32.onnx").is_file() else ""),
            "verdict: " + ("PASS" if self.passed else "FAIL"),
        ])


def run_prune(job: Job, log=print) -> PruneJobOutcome | None:
    """The whole pipeline against ``job.profile``; the exit code follows the check."""
    with StagedOutput(job.out, job.resume) as staged:  # checked and locked before the data loads
        return _prune_into(job, staged, log)


def _prune_into(job: Job, staged: StagedOutput, log) -> PruneJobOutcome | None:
    """run_prune's stages, inside its locked output folder."""
    from rcomp.export.check import run_check
    from rcomp.reports import write_json_atomic, write_text_atomic

    bundle = load_job_data(job, log)
    outcome = _train_stage(job, bundle, staged, log)
    if outcome is None:  # torchrun, rank > 0: training is done, rank 0 exports and checks
        return None
    profile = job.profile
    write_json_atomic(staged.path("count.json"), {"pruned": outcome.cost.to_dict(), "dense": outcome.dense_cost.to_dict()})
    with export_errors_explained(job.model_name):
        _export_pair(outcome, job, staged)
    x, y = _validation_tensors(outcome.bundle, job.attack_set_size)
    sanity = _attack_set_and_sanity(outcome.pruned.model, x, y, profile, staged.path("adv.npz"))
    if profile.target.precision == "int8":  # issue 51: model.onnx becomes the INT8 model, the float one model.fp32.onnx
        _ship_int8(outcome, job, staged, log)
    log("checking under onnxruntime ...")
    report = run_check(str(staged.path("model.onnx")), profile, attack_set=str(staged.path("adv.npz")),
                       square_queries=job.square_queries, latency_runs=job.latency_runs,
                       dense_onnx=str(staged.path("dense.onnx")))
    report.onnx_path = str(staged.final / "model.onnx")  # the reports name the published file, not the staging one
    doc = report.to_dict()
    doc.update(training=_training_summary(outcome), sanity=sanity.to_dict())
    if getattr(job.train, "latency_table", None) is not None:
        doc["latency_prediction"] = _latency_prediction(job, staged, report)
    write_json_atomic(staged.path("report.json"), doc)
    write_text_atomic(staged.path("report.md"), _report_markdown(report, outcome, sanity))
    staged.publish()
    return PruneJobOutcome(staged.final, outcome, report, bool(report.passed))


def _latency_prediction(job: Job, staged: StagedOutput, report) -> dict:
    """The latency table's prediction for the exported model next to the check's measurement (p50)."""
    from rcomp.export import latency_table as lt

    table = lt.load_table(job.train.latency_table)
    onnx_path = staged.path("model.fp32.onnx") if staged.path("model.fp32.onnx").is_file() else staged.path("model.onnx")
    out = {"table": str(job.train.latency_table), "predicted_p50_ms": lt.predict_onnx(table, onnx_path),
           "predicted_dense_p50_ms": lt.dense_ms(table), "calibration_scale": lt.scale_of(table),
           "table_measured_on": table["measured_on"]["host"], "model": onnx_path.name}
    measured = report.latency.get("model")
    if measured:
        out["measured_p50_ms"] = measured["p50_ms"]
        out["error"] = out["predicted_p50_ms"] / measured["p50_ms"] - 1.0
    if report.latency.get("dense"):
        out["measured_dense_p50_ms"] = report.latency["dense"]["p50_ms"]
    return out


@contextlib.contextmanager
def export_errors_explained(model_name: str):
    """torch's ONNX exporter fails on some layers of foreign models (an adaptive pool whose output does
    not divide its input, an op without a symbolic): exit 2 with the exporter's one line, not a traceback."""
    import torch

    try:
        yield
    except torch.onnx.errors.OnnxExporterError as exc:
        text = " ".join(str(exc).split())[:200]
        raise RcompError(f"ONNX export of {model_name} failed ({type(exc).__name__}: {text}); try another input size "
                         "(--profile input_shape) or opset, or replace the layer") from None


def _export_pair(outcome: TrainOutcome, job: Job, staged: StagedOutput) -> None:
    """The pruned model and, for the latency ratio, the dense architecture, at the profile's opset."""
    from rcomp.export.onnx_export import export_onnx, parity
    import torch

    shape = tuple(job.profile.input_shape)
    meta = _onnx_metadata(outcome, job.profile.name)
    export_onnx(outcome.pruned.model, shape, staged.path("model.onnx"), opset=job.profile.opset, metadata=meta)
    x, _ = _validation_tensors(outcome.bundle, 64)
    parity(outcome.pruned.model, staged.path("model.onnx"), x)
    dense_meta = dict(meta, **{"mops": f"{outcome.dense_cost.macs / 1e6:.6f}", "params": str(outcome.dense_cost.params),
                               "note": "dense reference architecture (untrained weights), for the latency ratio"})
    export_onnx(outcome.dense_model.eval(), shape, staged.path("dense.onnx"), opset=job.profile.opset, metadata=dense_meta)
    del torch


def _ship_int8(outcome: TrainOutcome, job: Job, staged: StagedOutput, log) -> None:
    """``target.precision: int8``: quantize the exported model (rcomp.export.quantize, MinMax on 256
    training images, seed 0) to ``model.onnx``; the float export stays beside it as ``model.fp32.onnx``,
    which the check finds (by the INT8 file's metadata, verified by sha256) for agreement and latency."""
    from rcomp.export.quantize import DEFAULT_CALIBRATION_SIZE, calibration_from_bundle, quantize_onnx

    fp32 = staged.path("model.fp32.onnx")
    os.replace(staged.path("model.onnx"), fp32)
    x, note = calibration_from_bundle(outcome.bundle, DEFAULT_CALIBRATION_SIZE, 0, job.data_spec)
    log(quantize_onnx(fp32, staged.path("model.onnx"), x, calibration_note=note).summary())


def _onnx_metadata(outcome: TrainOutcome, profile_name: str) -> dict[str, str]:
    e = outcome.extra
    return {
        "version": __version__, "base_model": e["model"],
        "mops": f"{e['macs'] / 1e6:.6f}", "params": str(e["params"]), "dense_mops": f"{e['dense_macs'] / 1e6:.6f}",
        "dense_params": str(e["dense_params"]), "profile": profile_name, "recipe_hash": e["recipe_hash"],
        "method": e["method"], "regularity": outcome.pruned.regularity, "sparsity": f"{outcome.pruned.sparsity:.6f}",
    }


def _validation_tensors(bundle, n: int):
    """The first ``n`` images of a fixed seeded validation subset, as one batch."""
    import torch

    from rcomp.data import fixed_subset

    subset = fixed_subset(bundle.split("val"), min(n, len(bundle.split("val"))), seed=0)
    xs, ys = zip(*(subset[i] for i in range(len(subset))))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _attack_set_and_sanity(model, x, y, profile, path: Path):
    """PGD examples crafted on the PyTorch model (shipped as ``adv.npz``) and the sanity checks; the
    attack's random start is seeded, so one model always ships the same attack set."""
    import torch

    from rcomp.attacks import pgd
    from rcomp.export.check import make_attack_set
    from rcomp.sanity import run_sanity

    rob = profile.robustness
    eps = rob.eps if rob is not None else 8 / 255
    steps = rob.pgd_steps if rob is not None else 10
    step_size = (rob.pgd_step_size if rob is not None and rob.pgd_step_size else eps / 4)
    model = model.eval()
    x_adv = pgd(model, x, y, eps=eps, alpha=step_size, steps=steps, generator=torch.Generator().manual_seed(0))
    make_attack_set(str(path), x.numpy(), y.numpy(), x_adv.detach().numpy(), eps, f"pgd-{steps}")
    n = min(len(x), 200)
    return run_sanity(model, x[:n], y[:n], eps=eps)


def _training_summary(outcome: TrainOutcome) -> dict:
    last = outcome.result.history[-1] if outcome.result.history else None
    return {
        "method": outcome.extra["method"], "epochs": len(outcome.result.history),
        "final": _plain(dataclasses.asdict(last)) if last else None,
        "co_events": list(outcome.result.co_events), "wall_seconds": outcome.extra["wall_seconds"],
        "regularity": outcome.pruned.regularity, "sparsity": outcome.pruned.sparsity,
        "macs": outcome.cost.macs, "params": outcome.cost.params,
        "dense_macs": outcome.dense_cost.macs, "dense_params": outcome.dense_cost.params,
    }


def _report_markdown(report, outcome: TrainOutcome, sanity) -> str:
    parts = [report.to_markdown(), "", "## Training", ""]
    t = _training_summary(outcome)
    parts.append(f"- method {t['method']}, {t['epochs']} epochs, {t['wall_seconds']:.0f} s")
    parts.append(f"- {t['macs'] / 1e6:.3f} MOps / {t['dense_macs'] / 1e6:.3f} dense "
                 f"({t['macs'] / t['dense_macs']:.3f}); {t['params']:,} / {t['dense_params']:,} params")
    if outcome.pruned.regularity == "weight":
        parts.append(f"- weight sparsity {t['sparsity']:.1%}: dense runtimes do not get faster from irregular zeros")
    for event in t["co_events"]:
        parts.append(f"- **catastrophic overfitting guard fired:** {event}")
    parts += ["", "## Attack sanity checks (PyTorch model)", "", "```", sanity.to_text(), "```", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# count / export / eval commands
# --------------------------------------------------------------------------------------------


def _load_any_model(ref: str, shape, num_classes: int, factory_kwargs: dict | None = None, normalizes: bool = False):
    """A checkpoint path (pruned model + its metadata) or a model reference (zoo name, torchvision:NAME,
    file.py:factory; dense, random weights)."""
    from rcomp.models import create_model, default_input
    from rcomp.models.reference import check_logits, is_zoo_name

    from rcomp.surgery import load_pruned

    if Path(ref).is_file() or ref.endswith(".pt"):
        model, meta = load_pruned(ref)
        return model, meta, tuple(meta["input_shape"])
    chw = tuple(shape[1:]) if shape else default_input(ref)
    options = {"factory_kwargs": factory_kwargs, "normalizes": normalizes} if factory_kwargs or normalizes else {}
    model = create_model(ref, num_classes, chw[0], **options)
    if not is_zoo_name(ref):
        check_logits(model, chw, num_classes, ref)
    return model, {"model_name": ref, "extra": {}}, chw


def count_command(ref: str, shape, num_classes: int, profile_ref: str | None, json_out: str | None,
                  model_kwargs: str | None = None, model_normalizes: bool = False):
    from rcomp.config import resolve_profile
    from rcomp.count import count_model
    from rcomp.reports import render_table, write_json_atomic

    profile = resolve_profile(profile_ref) if profile_ref else None
    if shape is None and profile is not None:
        shape = tuple(profile.input_shape)
    from rcomp.models.reference import parse_model_kwargs

    model, meta, chw = _load_any_model(ref, shape, num_classes, parse_model_kwargs(model_kwargs), model_normalizes)
    shape = shape or (1, *chw)
    report = count_model(model, shape)
    text = [report.to_table()]
    verdicts = _count_verdicts(report, meta.get("extra", {}), profile) if profile else []
    passed = all(v["passed"] is not False for v in verdicts)
    if verdicts:
        text += ["", f"profile {profile.name}:", render_table(verdicts, ["budget", "value", "limit", "verdict"])]
    if json_out:
        write_json_atomic(json_out, {"model": ref, "input_shape": list(shape), **report.to_dict(), "verdicts": verdicts})
    return "\n".join(text), passed


def _count_verdicts(report, extra: dict, profile) -> list[dict]:
    b = profile.budgets
    dense_macs, dense_params = extra.get("dense_macs", report.macs), extra.get("dense_params", report.params)
    rows = []

    def row(name, value, limit):
        if limit is None:
            return
        ok = value <= limit
        rows.append({"budget": name, "value": round(value, 6), "limit": limit, "verdict": "pass" if ok else "FAIL", "passed": ok})

    row("mops", report.macs / 1e6, b.mops)
    row("params", report.params, b.params)
    row("ops_fraction", report.macs / dense_macs, b.ops_fraction)
    row("params_fraction", report.params / dense_params, b.params_fraction)
    if b.latency_p90_ms is not None:
        rows.append({"budget": "latency_p90_ms", "value": None, "limit": b.latency_p90_ms,
                     "verdict": "not measured here (rcomp check)", "passed": None})
    return rows


def export_command(checkpoint: str, profile_ref, out: str, opset, parity_data, parity_n) -> str:
    import torch

    from rcomp.config import resolve_profile
    from rcomp.count import count_model
    from rcomp.export.onnx_export import export_onnx, parity
    from rcomp.surgery import load_pruned

    profile = resolve_profile(profile_ref) if profile_ref else None
    model, meta = load_pruned(checkpoint)
    chw = tuple(meta["input_shape"])
    shape = tuple(profile.input_shape) if profile else (1, *chw)
    if tuple(shape[1:]) != chw:
        raise RcompError(f"profile input {list(shape)} does not match the model's training input {list(chw)}")
    opset = opset or (profile.opset if profile else 17)
    cost = count_model(model, shape)
    extra = meta.get("extra", {})
    metadata = {
        "version": __version__, "base_model": meta["model_name"], "mops": f"{cost.macs / 1e6:.6f}",
        "params": str(cost.params), "dense_mops": f"{extra.get('dense_macs', cost.macs) / 1e6:.6f}",
        "dense_params": str(extra.get("dense_params", cost.params)), "profile": profile.name if profile else "",
        "recipe_hash": str(extra.get("recipe_hash", "")), "regularity": str(meta.get("regularity", "")),
    }
    export_onnx(model.eval(), shape, out, opset=opset, metadata=metadata)
    if parity_data:
        from rcomp.data import load_data

        bundle = load_data(parity_data, chw)
        xs = [bundle.split("val")[i][0] for i in range(min(parity_n, len(bundle.split("val"))))]
        x = torch.stack(xs)
    else:
        x = torch.rand(parity_n, *chw, generator=torch.Generator().manual_seed(0))
    par = parity(model.eval(), out, x)
    return (f"wrote {out} (opset {opset}, input {list(shape)}, {cost.macs / 1e6:.3f} MOps, {cost.params:,} params)\n"
            f"parity vs PyTorch on {par.n} inputs: max |diff| {par.max_abs_diff:.2e}, top-1 agreement {par.top1_agreement:.2%}")


#: Seed of the images ``rcomp eval --n`` picks: every model of a comparison sees the same ones.
EVAL_SUBSET_SEED = 0


def eval_subset(dataset, limit: int | None):
    """The whole split, or a fixed random subset of ``limit`` images of it.

    Not the first ``limit``: image folders list their images class by class, so a prefix of a
    split is one or two classes (the first 500 of the CIFAR-10 validation split are all airplanes).
    """
    from rcomp.data import fixed_subset

    if limit is None or limit >= len(dataset):
        return dataset
    return fixed_subset(dataset, limit, EVAL_SUBSET_SEED)


#: ``rcomp eval``'s robust accuracy over every attack it ran: an image counts only if the model
#: classifies it correctly clean and under each attack. Two attacks with different random starts
#: each miss some images the other finds (PGD-50 with restarts can score above PGD-10 on the same
#: images), so the per-image minimum is the honest figure for a robustness floor.
WORST_CASE = "worst-case"


@dataclass
class EvalRequest:
    """What ``rcomp eval`` measures: one saved model, one split, PGD-``pgd_steps`` and optionally PGD-50."""

    checkpoint: str
    data_spec: str = "digits"
    split: str = "val"
    limit: int | None = None          # a fixed random subset of this many images (see eval_subset)
    eps: str = "8/255"
    pgd_steps: int = 10
    pgd_step_size: str = "2/255"
    restarts: int = 1                 # of the PGD-50 attack
    pgd50: bool = False
    sanity: bool = False
    batch_size: int = 256
    device: str = "cpu"
    json_out: str | None = None
    progress: bool = True
    seed: int = 0                     # the attacks' random starts: a re-run repeats every figure
    autoattack: str | None = None     # fast | standard: AutoAttack beside PGD (rcomp.autoattack)

    def attacks(self) -> dict[str, dict]:
        attacks = {f"pgd-{self.pgd_steps}": dict(steps=self.pgd_steps, restarts=1)}
        if self.pgd50:
            attacks[f"pgd-50x{self.restarts}"] = dict(steps=50, restarts=self.restarts)
        return attacks


def _eval_attacks(req: EvalRequest, eps: float, alpha: float, num_classes: int) -> dict:
    """``rcomp eval``'s attacks by name, as callables of the one evaluation loop: PGD from one seeded
    generator (a re-run repeats every figure), then AutoAttack when asked."""
    from functools import partial

    import torch

    from rcomp.attacks import pgd

    generator = torch.Generator().manual_seed(req.seed)
    attacks = {name: partial(pgd, eps=eps, alpha=alpha, generator=generator, **kw) for name, kw in req.attacks().items()}
    if req.autoattack:
        from rcomp.autoattack import autoattack_examples

        attacks[f"autoattack-{req.autoattack}"] = partial(autoattack_examples, eps=eps, num_classes=num_classes,
                                                          version=req.autoattack, seed=req.seed)
    return attacks


def per_class_accuracy(res, classes: list[str]) -> dict[str, dict]:
    """Per class: its image count and its accuracy clean, under each attack and in the worst case.

    Imbalanced data (GTSRB: 210 to 2,250 training images per class) can hide a class the model
    never gets right behind a good mean, and a sign class it fails on is a safety finding.
    """
    import torch

    figures = {name: res.per_class(name, len(classes)) for name in res.correct}
    seen = torch.bincount(res.labels, minlength=len(classes)).tolist()
    worst = torch.bincount(res.labels[res.all_of()], minlength=len(classes)).tolist()
    return {cls: {"n": seen[i], **{name: acc[i] for name, acc in figures.items()},
                  WORST_CASE: worst[i] / seen[i] if seen[i] else None}
            for i, cls in enumerate(classes) if seen[i]}


def worst_class_line(per_class: dict[str, dict]) -> str:
    """The class with the lowest clean accuracy, and its figures: the line a reviewer looks for."""
    if not per_class:
        return "worst class: none (no images)"
    name, fig = min(per_class.items(), key=lambda kv: (kv[1]["clean"], kv[1][WORST_CASE]))
    others = ", ".join(f"{k} {v:.2%}" for k, v in fig.items() if k not in ("n", "clean"))
    return f"worst class: {name} ({fig['n']} images): clean {fig['clean']:.2%}, {others}"


def _require_model_classes(bundle, meta: dict, checkpoint: str) -> None:
    """Data with more classes than the model has outputs cannot be scored (its labels index past
    the logits): bad input, said before any image is attacked."""
    classes = meta.get("model_kwargs", {}).get("num_classes")
    if classes is not None and bundle.num_classes > int(classes):
        raise RcompError(f"{checkpoint}: the model has {classes} classes, {bundle.name} has {bundle.num_classes}; "
                         "evaluate it on data of the classes it was trained on")


def eval_command(req: EvalRequest) -> str:
    """Evaluate ``req.checkpoint``; the table as text, the figures also as JSON when ``req.json_out`` is set."""
    import torch

    from rcomp.attacks import evaluate_examples
    from rcomp.data import load_data
    from rcomp.reports import render_table, write_json_atomic
    from rcomp.surgery import load_pruned

    eps_v, step_v = parse_eps(req.eps), parse_eps(req.pgd_step_size, "--pgd-step-size")
    model, meta = load_pruned(req.checkpoint)
    dev = resolve_device(req.device)
    model = model.to(dev).eval()
    bundle = load_data(req.data_spec, tuple(meta["input_shape"]), progress=req.progress, splits=[req.split])
    _require_model_classes(bundle, meta, req.checkpoint)
    full = bundle.split(req.split)
    dataset = eval_subset(full, req.limit)
    n = len(dataset)
    res = evaluate_examples(model, dataset, _eval_attacks(req, eps_v, step_v, bundle.num_classes),
                            batch_size=req.batch_size, progress=req.progress, desc=f"eval {req.split}")
    counts = {**{name: res.count(name) for name in res.correct}, WORST_CASE: int(res.all_of().sum())}
    result = {"checkpoint": req.checkpoint, "data": req.data_spec, "split": req.split, "n": n, "eps": eps_v,
              "attack_seed": req.seed,
              "subset": None if dataset is full else {"n": n, "of": len(full), "seed": EVAL_SUBSET_SEED},
              "accuracy": {k: v / n for k, v in counts.items()},
              "per_class": per_class_accuracy(res, bundle.classes)}
    rows = [[k, f"{v / n:.2%}", f"{v}/{n}"] for k, v in counts.items()]
    text = render_table(rows, ["attack", "accuracy", "correct"])
    text += "\n" + worst_class_line(result["per_class"])
    if req.sanity:
        from rcomp.sanity import run_sanity

        probe = eval_subset(dataset, 256)
        x = torch.stack([probe[i][0] for i in range(len(probe))]).to(dev)
        y = torch.tensor([probe[i][1] for i in range(len(probe))]).to(dev)
        report = run_sanity(model, x, y, eps=eps_v)
        result["sanity"] = report.to_dict()
        text += "\n\nattack sanity checks:\n" + report.to_text()
    if req.json_out:
        write_json_atomic(req.json_out, result)
    return text
