"""Which way the task loss pushes the channel masks, as the bench recipe starts them: stream vs block.

In-train pruning left the stage-3 residual stream thinner than magnitude pruning did (ResNet20: 22-23
of 64 channels against 35; ResNet56: 13 of 64, the min_keep floor), although the budget gradient of
the bench recipe is the same for every channel. This measures the other force on a mask: the
gradient of the training loss (cross-entropy on FGSM examples, eps 8/255, and on clean images) with
respect to every mask, the straight-through estimate the masks learn from, on a trained dense model
with the masks set from group magnitude as the bench recipe sets them at ``mask_start``. A positive
gradient means the loss itself would shrink the channel (its mask moves towards zero).

Per stage and kind (a residual stream's channels, fed by the stem or a shortcut conv and feeding
every block of the stage; or the channels inside one block), it reports the mean signed gradient,
the share of channels with a positive one and the mean magnitude, with BatchNorm in eval mode
(running statistics) and in train mode (batch statistics, as during training). Per channel group it
also sums the gradients with respect to the 0/1 mask values: that sum is the loss's first-order push
on the group's width as a whole, and the table gives its size against the sum of their magnitudes
(the largest over the groups of a stage and kind). Near 0, the loss cannot tell the group's width
from any other, only which of its channels to keep.

The second table (``mask_gradients_training.json``) asked the same of a model in the middle of
training, where the masks learn: the ResNet20 run that took its mask gradients on running
statistics (``mask_norm_stats: mask-pass``), 70 steps after its masks started, beside the dense
row's final weights. Per group it gives the signed width push (positive: the loss would narrow the
group), and per model the slope of the FGSM loss in a temperature that scales the logits (positive:
smaller logits lower the loss). That training option, and with it the ``--training`` measurement,
was removed (no measured gain, docs/ablations.md); its results file stays and is still rendered,
and ``git checkout 6311216`` has the code that measured it.

    python bench/mask_gradients.py                       # ResNet20 and ResNet56 dense rows of the table
    python bench/mask_gradients.py --render
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cifar10_table import DATA, REPO, commit, machine  # noqa: E402
from render import _provenance, replace_section  # noqa: E402

if TYPE_CHECKING:
    import torch

RESULTS = HERE / "results" / "mask_gradients.json"
TRAINING_RESULTS = HERE / "results" / "mask_gradients_training.json"
#: A group whose width push is below this share of its gradients' magnitude gets none (batch statistics: ~1e-6).
NO_PUSH = 0.01
MODELS = ("bench/models/r20-dense.pt", "bench/models/r56-dense.pt")
EPS = 8 / 255


def group_kind(name: str) -> tuple[int, str]:
    """(stage, "stream" | "block") of a channel group, from its root layer's name."""
    if name == "net.conv1":
        return 1, "stream"
    stage = int(re.search(r"layer(\d)", name).group(1))
    return stage, "stream" if "shortcut" in name else "block"


def training_images(root: str, n: int, seed: int):
    """A seeded sample of the training folder as pixels in [0, 1] (the models normalize themselves)."""
    import torch
    from torchvision import datasets, transforms

    folder = datasets.ImageFolder(str(Path(root) / "train"), transform=transforms.ToTensor())
    picks = random.Random(seed).sample(range(len(folder)), n)
    return torch.stack([folder[i][0] for i in picks]), torch.tensor([folder[i][1] for i in picks])


def mask_gradients(model_file: str, x, y, train_mode: bool, batch: int) -> dict[str, list]:
    """Mean loss gradient per mask (clean and FGSM), over the batches of ``x``."""
    import torch
    import torch.nn.functional as F

    from rcomp.attacks import fgsm
    from rcomp.masks import ste_slope

    masked = magnitude_masked(model_file, x.shape[1:])
    params = list(masked.masks.params)
    sums = {loss: [torch.zeros_like(p) for p in params] for loss in ("clean", "fgsm")}
    batches = range(0, len(x), batch)
    masked.train(train_mode)
    for start in batches:
        xb, yb = x[start:start + batch], y[start:start + batch]
        inputs = {"clean": xb, "fgsm": fgsm(masked, xb, yb, eps=EPS).detach()}
        for loss, xin in inputs.items():
            grads = torch.autograd.grad(F.cross_entropy(masked(xin), yb), params)
            for total, g in zip(sums[loss], grads):
                total += g.detach() / len(batches)
    names = [g.name for g in masked.masks.groups]
    slopes = [ste_slope(p) for p in params]
    return {loss: [(n, g, g / slope) for n, g, slope in zip(names, grads, slopes)] for loss, grads in sums.items()}


def magnitude_masked(model_file: str, input_shape):
    """A saved model with channel masks set from group magnitude, as the bench recipe starts them."""
    import torch

    from rcomp.masks import attach_masks
    from rcomp.posttrain import magnitude_scores
    from rcomp.surgery import load_pruned

    model = load_pruned(REPO / model_file)[0].eval()
    example = torch.zeros(1, *input_shape)
    masked = attach_masks(model, "channel", example)
    masked.masks.init_from_scores(magnitude_scores(masked.model, masked.masks, example))
    return masked


