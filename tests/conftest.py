"""Shared fixtures: one intra-op thread, a small MLP trained on near-identical prototypes, and the
bench scripts loaded from their files."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Two intra-op threads on a shared 2-core machine are ~100x slower for tiny convolutions."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def prototype_data(n: int, seed: int):
    """Ten 8x8 prototypes close enough together that a few /255 of perturbation matter."""
    protos = 0.5 + 0.03 * torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    y = torch.arange(n) % 10
    noise = 0.03 * torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return (protos[y] + noise).clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    """(model, x, y): an MLP fitted to 400 prototype samples, evaluated on 200 others."""
    torch.manual_seed(0)
    x, y = prototype_data(400, 0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, *prototype_data(200, 1)


BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def load_bench(monkeypatch):
    """``load_bench("name")``: bench/name.py as module ``name_under_test`` (bench/ is no package). The
    bench folder goes on sys.path, as the scripts import each other by name, and the module into
    sys.modules, where dataclasses look their module up; both are undone after the test."""

    def load(name: str):
        monkeypatch.syspath_prepend(str(BENCH))
        spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        return module

    return load
