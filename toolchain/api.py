"""The one-call entry points of ``import rcomp``: ``count_model``, ``export_onnx`` and ``check``.

Each is a thin front for the function the CLI uses (:func:`rcomp.count.count_model`,
:func:`rcomp.export.onnx_export.export_onnx`, :func:`rcomp.export.check.run_check`) with the
defaults a script wants, so a user's own loop reaches the same figures and the same gate as
``rcomp count`` / ``export`` / ``check``. (``rcomp.count`` and ``rcomp.export`` are modules
already, hence the longer names.) Nothing here imports torch at import time: ``rcomp.check``
must run on a board with only onnxruntime.
"""

from __future__ import annotations

import os

DEFAULT_OPSET = 17


def count_model(model, input_shape):
    """fvcore MACs and parameters of ``model`` for one input of ``input_shape`` ((C, H, W) or
    (N, C, H, W); batch 1 by convention): a :class:`rcomp.count.CostReport` (``.macs``, ``.mops``,
    ``.params``, ``.to_table()``)."""
    from rcomp.count import count_model as fvcore_count

    return fvcore_count(model, tuple(input_shape))


def export_onnx(model, input_shape, out, *, opset: int = DEFAULT_OPSET, metadata: dict | None = None,
           example_inputs=None):
    """Write ``model`` as ONNX to ``out`` (static shape ``input_shape`` with its batch dimension,
    the given opset, simplified by onnxsim), after checking onnxruntime against PyTorch on a few
    inputs (:class:`rcomp.export.onnx_export.ParityError` otherwise; nothing is written then).
    The file carries rcomp's count in its metadata (``rcomp.mops``, ``rcomp.params``) unless
    ``metadata`` sets them, so ``rcomp.check`` can judge it. Returns the ``ExportResult``."""
    import rcomp
    from rcomp.export import onnx_export

    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    cost = count_model(model, shape)
    meta = {"version": rcomp.__version__, "mops": f"{cost.macs / 1e6:.6f}", "params": str(cost.params),
            **{k: str(v) for k, v in (metadata or {}).items()}}
    return onnx_export.export_onnx(model, shape, out, opset=opset, metadata=meta, example_inputs=example_inputs)


def check(onnx_path, profile, *, attack_set: str | None = None, data_x=None, data_y=None, **options):
    """Judge an ONNX file against every budget and floor of ``profile`` (a
    :class:`rcomp.config.Profile`, or its name or path) as ``rcomp check`` does: a
    :class:`rcomp.export.check.CheckReport` (``.passed``, ``.rows``, ``.to_text()``). ``options``
    go to :func:`rcomp.export.check.run_check` (``square_queries``, ``latency_runs``, ``seed``...)."""
    from rcomp.config import resolve_profile
    from rcomp.export.check import run_check

    if isinstance(profile, (str, os.PathLike)):
        profile = resolve_profile(profile)
    return run_check(onnx_path, profile, attack_set=attack_set, data_x=data_x, data_y=data_y, **options)


def write_attack_set(model, x, y, out, profile=None, *, eps: float = 8 / 255, steps: int = 10, seed: int = 0):
    """Craft PGD examples on the PyTorch ``model`` for images ``x`` (pixels in [0, 1]) and labels
    ``y`` and write the ``.npz`` that :func:`check` (``attack_set=``) and ``rcomp check
    --attack-set`` read, as ``rcomp prune`` ships it (``adv.npz``). With a ``profile`` its
    robustness settings (eps, PGD steps and step size) are used, so the floors are judged at the
    profile's eps; otherwise ``eps`` and ``steps`` (step size eps / 4). The attack's random start
    is seeded: one model always ships the same set."""
    import torch

    from rcomp.attacks import pgd
    from rcomp.config import resolve_profile
    from rcomp.export.check import make_attack_set

    if isinstance(profile, (str, os.PathLike)):
        profile = resolve_profile(profile)
    rob = profile.robustness if profile is not None else None
    eps = rob.eps if rob is not None else eps
    steps = rob.pgd_steps if rob is not None else steps
    alpha = rob.pgd_step_size if rob is not None else eps / 4
    was_training = model.training
    try:
        x_adv = pgd(model.eval(), x, y, eps=eps, alpha=alpha, steps=steps,
                    generator=torch.Generator().manual_seed(seed))
    finally:
        model.train(was_training)
    return make_attack_set(os.fspath(out), x.detach().cpu().numpy(), y.detach().cpu().numpy(),
                           x_adv.detach().cpu().numpy(), eps, f"pgd-{steps}")
