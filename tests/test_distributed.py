"""Data-parallel training under torchrun (gloo on CPU) and the CUDA path (skipped without a GPU).

The torchrun tests start ``rcomp train`` on two ranks through ``tests/ddp_run.py``, which records each
rank's final state and the batches it trained on; they check that the ranks saw different data yet
ended bit-identical (weights, masks, BatchNorm statistics), that exactly one output folder was
written, and that a resumed run ends exactly where the uninterrupted one did.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcomp.data import load_data, make_loader
from rcomp.errors import RcompError
from rcomp.models import create_model
from rcomp.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "ddp_run.py"
RECIPE = "epochs: 2\nbatch_size: 32\nlr_max: 0.1\neval_size: 64\neval_pgd_steps: 2\n"
SHAPE = (1, 12, 12)
NO_CUDA = "no CUDA device on this machine (torch.cuda.is_available() is False)"


def _profile(tmp: Path) -> Path:
    """The lenient test profile at a 1x12x12 input, so two CPU ranks train in seconds."""
    text = (HERE / "data" / "profiles" / "test-lenient.yaml").read_text()
    path = tmp / "small.yaml"
    path.write_text(text.replace("input_shape: [1, 3, 32, 32]", "input_shape: [1, 1, 12, 12]"))
    return path


def _torchrun(tmp: Path, dump: Path, out: Path, *extra: str, recipe: str = RECIPE) -> subprocess.CompletedProcess:
    (tmp / "recipe.yaml").write_text(recipe)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(DRIVER),
           str(dump), "train", "--model", "tiny_cnn", "--data", "synthetic:400", "--profile", str(_profile(tmp)),
           "--target-ops", "0.5", "--recipe", str(tmp / "recipe.yaml"), "--no-progress", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _ranks(dump: Path) -> list[dict]:
    return [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_masks_every_step(r0: dict, r1: dict) -> bool:
    """Equal final states are not enough: DDP broadcasts rank 0's parameters whenever it is built
    again (at the freeze), so masks that drifted apart while learning would end equal anyway."""
    steps = r0["mask_steps"]
    return len(steps) == len(r1["mask_steps"]) == len(r0["batches"]) and all(
        torch.equal(a, b) for a, b in zip(steps, r1["mask_steps"]))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    proc = _torchrun(tmp, tmp / "dump", tmp / "out" / "run")
    return tmp, proc, _ranks(tmp / "dump")


# --------------------------------------------------------------------------------------------
# sharding (no processes)


def test_rank_shares_partition_every_global_batch():
    bundle = load_data("synthetic:100", SHAPE)
    data = bundle.split("train")  # 90 images: 2 full batches of 40 and a tail of 10
    whole = [y.tolist() for _, y in make_loader(data, 40, shuffle=True, seed=3, epoch=2)]
    shares = [[y.tolist() for _, y in make_loader(data, 40, shuffle=True, seed=3, epoch=2, rank=r, world_size=3)]
              for r in range(3)]
    assert all(len(s) == len(whole) == 3 for s in shares)
    for i, batch in enumerate(whole):
        assert sorted(sum((s[i] for s in shares), [])) == sorted(batch)
        assert [len(s[i]) for s in shares] in ([14, 13, 13], [4, 3, 3])


def test_a_tail_smaller_than_the_world_is_dropped():
    data = load_data("synthetic:100", SHAPE).split("train")  # 90 = 2 * 44 + 2
    loaders = [make_loader(data, 44, shuffle=False, rank=r, world_size=3) for r in range(3)]
    assert [len(loader) for loader in loaders] == [2, 2, 2]
    assert [len(list(loader)) for loader in loaders] == [2, 2, 2]


# --------------------------------------------------------------------------------------------
# two ranks under torchrun


@pytest.mark.slow
def test_two_ranks_see_different_data_and_end_identical(two_ranks):
    _, _, (r0, r1) = two_ranks
    assert len(r0["batches"]) == len(r1["batches"]) == 24  # 2 epochs of the same 12 global batches
    sizes = [[n for n, _ in r["batches"]] for r in (r0, r1)]
    assert sizes[0] == sizes[1] and sum(sizes[0]) == 360  # each rank half of every batch of 360 training images
    assert all(a[1] != b[1] for a, b in zip(r0["batches"], r1["batches"]))  # different images
    assert _same_state(r0["state"], r1["state"])  # weights, masks and BatchNorm statistics, bit for bit
    assert _same_masks_every_step(r0, r1)
    masks = [v for k, v in r0["state"].items() if k.startswith("masks.")]
    assert masks and any(bool((m <= 0).any()) for m in masks)  # the masks pruned something
    strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in (r0, r1)]
    assert strip[0] == strip[1] and strip[0][-1]["ops_ratio"] <= 0.5


@pytest.mark.slow
def test_masks_that_wait_for_mask_start_learn_alike_on_every_rank_once_they_start(tmp_path):
    """Before mask_start the masks take no gradient (the trainer wraps DDP again when they start)."""
    _torchrun(tmp_path, tmp_path / "dump", tmp_path / "out", recipe=RECIPE + "mask_start: 0.4\n")
    r0, r1 = _ranks(tmp_path / "dump")
    assert _same_state(r0["state"], r1["state"])
    assert _same_masks_every_step(r0, r1)  # from the step they start (DDP wrapped again) to the freeze
    masks = torch.cat([v.flatten() for k, v in r0["state"].items() if k.startswith("masks.")])
    assert len(set(masks.tolist())) > len(masks) // 2  # they learned: no longer the few values of init and clip
    assert bool((masks <= 0).any()) and r0["history"][-1]["ops_ratio"] <= 0.5


@pytest.mark.slow
def test_ranks_that_slim_at_the_freeze_train_the_slim_network_alike(tmp_path):
    """After the freeze DDP is wrapped around the slim network: its gradients, not the masked one's, are reduced."""
    proc = _torchrun(tmp_path, tmp_path / "dump", tmp_path / "out", recipe=RECIPE + "slim_at_freeze: true\n")
    assert proc.stdout.count("slim from here on") == 1  # rank 0 alone logs
    r0, r1 = _ranks(tmp_path / "dump")
    assert _same_state(r0["state"], r1["state"]) and _same_masks_every_step(r0, r1)
    assert not any(k.startswith("masks.") for k in r0["state"]) and r0["history"][-1]["ops_ratio"] <= 0.5


