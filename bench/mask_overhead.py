"""What in-train pruning's masks cost per training step, against the same network without masks.

One training step of ResNet20 as ``rcomp train`` takes it on CIFAR-sized inputs (an N-FGSM attack:
a forward and backward to the input; then the training forward and backward), timed for the plain
network and for the same network with channel masks in three states and slim, interleaved round by round so
every state sees the same machine:

- ``learning``: the masks train (from ``mask_start`` to the freeze): STE binarization in every hook
  of every forward, and its backward;
- ``waiting for mask_start (all on)``: constant masks with every channel on, which the hooks pass
  through untouched;
- ``frozen, half of every group off``: constant masks after the freeze (``MaskSet.binary`` reuses the
  0/1 mask and each hook its channel scale; the multiply of the activations remains, as the
  channels are still there until the pruned model is cut out at the end);

and, for ``slim_at_freeze``, the network with those channels removed, as training goes on after the
freeze with that recipe key (a quarter of the frozen network's ops: half of every group's inputs
and outputs are gone).

The ratio to the plain network is what in-train pruning adds to dense FastAT's step in each phase;
the rest of an epoch (data loading, augmentation, validation) is the same for both and not timed.

    python bench/mask_overhead.py              # 1 thread, batch 128, 20 rounds
"""

from __future__ import annotations

import argparse
import copy
import json
import datetime as dt
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cifar10_table import commit, machine  # noqa: E402
from render import _provenance, replace_section  # noqa: E402

from rcomp.attacks import nfgsm  # noqa: E402
from rcomp.masks import attach_masks  # noqa: E402
from rcomp.models import create_model  # noqa: E402
from rcomp.reports import write_json_atomic  # noqa: E402
from rcomp.surgery import remove_channels  # noqa: E402

RESULTS = HERE / "results" / "mask_overhead.json"
STATES = ("plain", "learning", "waiting for mask_start (all on)", "frozen, half of every group off")
SLIM = "slim after the freeze (those channels removed)"


def networks(seed: int = 0) -> dict[str, torch.nn.Module]:
    """ResNet20 with the same weights in every state."""
    torch.manual_seed(seed)
    plain = create_model("resnet20").train()
    example = torch.zeros(1, 3, 32, 32)
    nets = {"plain": plain}
    for state in STATES[1:]:
        masked = attach_masks(copy.deepcopy(plain), "channel", example).train()
        if state != "learning":
            masked.masks.freeze()
        if state.startswith("frozen"):
            for i, group in enumerate(masked.masks.groups):
                masked.masks.set_hard(i, torch.arange(group.size) % 2 == 0)
        nets[state] = masked
    nets[SLIM] = remove_channels(nets[STATES[-1]], example).model.train()
    return nets


def training_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
    """The model's share of one ``rcomp train`` step: the N-FGSM attack, then the loss's forward and backward."""
    x_adv = nfgsm(net, x, y, generator=generator)
    F.cross_entropy(net(x_adv), y).backward()
    net.zero_grad(set_to_none=True)


def measure(rounds: int, batch: int) -> dict[str, float]:
    """Seconds per step of each state, the median over ``rounds`` rounds that visit every state once."""
    nets = networks()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    times: dict[str, list[float]] = {s: [] for s in nets}
    for r in range(rounds + 1):
        for state, net in nets.items():
            t0 = time.perf_counter()
            training_step(net, x, y, torch.Generator().manual_seed(r))
            if r:  # round 0 warms every state up
                times[state].append(time.perf_counter() - t0)
    return {s: sorted(t)[len(t) // 2] for s, t in times.items()}


def render(doc: dict) -> None:
    plain = doc["seconds_per_step"]["plain"]
    lines = ["| masks | seconds per step (median) | × plain |", "|---|---:|---:|"]
    lines += [f"| {s} | {v:.3f} | {v / plain:.2f}× |" for s, v in doc["seconds_per_step"].items()]
    lines += ["", _provenance(doc, RESULTS) + f" {doc['threads']} thread(s), batch {doc['batch']}, median of "
              f"{doc['rounds']} interleaved rounds" + (f"; {doc['note']}" if doc.get("note") else "") + "."]
    replace_section("mask_overhead", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the ablation runs train with 1)")
    p.add_argument("--note", default="", help="what else the machine was doing")
    p.add_argument("--render", action="store_true", help="only re-render the docs/results.md table from the results file")
    args = p.parse_args()
    if not args.render:
        torch.set_num_threads(args.threads)
        seconds = measure(args.rounds, args.batch)
        doc = {"command": " ".join(["python"] + sys.argv), "commit": commit(), "machine": machine(),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
               "batch": args.batch, "rounds": args.rounds, "note": args.note, "seconds_per_step": seconds}
        write_json_atomic(RESULTS, doc)
    render(json.loads(RESULTS.read_text()))


if __name__ == "__main__":
    main()