def width_share(per_binary: torch.Tensor) -> float:
    """|sum| / sum of |.| of one group's gradients with respect to its 0/1 mask values (all on here).

    The sum is the loss's first-order push on the group's width as a whole: scaling every channel of
    the group by s changes the loss by s times it. A group whose every consumer is followed by a
    BatchNorm on batch statistics (a block's inner channels: relu, conv, BN) cannot feel that
    scale, so the sum is zero there and the loss only trades its channels against each other."""
    return float(per_binary.sum().abs() / per_binary.abs().sum().clamp_min(1e-30))


def summarize(per_mask: list) -> list[dict]:
    """Pool the masks by (stage, kind)."""
    import torch

    pools: dict[tuple[int, str], list] = {}
    shares: dict[tuple[int, str], list] = {}
    for name, g, g_binary in per_mask:
        pools.setdefault(group_kind(name), []).append(g.flatten())
        shares.setdefault(group_kind(name), []).append(width_share(g_binary))
    rows = []
    for (stage, kind), gs in sorted(pools.items()):
        g = torch.cat(gs)
        rows.append({"stage": stage, "kind": kind, "channels": g.numel(), "groups": len(gs),
                     "signed_mean": float(g.mean()), "share_positive": float((g > 0).float().mean()),
                     "mean_abs": float(g.abs().mean()), "width_share_max": max(shares[(stage, kind)])})
    return rows


def render(doc: dict) -> None:
    lines = ["| model | BatchNorm | loss | stage | channels of | n | mean gradient | share > 0 (loss shrinks it) | "
             "mean \\|gradient\\| | width push: \\|Σ\\| / Σ\\|·\\|, largest of the groups |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for model, modes in doc["models"].items():
        for mode, losses in modes.items():
            for loss, rows in losses.items():
                for r in rows:
                    share = f"{r['width_share_max']:.1e} ({r['groups']})" if "width_share_max" in r else "–"
                    lines.append(f"| {Path(model).stem} | {mode} | {loss} | {r['stage']} | {r['kind']} | {r['channels']} | "
                                 f"{r['signed_mean']:+.1e} | {r['share_positive']:.2f} | {r['mean_abs']:.1e} | {share} |")
    body = "\n".join(lines) + "\n\n" + _provenance(doc, RESULTS) + (
        f" {doc['images']} training images (seed {doc['seed']}), batches of {doc['batch']}; masks set from group "
        "magnitude on the dense row's final weights.")
    replace_section("mask_gradients", body)


def render_training(doc: dict) -> None:
    lines = ["| model | BatchNorm | FGSM acc. | FGSM loss | logit slope dL/dt | groups pushed narrower / wider / not "
             f"(share < {NO_PUSH}) | "
             "stream push Σ (share), stages 1 / 2 / 3 | block push Σ, range over the 9 blocks |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for label, modes in doc["models"].items():
        for mode, r in modes.items():
            groups = r["groups"]
            streams = sorted((g for g in groups if g["kind"] == "stream"), key=lambda g: g["stage"])
            blocks = [g["push"] for g in groups if g["kind"] == "block"]
            stream_cells = " / ".join(f"{g['push']:+.2g} ({g['share']:.2f})" for g in streams)
            pushed = [g for g in groups if g["share"] >= NO_PUSH]
            narrower = sum(g["push"] > 0 for g in pushed)
            slope = "0 (blind)" if r.get("scale_blind") else f"{r['logit_slope']:+.3f}"
            lines.append(f"| {label} | {mode} | {100 * r['fgsm_acc']:.1f} % | {r['fgsm_loss']:.3f} | {slope} | "
                         f"{narrower} / {len(pushed) - narrower} / {len(groups) - len(pushed)} | {stream_cells} | "
                         f"{min(blocks):+.2g} to {max(blocks):+.2g} |")
    body = "\n".join(lines) + "\n\n" + _provenance(doc, TRAINING_RESULTS) + (
        f" {doc['images']} training images (seed {doc['seed']}), batches of {doc['batch']}, FGSM eps 8/255 from the "
        "true label in the same BatchNorm mode; the dense row's masks set from group magnitude, the training "
        "state's as they were.")
    replace_section("mask_gradients_training", body)


def sample_and_header(args) -> tuple:
    """The seeded image sample both tables measure on, and the results header (command, commit, machine, date)."""
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x, y = training_images(args.data.removeprefix("imagefolder:"), args.images, args.seed)
    doc = {"command": " ".join(["python bench/mask_gradients.py", *sys.argv[1:]]), "commit": commit(),
           "machine": machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "images": args.images, "batch": args.batch, "seed": args.seed, "eps": EPS, "models": {}}
    return x, y, doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated dense model files (bench/models/...)")
    p.add_argument("--data", default=DATA, help="imagefolder:ROOT whose train/ folder is sampled")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", action="store_true", help="only re-render the docs/results.md tables from the results files")
    args = p.parse_args()
    if args.render:
        render(json.loads(RESULTS.read_text()))
        render_training(json.loads(TRAINING_RESULTS.read_text()))
        return
    from rcomp.reports import write_json_atomic

    x, y, doc = sample_and_header(args)
    for model_file in args.models.split(","):
        doc["models"][model_file] = {}
        for mode, train_mode in (("eval", False), ("train", True)):
            grads = mask_gradients(model_file, x, y, train_mode, args.batch)
            doc["models"][model_file][mode] = {loss: summarize(g) for loss, g in grads.items()}
            print(f"{model_file} BN {mode}: done", flush=True)
    write_json_atomic(RESULTS, doc)
    render(doc)


if __name__ == "__main__":
    main()
