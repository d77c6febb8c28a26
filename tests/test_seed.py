"""``--seed`` decides a run: two processes started with one command train the same weights.

torch (2.14 here) seeds its global generator randomly at start-up, so whatever is drawn before the trainer
seeds it (the model's initial weights) differed between processes until the pipeline seeded it.
"""

import os
import subprocess
import sys

import pytest
import torch

from rcomp.data import load_data
from rcomp.pipeline import _build_model, build_job
from rcomp.surgery import load_pruned


def _job(seed: int):
    return build_job({"model_name": "tiny_cnn", "data_spec": "synthetic:64", "seed": seed, "epochs": 1}, profile=None,
                     out=None, method="dense")


def _weights(model) -> list[torch.Tensor]:
    return [t.clone() for t in model.state_dict().values()]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_initial_weights_follow_the_seed_not_the_global_generator():
    bundle = load_data("synthetic:64", (3, 32, 32))
    torch.manual_seed(1)
    first = _weights(_build_model(_job(0), bundle))
    after_first = torch.rand(1)
    torch.manual_seed(2)
    second = _weights(_build_model(_job(0), bundle))
    other_seed = _weights(_build_model(_job(1), bundle))
    assert _same(first, second)
    assert not _same(first, other_seed)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first), "building the model must not consume the caller's generator"


def _train(out, seed: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rcomp", "train", "--model", "tiny_cnn", "--data", "synthetic:128", "--epochs", "1",
           "--attack", "none", "--seed", str(seed), "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_with_one_command_train_the_same_model(tmp_path):
    procs = {name: _train(tmp_path / name, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    weights = {name: _weights(load_pruned(tmp_path / name / "model.pt")[0]) for name in procs}
    assert _same(weights["a"], weights["b"])
    assert not _same(weights["a"], weights["c"])
