"""Helper for tests/test_distributed.py: the ``rcomp`` CLI under torchrun, recording what each rank did.

usage: python -m torch.distributed.run --standalone --nproc_per_node N tests/ddp_run.py DUMP_DIR rcomp-args...

Runs ``rcomp rcomp-args...`` unchanged, except that every rank saves to ``DUMP_DIR/rank{R}.pt``
its final state (weights, masks, BatchNorm statistics), its epoch logs, the size and pixel sum
of every batch it trained on and its masks after every step, so the test can tell that ranks saw
different data yet stayed equal throughout.
"""

import sys
from pathlib import Path

import torch

import rcomp.train as rtrain
from rcomp import distributed
from rcomp.cli import main


def _record(dump: Path) -> None:
    batches, mask_steps = [], []
    step, train = rtrain._Trainer._step, rtrain.train

    def recording_step(self, x, y, *args, **kwargs):
        batches.append((len(y), float(x.double().sum())))
        step(self, x, y, *args, **kwargs)
        if self.masks is not None:  # the masks after every step: a later DDP rewrap would hide a divergence
            mask_steps.append(torch.cat([p.detach().flatten() for p in self.masks.params]).clone())

    def recording_train(*args, **kwargs):
        result = train(*args, **kwargs)
        state = {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}
        history = [vars(h) for h in result.history]
        dump.mkdir(parents=True, exist_ok=True)
        torch.save({"state": state, "batches": batches, "history": history, "mask_steps": mask_steps},
                   dump / f"rank{distributed.world().rank}.pt")
        return result

    rtrain._Trainer._step, rtrain.train = recording_step, recording_train


if __name__ == "__main__":
    torch.set_num_threads(1)
    _record(Path(sys.argv[1]))
    sys.argv = ["rcomp", *sys.argv[2:]]
    main()
