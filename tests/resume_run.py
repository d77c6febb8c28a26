"""Helper for tests/test_train.py: one small checkpointed training run, killable and resumable.

usage: python tests/resume_run.py OUT_DIR [--resume] [--sleep SECONDS]

Writes OUT_DIR/final.pt (the trained state_dict) and OUT_DIR/result.json when it finishes.
``--sleep`` pauses in every train-mode forward pass so the test can SIGKILL it mid-epoch;
sleeping does not change any number the run computes.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from rcomp.data import load_data
from rcomp.models import create_model
from rcomp.train import TrainConfig, train

CONFIG = dict(epochs=4, batch_size=64, lr_max=0.1, regularity="channel", target_ops=0.5, eval_size=60,
              eval_pgd_steps=2, seed=3, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle = load_data("digits", (1, 12, 12))
    torch.manual_seed(0)
    model = create_model("tiny_cnn", bundle.num_classes, 1, bundle.mean, bundle.std)
    if args.sleep:
        model.register_forward_pre_hook(lambda m, inputs: time.sleep(args.sleep) if m.training else None)
    result = train(TrainConfig(**CONFIG), bundle, model, out_dir=args.out, resume=args.resume)
    out = Path(args.out)
    torch.save(result.model.state_dict(), out / "final.pt")
    (out / "result.json").write_text(json.dumps({"resumed_from": result.resumed_from,
                                                 "epochs": [h.epoch for h in result.history]}))


if __name__ == "__main__":
    main()