@pytest.mark.slow
def test_only_rank_zero_writes_logs_and_one_output_folder(two_ranks):
    tmp, proc, _ = two_ranks
    assert os.listdir(tmp / "out") == ["run"]  # no run.partial, no second copy
    run = tmp / "out" / "run"
    assert sorted(os.listdir(run)) == ["checkpoints", "model.pt", "train.json"]
    assert sorted(os.listdir(run / "checkpoints")) == [
        "ckpt-epoch0001.pt", "ckpt-epoch0001.pt.sha256", "ckpt-epoch0002.pt", "ckpt-epoch0002.pt.sha256"]
    assert proc.stdout.count("model written to") == 1 and proc.stdout.count("epoch 2/2") == 1


@pytest.mark.slow
def test_resumed_ranks_end_where_the_uninterrupted_run_did(two_ranks):
    tmp, _, (r0, _) = two_ranks
    out = tmp / "resumed" / "run"
    shutil.copytree(tmp / "out" / "run" / "checkpoints", out / "checkpoints")
    for stale in (out / "checkpoints").glob("ckpt-epoch0002.pt*"):
        stale.unlink()  # as if killed during epoch 2
    proc = _torchrun(tmp, tmp / "dump-resumed", out, "--resume")
    assert "resumed from" in proc.stdout and "ckpt-epoch0001.pt" in proc.stdout
    s0, s1 = _ranks(tmp / "dump-resumed")
    assert _same_state(s0["state"], s1["state"]) and _same_state(s0["state"], r0["state"])


# --------------------------------------------------------------------------------------------
# guards that need no process group


def test_methods_outside_the_training_loop_are_refused_under_torchrun(monkeypatch):
    from rcomp.pipeline import build_job

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    opts = {"model_name": "tiny_cnn", "data_spec": "synthetic:100", "target_ops": 0.5}
    with pytest.raises(RcompError, match="posttrain does not run under torchrun"):
        build_job(opts, profile=None, out="unused", method="posttrain")


def test_a_rank_other_than_zero_touches_no_file(monkeypatch, tmp_path):
    from rcomp.pipeline import StagedOutput

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    staged = StagedOutput(tmp_path / "run", resume=False)
    staged.publish()
    assert os.listdir(tmp_path) == []


def test_amp_is_ignored_on_cpu():
    bundle = load_data("synthetic:200", SHAPE)
    config = dict(epochs=1, batch_size=32, eval_size=32, eval_pgd_steps=1, regularity="channel", target_ops=0.5,
                  progress=False)
    states, lines = [], []
    for amp in (False, True):
        torch.manual_seed(0)
        model = create_model("tiny_cnn", bundle.num_classes, 1, bundle.mean, bundle.std)
        states.append(train(TrainConfig(amp=amp, **config), bundle, model, out_dir=None, log=lines.append).model.state_dict())
    assert _same_state(*states) and any("CUDA only" in line for line in lines)


# --------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_training_with_amp_and_channels_last():
    bundle = load_data("synthetic:400", (3, 16, 16))
    torch.manual_seed(0)
    model = create_model("tiny_cnn", bundle.num_classes, 3, bundle.mean, bundle.std)
    config = TrainConfig(epochs=2, batch_size=64, eval_size=64, eval_pgd_steps=2, regularity="channel", target_ops=0.5,
                         device="cuda", amp=True, progress=False)
    result = train(config, bundle, model, out_dir=None, log=lambda _: None)
    params = list(result.model.parameters())
    assert all(p.is_cuda and p.dtype == torch.float32 for p in params)  # AMP keeps fp32 master weights
    assert all(p.is_contiguous() for p in params)  # channels_last undone for surgery and export
    assert result.budget_status["satisfied"] and result.history[-1].val_clean is not None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices for NCCL (found "
                    f"{torch.cuda.device_count()})")
def test_two_gpus_with_nccl_end_identical(tmp_path):
    _profile(tmp_path)
    (tmp_path / "recipe.yaml").write_text(RECIPE + "amp: true\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(DRIVER),
           str(tmp_path / "dump"), "train", "--model", "tiny_cnn", "--data", "synthetic:400", "--profile",
           str(tmp_path / "small.yaml"), "--target-ops", "0.5", "--recipe", str(tmp_path / "recipe.yaml"),
           "--device", "cuda", "--no-progress", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = _ranks(tmp_path / "dump")
    assert _same_state(r0["state"], r1["state"])
