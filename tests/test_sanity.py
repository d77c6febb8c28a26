"""Attack sanity checks: a normally trained model passes, gradient-masking models are flagged."""

import pytest
import torch
from torch import nn

from rcomp.sanity import FLAG, run_sanity

EPS = 4 / 255  # this data is fragile at 4/255: PGD accuracy well below clean, not zero


class Quantize(nn.Module):
    """round(4x)/4 in front of the model: the gradient is zero almost everywhere (shattered)."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class Saturate(nn.Module):
    """Huge logits: softmax saturates, the cross-entropy gradient underflows to exactly zero."""

    def forward(self, logits):
        return logits * 1e4


def _failed(report):
    return {r.name for r in report.rows if not r.passed}


def test_normally_trained_model_passes(trained):
    model, x, y = trained
    report = run_sanity(model, x, y, eps=EPS)
    assert report.passed, report.to_text()
    acc = report.accuracies
    assert acc["clean"] >= 0.9 and acc["pgd10"] < acc["clean"] - 0.1 and acc["pgd_large_eps"] <= 0.05
    assert report.flags == []


def test_the_model_mode_is_restored(trained):
    model, x, y = trained
    model.train()
    run_sanity(model, x[:50], y[:50], eps=EPS, restarts=1)
    assert model.training


@pytest.mark.parametrize("wrap", ["quantized input", "saturated softmax"])
def test_gradient_masking_is_flagged(trained, wrap):
    model, x, y = trained
    masked = nn.Sequential(Quantize(), model) if wrap == "quantized input" else nn.Sequential(model, Saturate())
    report = run_sanity(masked, x, y, eps=EPS)
    assert not report.passed
    assert {"examples with zero input gradient", "PGD accuracy at eps=64/255"} <= _failed(report)
    assert report.flags and all(f.startswith(FLAG) for f in report.flags)
    assert "FAIL" in report.to_text()


def test_black_box_beating_white_box_is_flagged(trained):
    model, x, y = trained
    report = run_sanity(model, x, y, eps=EPS, blackbox_acc=0.0, restarts=1)
    assert "black-box - white-box accuracy" in _failed(report)
    ok = run_sanity(model, x, y, eps=EPS, blackbox_acc=1.0, restarts=1)
    assert ok.passed


def test_report_serializes(trained):
    model, x, y = trained
    d = run_sanity(model, x[:40], y[:40], eps=EPS, restarts=1).to_dict()
    assert set(d) >= {"eps", "n", "passed", "rows", "flags", "accuracies"}
    assert all(set(r) == {"name", "value", "expected", "passed", "note"} for r in d["rows"])
