"""Is a collapsed N-FGSM run label leaking? Accuracy of saved weights on one-step training attacks
built from the true label and from the model's own prediction, next to clean, noise and PGD-10.

Label leaking (Kurakin et al. 2017): a one-step perturbation that ascends the true label's loss
carries that label in its sign pattern, and a network can learn to read it; it then classifies
attacked images better than clean ones while PGD breaks it. Building the attack from the
predicted label removes the signal (``rcomp train --attack-labels predicted``).

Usage::

    python bench/label_leaking.py CKPT [CKPT ...] [--n 512] [--runs RUN_DIR ...]
    python bench/label_leaking.py --render     # only the docs/results.md section

Each CKPT is an ``rcomp train`` epoch checkpoint (``OUT.partial/checkpoints/ckpt-epochNNNN.pt``) of a
CIFAR-10 ResNet20. Results go to ``bench/results/label_leaking.json`` with the command, commit,
machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cifar10_table import DATA, commit, epochs_log, machine  # noqa: E402
from render import _pct, _provenance, replace_section  # noqa: E402

from rcomp.attacks import nfgsm, pgd, preserved_buffers  # noqa: E402
from rcomp.data import fixed_subset, load_data  # noqa: E402
from rcomp.models import create_model  # noqa: E402
from rcomp.reports import write_json_atomic  # noqa: E402

RESULTS = HERE / "results" / "label_leaking.json"
COLUMNS = {"clean": "clean", "noise_2eps": "noise only (±2 eps)", "nfgsm_true_label_bn_train": "N-FGSM, true label",
           "nfgsm_predicted_label_bn_train": "N-FGSM, predicted label", "pgd10": "PGD-10"}


def accuracies(model, x, y) -> dict[str, float]:
    """Clean; the noise alone (the very draw N-FGSM starts from: same generator seed); N-FGSM from
    the true and from the predicted label, its gradient taken with BatchNorm in eval mode and in
    train mode (as in training); and PGD-10. Accuracy always in eval mode."""

    def acc(inputs) -> float:
        with torch.no_grad():
            return (model.eval()(inputs).argmax(1) == y).float().mean().item()

    out = {"clean": acc(x)}
    noise = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 4 - 2) * 8 / 255).clamp(0, 1)
    out["noise_2eps"] = acc(noise)
    for mode in ("eval", "train"):
        for labels in ("true", "predicted"):
            model.train(mode == "train")
            with preserved_buffers(model):
                adv = nfgsm(model, x, y, generator=torch.Generator().manual_seed(1), predicted_labels=labels == "predicted")
            out[f"nfgsm_{labels}_label_bn_{mode}"] = acc(adv)
    out["pgd10"] = acc(pgd(model.eval(), x, y, steps=10, generator=torch.Generator().manual_seed(0)))
    return out


def run_record(folder: Path) -> dict:
    """A (possibly interrupted) bench run's command and epoch log: the collapse as it was logged."""
    if (folder / "train.json").exists():
        history = json.loads((folder / "train.json").read_text())["history"]
    else:
        latest = sorted((folder.with_name(folder.name + ".partial") / "checkpoints").glob("ckpt-epoch*.pt"))[-1]
        history = torch.load(latest, map_location="cpu", weights_only=True)["history"]
    provenance = folder.with_name(folder.name + ".provenance.json")
    starts = json.loads(provenance.read_text()) if provenance.exists() else []
    return {"trained_by": starts, "epochs_log": epochs_log(history)}


def render(doc: dict) -> None:
    """Accuracy per checkpoint (N-FGSM with BatchNorm in train mode, as in training) into docs/results.md."""
    rows = ["| checkpoint | " + " | ".join(COLUMNS.values()) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for ckpt, acc in doc["checkpoints"].items():
        short = "/".join(Path(ckpt).parts[-5:])
        rows.append(f"| `{short}` | " + " | ".join(_pct(acc[k]) for k in COLUMNS) + " |")
    rows += ["", f"% of {doc['n']} validation images. " + _provenance(doc, RESULTS)]
    replace_section("label_leaking", "\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", type=Path)
    p.add_argument("--n", type=int, default=512, help="validation images (a fixed random subset, seed 0)")
    p.add_argument("--data", default=DATA)
    p.add_argument("--runs", nargs="*", type=Path, default=[],
                   help="bench run folders (OUT, finished or with OUT.partial) whose epoch logs to record")
    p.add_argument("--render", action="store_true", help="only re-render the docs/results.md section from the results file")
    args = p.parse_args()
    if args.render:
        render(json.loads(RESULTS.read_text()))
        return
    bundle = load_data(args.data, (3, 32, 32), splits=["val"], progress=False)
    val = fixed_subset(bundle.split("val"), args.n, 0)
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    rows = {}
    for ckpt in args.checkpoints:
        model = create_model("resnet20", bundle.num_classes, 3, bundle.mean, bundle.std)
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
        rows[str(ckpt)] = accuracies(model, x, y)
        print(ckpt, {k: round(v, 3) for k, v in rows[str(ckpt)].items()}, flush=True)
    doc = {"command": " ".join(["python"] + sys.argv), "commit": commit(), "machine": machine(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "n": len(val), "data": args.data,
           "checkpoints": rows, "runs": {str(r): run_record(r) for r in args.runs}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS, doc)
    render(doc)


if __name__ == "__main__":
    main()
