"""The subcommands of ``rcomp``. Each one parses options and hands a dataclass to a stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from rcomp.cli import EXIT_FAIL, EXIT_OK, FiniteFloatRange, cli, parse_shape
from rcomp.errors import RcompError
from rcomp.pipeline import METHODS

_DATA_HELP = (
    "Data spec: digits (default, bundled with scikit-learn), synthetic, cifar10:DIR, "
    "imagefolder:DIR (DIR/train, DIR/val or DIR/test class folders, or class folders directly)."
)


def _training_options(fn):
    """Options shared by ``train`` and ``prune``: one recipe, one vocabulary."""
    options = [
        click.option("--model", "model_name", default=None,
                     help="A zoo name (rcomp count --list-models), torchvision:NAME (any torchvision classifier, random init), "
                          "path/to/file.py:factory or package.module:factory (your own nn.Module) [resnet20; --arch-from's model]."),
        click.option("--model-kwargs", default=None,
                     help="Extra arguments of a torchvision:/file.py: factory, e.g. width=32,se=true (int/float/bool/str)."),
        click.option("--model-normalizes", is_flag=True,
                     help="Your module normalizes its input itself: rcomp adds no Normalize(mean, std) layer in front."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Start from this state dict (torch.load weights_only=True; names and shapes must match): in-train "
                          "prunes while fine-tuning, posttrain/rl skip their dense phase."),
        click.option("--weights-key", default=None, help="--weights is a checkpoint dict: the state dict is under this key."),
        click.option("--arch-from", type=click.Path(dir_okay=False), default=None,
                     help="Train a pruned checkpoint's widths (not its weights) densely from --seed's initial "
                          "weights: the from-scratch baseline of a pruning method."),
        click.option("--data", "data_spec", default="digits", show_default=True, help=_DATA_HELP),
        click.option("--download", is_flag=True, help="Allow cifar10:DIR to download (never implicit)."),
        click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs [recipe default]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size [128; 32 for digits/synthetic]."),
        click.option("--lr", "lr_max", type=FiniteFloatRange(min=0, min_open=True), default=None, help="Peak learning rate."),
        click.option("--schedule", type=click.Choice(["cyclic", "cosine"]), default=None),
        click.option("--attack", type=click.Choice(["fgsm-rs", "nfgsm", "none"]), default=None, help="Training attack: FastAT (fgsm-rs), N-FGSM, or none."),
        click.option("--attack-labels", type=click.Choice(["true", "predicted"]), default=None,
                     help="Label the training attack ascends: the ground truth [default] or the model's prediction (against label leaking)."),
        click.option("--eps", type=str, default=None, help="Training eps in pixel units, e.g. 8/255."),
        click.option("--hflip/--no-hflip", default=None,
                     help="Random horizontal flips in augmentation [on]; --no-hflip for data whose mirror image is "
                          "another class (traffic signs: turn left/right, keep left/right)."),
        click.option("--regularity", type=click.Choice(["channel", "weight", "none"]), default=None, help="Pruning regularity (none = dense)."),
        click.option("--target-ops", type=FiniteFloatRange(0, 1, min_open=True), default=None, help="Ops budget as a fraction of the dense model."),
        click.option("--target-params", type=FiniteFloatRange(0, 1, min_open=True), default=None, help="Params budget as a fraction of the dense model."),
        click.option("--target-latency", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="Latency budget as a fraction of the dense model's, by --latency-table's per-layer measurements."),
        click.option("--latency-table", type=click.Path(dir_okay=False), default=None,
                     help="Per-layer latency table (rcomp latency-table): prune to --target-latency and the profile's latency_p90_ms."),
        click.option("--channel-multiple", type=click.IntRange(min=1), default=None,
                     help="Pruned channel groups keep a multiple of N channels (or all) [1; the profile's target.channel_multiple]."),
        click.option("--finetune-epochs", type=click.IntRange(min=1), default=None,
                     help="--method posttrain/rl: train dense for all --epochs, then fine-tune N more "
                          "(the method's own schedule) [split --epochs 2:1, the in-train run's cost]."),
        click.option("--recipe", type=click.Path(dir_okay=False), default=None, help="Training recipe YAML (keys of TrainConfig)."),
        click.option("--seed", type=int, default=None),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--workers", "num_workers", type=click.IntRange(min=0), default=0, show_default=True),
        click.option("--resume", is_flag=True, help="Continue an interrupted run from its last good checkpoint."),
        click.option("--no-progress", is_flag=True, help="No progress bars (for logs)."),
        click.option("--amp", is_flag=True, default=None, help="Mixed precision (fp16) training on CUDA; ignored on CPU."),
        click.option("--rl-episodes", type=click.IntRange(min=1), default=None,
                     help="--method rl: episodes of the AMC search [100]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _job_from_options(opts: dict, profile, out: str, method: str):
    from rcomp.pipeline import build_job

    return build_job(opts, profile=profile, out=out, method=method)


@cli.command()
@click.option("--profile", "profile_ref", required=True, help="Hardware profile: a YAML path or a name in profiles/.")
@click.option("--out", default=None, help="Output folder [runs/<profile>-<model>].")
@click.option("--method", type=click.Choice(METHODS), default="intrain", show_default=True, help="In-train pruning (the poster), post-train magnitude pruning + fine-tuning, AMC-style RL post-train pruning with a KL robustness reward (the poster's comparison) + fine-tuning, or no pruning.")
@click.option("--attack-set-size", type=click.IntRange(min=1), default=500, show_default=True, help="Validation images in the shipped PGD attack set.")
@click.option("--square-queries", type=click.IntRange(min=0), default=100, show_default=True, help="The gate's own Square attack against the ORT session, queries per image on 64 images (0 = the shipped transfer set alone).")
@click.option("--latency-runs", type=click.IntRange(min=5), default=200, show_default=True)
@_training_options
def prune(profile_ref, out, method, attack_set_size, square_queries, latency_runs, **opts):
    """Run the whole pipeline against a hardware profile: train with masks under the profile's
    budgets (FastAT), remove the pruned channels, count with fvcore, export to ONNX at the
    profile's opset, and check budgets and robustness floors under onnxruntime.

    \b
    Writes OUT/: model.pt (pruned checkpoint), model.onnx, adv.npz (attack set),
    count.json, train.json, report.json, report.md, checkpoints/.
    The exit code is the check's: 0 all pass, 1 a budget or floor fails, 2 bad input.

    \b
    Examples:
      rcomp prune --profile profiles/jetson.yaml
      rcomp prune --profile automotive-ecu --model resnet20 \\
          --data imagefolder:../shared/datasets/cifar10-jpeg --epochs 15 --out runs/ecu
      rcomp prune --profile jetson --method posttrain --target-ops 0.5
      rcomp prune --profile jetson --method rl --target-ops 0.5 --rl-episodes 100
    """
    from rcomp.config import resolve_profile
    from rcomp.pipeline import run_prune

    profile = resolve_profile(profile_ref)
    job = _job_from_options(opts, profile, out, method)
    job.attack_set_size, job.square_queries, job.latency_runs = attack_set_size, square_queries, latency_runs
    result = run_prune(job)
    if result is None:  # torchrun, rank > 0: rank 0 reports
        return
    click.echo(result.summary())
    sys.exit(EXIT_OK if result.passed else EXIT_FAIL)


@cli.command()
@click.option("--out", required=True, help="Output folder (model.pt, train.json, checkpoints/).")
@click.option("--profile", "profile_ref", default=None, help="Take the budget from a hardware profile.")
@click.option("--method", type=click.Choice(METHODS), default=None, help="intrain, posttrain, rl (AMC search + fine-tuning) or dense. Default: intrain when a budget is given, else dense.")
@_training_options
def train(out, profile_ref, method, **opts):
    """Train a model: dense or pruned in-train, robust (FastAT / N-FGSM) or plain.

    \b
    Examples:
      rcomp train --model resnet20 --data digits --target-ops 0.5 --out runs/r20-50
      rcomp train --model resnet20 --data imagefolder:../shared/datasets/cifar10-jpeg \\
          --attack fgsm-rs --epochs 15 --out runs/r20-dense
      rcomp train --model tiny_cnn --regularity weight --target-params 0.3 --out runs/tiny
      rcomp train --model resnet20 --method rl --target-ops 0.5 --rl-episodes 100 --out runs/r20-rl
      rcomp train --arch-from runs/r20-50/model.pt --data digits --out runs/r20-50-scratch
      rcomp train ... --resume          # continue after an interruption
      torchrun --nproc_per_node 4 -m rcomp train --device cuda --amp ...   # 4 GPUs
    """
    from rcomp.config import resolve_profile
    from rcomp.pipeline import run_train

    profile = resolve_profile(profile_ref) if profile_ref else None
    job = _job_from_options(opts, profile, out, method)
    result = run_train(job)
    if result is not None:  # None on torchrun ranks > 0: rank 0 writes and reports
        click.echo(result.summary())


@cli.command()
@click.argument("model_ref", required=False)
@click.option("--model", "model_opt", default=None, help="A model reference (same as the positional MODEL): zoo name, "
              "torchvision:NAME, file.py:factory, package.module:factory.")
@click.option("--model-kwargs", default=None, help="Extra arguments of a torchvision:/file.py: factory, e.g. width=32.")
@click.option("--model-normalizes", is_flag=True, help="The module normalizes its input itself (no Normalize layer added).")
@click.option("--input", "input_shape", default=None, help="Input shape N,C,H,W (batch 1) or C,H,W [model / profile default].")
@click.option("--num-classes", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--profile", "profile_ref", default=None, help="Judge the model against a profile's budgets.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the count as JSON.")
@click.option("--list-models", is_flag=True, help="List the zoo and exit.")
def count(model_ref, model_opt, model_kwargs, model_normalizes, input_shape, num_classes, profile_ref, json_out, list_models):
    """Count MOps (MACs, batch 1) and params with fvcore, per layer and total.

    MODEL is a model reference (zoo name, torchvision:NAME, path/to/file.py:factory; dense, random
    weights) or a checkpoint written by rcomp (pruned). Convention: one
    multiply-add = one op; conv + linear only; BatchNorm folded (not counted); element-wise ops
    and pooling listed as not counted.

    \b
    Examples:
      rcomp count resnet20 --input 1,3,32,32
      rcomp count --model resnet56
      rcomp count runs/r20/model.pt --profile jetson
      rcomp count torchvision:mobilenet_v3_small --input 3,64,64
      rcomp count my_models.py:build --model-kwargs width=32 --input 1,32,32
    """
    from rcomp.pipeline import count_command

    if list_models:
        from rcomp.models import get_model_info, list_models as names

        for name in names():
            info = get_model_info(name)
            click.echo(f"{name:14s} input {'x'.join(map(str, info.default_input)):10s} {info.description}")
        return
    ref = model_opt or model_ref
    if not ref:
        raise RcompError("give a MODEL (zoo name or checkpoint path), e.g. rcomp count resnet20")
    from rcomp.guards import locked_output_file

    with locked_output_file(json_out, "--json"):  # checked and locked before any work
        text, passed = count_command(ref, parse_shape(input_shape), num_classes, profile_ref, json_out,
                                     model_kwargs=model_kwargs, model_normalizes=model_normalizes)
    click.echo(text)
    sys.exit(EXIT_OK if passed else EXIT_FAIL)


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--profile", "profile_ref", default=None, help="Takes opset and input shape from the profile.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the .onnx file.")
@click.option("--opset", type=click.IntRange(7, 23), default=None, help="Overrides the profile's opset [17].")
@click.option("--parity-data", default=None, help="Data spec for the parity check [random inputs].")
@click.option("--parity-n", type=click.IntRange(min=1), default=64, show_default=True)
def export(checkpoint, profile_ref, out, opset, parity_data, parity_n):
    """Export a (pruned) checkpoint to ONNX: static shape, onnx-simplifier with a numerical check,
    full onnx.checker, rcomp metadata, then an onnxruntime-vs-PyTorch parity check.

    \b
    Examples:
      rcomp export runs/r20/model.pt --profile jetson --out runs/r20/model.onnx
      rcomp export model.pt --opset 13 --out ecu.onnx --parity-data imagefolder:DIR
    """
    from rcomp.guards import locked_output_file
    from rcomp.pipeline import export_command

    with locked_output_file(out, "--out"):  # checked and locked before any work
        click.echo(export_command(checkpoint, profile_ref, out, opset, parity_data, parity_n))


@cli.command()
@click.argument("onnx_path", type=click.Path(dir_okay=False))
@click.option("--profile", "profile_ref", required=True)
@click.option("--attack-set", type=click.Path(dir_okay=False), default=None, help="An .npz attack set (x_clean, y, x_adv) shipped with the model.")
@click.option("--square-queries", type=click.IntRange(min=0), default=100, show_default=True,
              help="The gate's own Square attack against the ORT session, queries per image (0 = trust the attack set alone).")
@click.option("--square-n", type=click.IntRange(min=1), default=64, show_default=True, help="Images the Square attack runs on (a seeded subset).")
@click.option("--dense", "dense_onnx", type=click.Path(dir_okay=False), default=None,
              help="The dense reference model's ONNX: the ops/params fractions and the latency ratio are measured against it.")
@click.option("--latency-runs", type=click.IntRange(min=5), default=200, show_default=True)
@click.option("--report-dir", type=click.Path(file_okay=False), default=None, help="Where report.json and report.md go [next to the model].")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), default=None, help="Also write a JUnit XML file (one test case per check) for CI test reports.")
@click.option("--baseline", type=click.Path(dir_okay=False), default=None, help="The released model's report.json: fail on a regression against it.")
@click.option("--max-regression", default=None,
              help="Tolerated regressions vs --baseline, absolute or relative: adv_acc=0.01,latency_p90_ms=5%,mops=0 "
                   "[mops=0,params=0,clean_acc=0.01,adv_acc=0.01,latency_p90_ms=10%].")
def check(onnx_path, profile_ref, attack_set, square_queries, square_n, dense_onnx, latency_runs, report_dir, junit_path,
          baseline, max_regression):
    """The CI gate: check an ONNX model against every budget and floor of a profile under
    onnxruntime (ops and params from the graph, p90 latency, clean and adversarial accuracy).

    Needs only the light install (onnxruntime, numpy, pyyaml). Exit codes: 0 all pass,
    1 a budget, floor or regression fails, 2 bad input (missing file, not ONNX, wrong input shape,
    bad profile, a doctored attack set, a baseline measured under other conditions).

    \b
    Examples:
      rcomp check model.onnx --profile jetson --attack-set adv.npz
      rcomp check model.onnx --profile profiles/automotive-ecu.yaml --attack-set adv.npz \\
          --square-queries 1000 --dense dense.onnx --report-dir ci-report/
      rcomp check new/model.onnx --profile jetson --attack-set new/adv.npz --junit gate/junit.xml \\
          --baseline released/report.json --max-regression adv_acc=0.01,latency_p90_ms=5%,mops=0
    """
    from rcomp.config import resolve_profile
    from rcomp.export.check import run_check, write_report

    profile = resolve_profile(profile_ref)
    report = run_check(
        onnx_path, profile, attack_set=attack_set, square_queries=square_queries, square_n=square_n,
        latency_runs=latency_runs, dense_onnx=dense_onnx, baseline=baseline, max_regression=max_regression,
    )
    write_report(report, report_dir or str(Path(onnx_path).resolve().parent))
    if junit_path:
        from rcomp.export.junit import write_junit

        write_junit(report, junit_path)
    click.echo(report.to_text())
    sys.exit(EXIT_OK if report.passed else EXIT_FAIL)


@cli.command("eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data", "data_spec", default="digits", show_default=True, help=_DATA_HELP)
@click.option("--split", default="val", show_default=True, help="train, val, test or all.")
@click.option("--n", "limit", type=click.IntRange(min=1), default=None, help="Evaluate a fixed random subset of N images of the split (seed 0: the same for every model).")
@click.option("--eps", type=str, default="8/255", show_default=True)
@click.option("--pgd-steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--pgd-step-size", type=str, default="2/255", show_default=True)
@click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--pgd50", is_flag=True, help="Also PGD-50 with --restarts restarts.")
@click.option("--sanity", is_flag=True, help="Run the attack sanity checks (gradient masking).")
@click.option("--autoattack", type=click.Choice(["fast", "standard"]), default=None,
              help="Also AutoAttack (pyautoattack): fast = APGD-CE + APGD-T, standard = the full suite (slow; use --n).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the attacks' random starts: the same seed repeats every figure.")
def evaluate(checkpoint, data_spec, split, limit, eps, pgd_steps, pgd_step_size, restarts, pgd50, sanity, autoattack,
             batch_size, device, json_out, no_progress, seed):
    """Clean and PGD accuracy of a saved model on any split of any dataset.

    \b
    Examples:
      rcomp eval runs/r20/model.pt --data imagefolder:../shared/datasets/cifar10-jpeg --split val
      rcomp eval runs/r20/model.pt --data imagefolder:/data/cifar10-test --split test --pgd50 --restarts 5
      rcomp eval runs/r20/model.pt --data digits --sanity
      rcomp eval runs/r20/model.pt --data imagefolder:../shared/datasets/gtsrb32 --n 1000 --autoattack fast
    """
    from rcomp.guards import locked_output_file
    from rcomp.pipeline import EvalRequest, eval_command

    request = EvalRequest(checkpoint=checkpoint, data_spec=data_spec, split=split, limit=limit, eps=eps, pgd_steps=pgd_steps,
                          pgd_step_size=pgd_step_size, restarts=restarts, pgd50=pgd50, sanity=sanity, batch_size=batch_size,
                          device=device, json_out=json_out, progress=not no_progress, seed=seed, autoattack=autoattack)
    with locked_output_file(json_out, "--json"):  # checked and locked before any work
        click.echo(eval_command(request))


@cli.group()
def profiles():
    """List, show and validate hardware profiles (YAML).

    \b
    Examples:
      rcomp profiles list
      rcomp profiles validate profiles/jetson.yaml my-board.yaml
      rcomp profiles show automotive-ecu
    """


@profiles.command("list")
@click.argument("directory", required=False, type=click.Path(file_okay=False))
def profiles_list(directory):
    """List the profiles in DIRECTORY [the shipped profiles/]."""
    from rcomp.config import PROFILES_DIR, list_profiles
    from rcomp.reports import render_table

    rows = []
    for path, prof in list_profiles(directory or PROFILES_DIR):
        if isinstance(prof, Exception):
            rows.append([Path(path).name, "INVALID", "", "", str(prof)])
            continue
        b = prof.budgets
        budgets = ", ".join(
            f"{k}={v:g}" for k, v in (("mops", b.mops), ("params", b.params), ("ops_fraction", b.ops_fraction),
                                      ("params_fraction", b.params_fraction), ("p90_ms", b.latency_p90_ms)) if v is not None
        )
        rows.append([Path(path).name, prof.name, "x".join(map(str, prof.input_shape)), f"opset {prof.opset}", budgets])
    click.echo(render_table(rows, ["file", "name", "input", "onnx", "budgets"]))


@profiles.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def profiles_validate(files):
    """Validate profile files; exit 2 naming the file, key and problem on the first bad one."""
    from rcomp.config import load_profile

    for f in files:
        prof = load_profile(f)
        click.echo(f"{f}: ok ({prof.name})")


@profiles.command("show")
@click.argument("ref")
def profiles_show(ref):
    """Print a profile as JSON after validation (NAME or path)."""
    import dataclasses

    from rcomp.config import resolve_profile

    click.echo(json.dumps(dataclasses.asdict(resolve_profile(ref)), indent=2))


@cli.command()
@click.argument("onnx_path", type=click.Path(dir_okay=False))
@click.option("--profile", "profile_ref", required=True, help="The profile the model was exported for (input shape).")
@click.option("--data", "data_spec", required=True, help="The model's training data; calibration uses a fixed seeded sample of its training split. " + _DATA_HELP)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the INT8 .onnx file.")
@click.option("--calibration", "method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax", show_default=True)
@click.option("--calibration-size", type=click.IntRange(min=1), default=256, show_default=True, help="Training images in the calibration sample.")
@click.option("--activation-type", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
              help="uint8 (u8s8: x86 VNNI's fast kernel) or int8 (s8s8: ARM).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sample.")
def quantize(onnx_path, profile_ref, data_spec, out, method, calibration_size, activation_type, seed):
    """INT8 static quantization with onnxruntime: QDQ format, per-channel int8 weights, calibrated
    on a fixed sample of the training split; onnx.checker; settings and the calibration sample's
    description in the model's metadata (rcomp.int8.*). Loading --data needs torch; the
    quantization itself does not. Then judge it with `rcomp check` (three attacks on the INT8 model).

    \b
    Examples:
      rcomp quantize runs/ecu/model.onnx --profile automotive-ecu \\
          --data imagefolder:../shared/datasets/cifar10-jpeg --out runs/ecu/model.int8.onnx
      rcomp quantize model.onnx --profile jetson --data digits --calibration entropy --out model.int8.onnx
    """
    from rcomp.config import resolve_profile
    from rcomp.export.quantize import quantize_command

    click.echo(quantize_command(onnx_path, resolve_profile(profile_ref), data_spec, out, method=method,
                                calibration_size=calibration_size, activation_type=activation_type, seed=seed))


@cli.command("latency-table")
@click.option("--profile", "profile_ref", required=True, help="The profile whose session settings the layers run under.")
@click.option("--model", "model_name", default=None, help="Zoo model (needs torch): emit its layers, and measure them unless --emit-layers.")
@click.option("--num-classes", type=click.IntRange(min=2), default=10, show_default=True, help="With --model: classifier outputs.")
@click.option("--emit-layers", type=click.Path(dir_okay=False), default=None,
              help="With --model: write the layers file (and the dense ONNX beside it) for the board, measure nothing.")
@click.option("--layers", "layers_path", type=click.Path(dir_okay=False), default=None,
              help="A layers file from --emit-layers: measure it here (onnx + onnxruntime only, no torch).")
@click.option("--dense-onnx", type=click.Path(dir_okay=False), default=None,
              help="The dense model for the whole-model calibration [the .onnx the layers file names, beside it].")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Where to write the table (JSON).")
@click.option("--runs", type=click.IntRange(min=5), default=100, show_default=True, help="Timed runs per layer and width.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Cache of measured layers, by (profile settings, layer shape, host, onnxruntime) [~/.cache/rcomp/latency].")
@click.option("--no-cache", is_flag=True, help="Measure every layer again.")
def latency_table(profile_ref, model_name, num_classes, emit_layers, layers_path, dense_onnx, out, runs, cache_dir, no_cache):
    """Per-layer latency table for latency-budgeted pruning: every conv at every width it can take
    (multiples of the profile's channel_multiple), the fixed ops, the per-run overhead, and the
    whole dense model once (calibration), measured under onnxruntime as the profile runs it.

    \b
    Measure on the board, train on the workstation:
      rcomp latency-table --model resnet20 --profile jetson --emit-layers layers.json   # workstation
      rcomp latency-table --profile jetson --layers layers.json --out table.json        # board (no torch)
      rcomp train --latency-table table.json --profile jetson --target-latency 0.5 --out runs/lat50
    Or both steps on one machine:
      rcomp latency-table --model resnet20 --profile automotive-ecu --out table.json
    """
    from rcomp.config import resolve_profile
    from rcomp.export import latency_table as lt
    from rcomp.reports import write_json_atomic

    profile = resolve_profile(profile_ref)
    if (model_name is None) == (layers_path is None):
        raise RcompError("give either --model (emit the layers from a zoo model) or --layers (a layers file)")
    if emit_layers and model_name is None:
        raise RcompError("--emit-layers writes a model's layers file; it needs --model")
    if not emit_layers and not out:
        raise RcompError("--out is needed to write the table (or --emit-layers to write only the layers file)")
    if model_name is not None:
        from rcomp.latency import emit_layers as emit

        layers_path = emit_layers or str(Path(out).with_name(Path(out).stem + ".layers.json"))
        doc = emit(model_name, profile, layers_path, num_classes=num_classes)
        click.echo(f"wrote {layers_path} ({len(doc['layers'])} convs, {len(doc['fixed'])} fixed ops) and "
                   f"{Path(layers_path).with_suffix('.onnx')}")
        if emit_layers:
            return
    layers = lt.load_layers(layers_path)
    dense = lt.resolve_dense_onnx(layers_path, layers, dense_onnx)
    cache = None if no_cache else (Path(cache_dir) if cache_dir else lt.default_cache_dir())
    table = lt.measure_table(layers, profile, runs=runs, cache_dir=cache, dense_onnx=dense, log=click.echo)
    write_json_atomic(out, table)
    click.echo(lt.summary(table))
    click.echo(f"wrote {out}")
