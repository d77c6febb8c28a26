"""The Python API: docs/python-api.md's loop as written, the pruner's step rules, and the CLI's
trainer built on the same object."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rcomp
from rcomp.data import load_data, make_loader
from rcomp.errors import RcompError
from rcomp.models import create_model
from rcomp.train import TrainConfig, lr_at_step, stream_seed, train

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 12, 12)
INPUT = (1, *SHAPE)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", SHAPE)


def _model(bundle, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("tiny_cnn", bundle.num_classes, SHAPE[0], bundle.mean, bundle.std)


def _batches(bundle, n: int | None = None, batch_size: int = 64):
    batches = list(make_loader(bundle.split("train"), batch_size, shuffle=True, seed=0, epoch=1))
    return batches[:n] if n else batches


def _python_block(path: Path) -> str:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)[0]


def _profile(tmp_path: Path, mops: float) -> Path:
    """A board profile for the test's 12x12 digits: the docs' budget, low floors, one thread."""
    path = tmp_path / "digits-board.yaml"
    path.write_text(f"""name: digits-board
description: test board for 12x12 digits
target: {{runtime: onnxruntime, execution_provider: CPUExecutionProvider, threads: 1, graph_optimization: all}}
input_shape: [1, 1, 12, 12]
opset: 17
budgets: {{mops: {mops}, latency_p90_ms: 1000}}
robustness: {{eps: 8/255, min_clean_acc: 0.05, min_adv_acc: 0.0, pgd_steps: 3}}
""")
    return path


def test_the_docs_loop_prunes_to_the_budget_exports_with_parity_and_passes_the_check(digits, tmp_path,
                                                                                       monkeypatch):
    dense_macs = rcomp.count_model(_model(digits), INPUT).macs
    profile = _profile(tmp_path, mops=0.5 * dense_macs / 1e6)
    code = _python_block(ROOT / "docs" / "python-api.md").replace('"jetson"', repr(str(profile)))
    monkeypatch.chdir(tmp_path)
    scope = {"model": _model(digits), "loader": _batches(digits), "epochs": 1, "input_shape": INPUT}
    exec(compile(code, "docs/python-api.md", "exec"), scope)

    pruner, slim, report = scope["pruner"], scope["slim"], scope["report"]
    assert pruner.frozen and pruner.projection is not None and pruner.status()["satisfied"]
    assert any(bool((p <= 0).any()) for p in pruner.masks.params)  # it pruned
    macs = rcomp.count_model(slim, INPUT).macs
    assert macs <= 0.5 * dense_macs and macs == pruner.status()["ops"]  # fvcore agrees with the cost model
    assert all(m.out_channels % 8 == 0 for m in slim.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.stack([digits.split("val")[i][0] for i in range(64)])
    with torch.no_grad():
        ref = slim(x).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    got = np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    assert np.array_equal(got.argmax(1), ref.argmax(1)) and np.abs(got - ref).max() <= 1e-4
    assert report.passed, report.to_text()


def test_the_readme_loop_runs_as_written(digits, tmp_path, monkeypatch, capsys):
    """README's short version of the loop (its shapes and profile swapped for the test's 12x12 digits)."""
    dense_macs = rcomp.count_model(_model(digits), INPUT).macs
    profile = _profile(tmp_path, mops=0.5 * dense_macs / 1e6)
    code = _python_block(ROOT / "README.md").replace("(1, 3, 32, 32)", repr(INPUT)).replace('"jetson"', repr(str(profile)))
    monkeypatch.chdir(tmp_path)
    scope = {"model": _model(digits), "loader": _batches(digits), "epochs": 1, "torch": torch, "F": F, "rcomp": rcomp}
    exec(compile(code, "README.md", "exec"), scope)
    assert capsys.readouterr().out.strip().splitlines()[-1] == "True"  # the check passed
    assert rcomp.count_model(scope["slim"], INPUT).macs <= 0.5 * dense_macs
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "adv.npz").is_file()


def test_the_cli_trainer_and_a_loop_of_ones_own_give_the_same_masks(digits):
    """The same seed, batches, attack draws and LR schedule through ``rcomp.train`` and through a
    plain loop on :class:`InTrainPruner`: the same masks and weights, bit for bit."""
    config = TrainConfig(epochs=1, regularity="channel", target_ops=0.5, mask_init="magnitude", mask_start=0.2,
                         co_guard=False, batch_size=64, lr_max=0.1, eval_size=50, eval_pgd_steps=1, progress=False)
    trained = train(config, digits, _model(digits), out_dir=None, log=lambda line: None).model

    torch.manual_seed(config.seed)
    batches = _batches(digits)
    pruner = rcomp.InTrainPruner(_model(digits), torch.zeros(INPUT), {"ops": 0.5}, total_steps=len(batches),
                                 mask_start=0.2, mask_init="magnitude")
    opt = torch.optim.SGD(pruner.param_groups(weight_decay=config.weight_decay), lr=config.lr_max,
                          momentum=config.momentum, nesterov=True)
    attack_draws = torch.Generator().manual_seed(stream_seed(config.seed, 1, 2))
    pruner.model.train()
    for step, (x, y) in enumerate(batches, start=1):
        for group in opt.param_groups:
            group["lr"] = lr_at_step(config, step, len(batches))
        x_adv = rcomp.attacks.fgsm_rs(pruner.model, x, y, eps=config.eps, generator=attack_draws)
        loss = F.cross_entropy(pruner.model(x_adv), y) + pruner.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pruner.step()

    assert pruner.frozen
    ours, theirs = pruner.model.state_dict(), trained.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]


def test_penalty_carries_the_budget_gradient_scaled_by_cost_share_in_one_backward(digits):
    pruner = rcomp.InTrainPruner(_model(digits), torch.zeros(INPUT), {"ops": 0.4}, total_steps=10)
    x, y = _batches(digits, 1)[0]
    masks = list(pruner.masks.params)
    task = torch.autograd.grad(F.cross_entropy(pruner.model(x), y), masks, allow_unused=True)
    raw = torch.autograd.grad(pruner.controller.penalty(pruner.progress), masks, allow_unused=True)

    loss = F.cross_entropy(pruner.model(x), y)
    penalty = pruner.penalty()
    (loss + penalty).backward()
    assert float(penalty.detach()) == pytest.approx(float(pruner.controller.penalty(pruner.progress).detach()))
    scales = pruner.budget_scale
    assert len({round(float(s), 4) for s in torch.cat([s.flatten() for s in scales])}) > 1  # units differ in cost
    for p, t, r, s in zip(masks, task, raw, scales):
        want = (t if t is not None else 0) + (r * s if r is not None else 0)
        assert torch.allclose(p.grad, want, atol=1e-7)
    weights = [p for p in pruner.model.weight_parameters() if p.grad is not None]
    assert weights  # and the weights got the task's gradient from the same backward


def test_step_limits_switch_offs_clips_and_freezes_at_its_fraction(digits):
    pruner = rcomp.InTrainPruner(_model(digits), torch.zeros(INPUT), {"ops": 0.5}, total_steps=5, freeze_at=0.6,
                                 max_switch_off=0.001)
    x, y = _batches(digits, 1)[0]
    (F.cross_entropy(pruner.model(x), y) + pruner.penalty()).backward()
    with torch.no_grad():  # what an optimizer step that switches many units off and overshoots would do
        for p in pruner.masks.params:
            p.sub_(3.0)
    assert pruner.step() is None and pruner.steps == 1
    values = torch.cat([p.detach().flatten() for p in pruner.masks.params])
    assert int((values <= 0).sum()) == 1  # one unit (0.1 % of them, at least one) switched off
    assert float(values.min()) >= -1.0 and float(values.max()) <= 1.0  # clipped
    assert pruner.controller.multipliers[0] > 0  # over budget: the multiplier rose
    events = [pruner.step() for _ in range(2)]
    assert events[0] is None and events[1] is not None and events[1]["satisfied"]  # at 3/5 >= 0.6
    assert pruner.frozen and not any(p.requires_grad for p in pruner.masks.params)
    assert float(pruner.penalty()) == 0.0


def test_masks_wait_for_mask_start_and_a_resumed_pruner_continues_alike(digits):
    def run(steps, pruner, opt, batches):
        for x, y in batches[:steps]:
            loss = F.cross_entropy(pruner.model(x), y) + pruner.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step()

    def make():
        pruner = rcomp.InTrainPruner(_model(digits), torch.zeros(INPUT), {"ops": 0.5}, total_steps=8,
                                     mask_start=0.25, mask_init="magnitude", warmup=0.25, freeze_at=0.75)
        return pruner, torch.optim.SGD(pruner.param_groups(weight_decay=5e-4), lr=0.1, momentum=0.9)

    batches = _batches(digits, 8)
    whole, opt = make()
    assert whole.start_step == 2 and not whole.learning and not any(p.requires_grad for p in whole.masks.params)
    run(2, whole, opt, batches)
    assert whole.learning and all(p.requires_grad for p in whole.masks.params)
    saved = (whole.model.state_dict(), opt.state_dict(), whole.state_dict())
    saved = copy.deepcopy(saved)
    run(6, whole, opt, batches[2:])

    resumed, opt2 = make()
    resumed.model.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    resumed.load_state_dict(saved[2])
    run(6, resumed, opt2, batches[2:])
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert whole.frozen and resumed.frozen and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.controller.multipliers == whole.controller.multipliers


def test_budgets_from_a_dict_or_a_profile_and_one_line_errors(digits):
    pruner = rcomp.InTrainPruner(_model(digits), torch.zeros(INPUT), {"ops": 0.5, "param_count": 9000},
                                 total_steps=4)
    limits = {c.metric: c.limit for c in pruner.controller.constraints}
    assert limits == {"ops": pytest.approx(0.5 * pruner.cost.dense_ops), "params": 9000.0}
    from rcomp.config import resolve_profile

    jetson = resolve_profile("jetson")
    by_profile = rcomp.InTrainPruner(_model(digits), torch.zeros(INPUT), "jetson", total_steps=4)
    assert [c.limit for c in by_profile.controller.constraints] == [jetson.budgets.mops * 1e6]
    assert by_profile.masks.channel_multiple == jetson.target.channel_multiple == 8
    no_budget = rcomp.InTrainPruner(_model(digits), torch.zeros(INPUT), None, total_steps=4)
    assert no_budget.controller is None and float(no_budget.penalty()) == 0.0
    with pytest.raises(RcompError, match="unknown budget key 'flops'"):
        rcomp.InTrainPruner(_model(digits), torch.zeros(INPUT), {"flops": 0.5}, total_steps=4)
    with pytest.raises(RcompError, match="total_steps"):
        rcomp.InTrainPruner(_model(digits), torch.zeros(INPUT), {"ops": 0.5}, total_steps=0)


def test_weight_masks_finalize_to_the_same_shapes_with_zeros(digits):
    pruner = rcomp.InTrainPruner(_model(digits), torch.zeros(INPUT), {"ops": 0.5}, total_steps=2,
                                 regularity="weight")
    assert pruner.budget_scale is None  # the cost-share scaling is for channel groups
    slim = pruner.finalize()
    shapes = {k: v.shape for k, v in _model(digits).state_dict().items()}
    assert {k: v.shape for k, v in slim.state_dict().items()} == shapes  # dense shapes
    zeros = sum(int((m.weight == 0).sum()) for m in slim.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert zeros > 0 and pruner.status()["satisfied"] and pruner.status()["ops_ratio"] <= 0.5


def test_import_rcomp_stays_light_and_the_api_loads_on_first_use():
    code = ("import sys, rcomp; light = 'torch' not in sys.modules; rcomp.check; still = 'torch' not in sys.modules; "
            "rcomp.InTrainPruner, rcomp.attacks.fgsm_rs, rcomp.count_model, rcomp.export_onnx; "
            "sys.exit(0 if light and still and 'torch' in sys.modules else 1)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    with pytest.raises(AttributeError):
        rcomp.no_such_name  # noqa: B018
