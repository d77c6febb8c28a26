"""Checkpoints: atomic + verified, fall back past a truncated or corrupt newest file, RNG round trip."""

import json
import random
import warnings

import numpy as np
import pytest
import torch

from rcomp.checkpoint import (
    CheckpointManager,
    CheckpointWarning,
    capture_rng_state,
    load_checked,
    restore_rng_state,
    save_atomic,
)
from rcomp.errors import CheckpointError


def _state(epoch):
    return {"epoch": epoch, "model": {"w": torch.full((64, 64), float(epoch))}, "history": [{"loss": 0.5}],
            "best": None, "rng": capture_rng_state()}


def _saved(tmp_path, epochs=(1, 2), keep=2):
    manager = CheckpointManager(tmp_path / "ckpt", keep=keep)
    for e in epochs:
        manager.save(_state(e), e)
    return manager


def test_save_is_verified_and_loads_with_weights_only(tmp_path):
    manager = _saved(tmp_path, epochs=(1, 2))
    (manager.directory / ".ckpt-epoch0003.tmp-0badf00d.pt").write_bytes(b"half a save")  # a killed write
    manager.save(_state(3), 3)
    names = sorted(p.name for p in manager.directory.iterdir())
    assert names == ["ckpt-epoch0002.pt", "ckpt-epoch0002.pt.sha256", "ckpt-epoch0003.pt", "ckpt-epoch0003.pt.sha256"]
    state, path = manager.load_latest()
    assert path.name == "ckpt-epoch0003.pt" and state["epoch"] == 3
    assert torch.equal(state["model"]["w"], torch.full((64, 64), 3.0))
    assert torch.load(path, weights_only=True)["epoch"] == 3
    meta = json.loads((path.parent / (path.name + ".sha256")).read_text())
    assert meta["bytes"] == path.stat().st_size and len(meta["sha256"]) == 64


def _load_with_warning(manager):
    with pytest.warns(CheckpointWarning) as caught:
        state, path = manager.load_latest()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0]
    return state, path, messages[0]


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    manager = _saved(tmp_path)
    newest = manager.path_for(2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    state, path, message = _load_with_warning(manager)
    assert state["epoch"] == 1 and path == manager.path_for(1)
    assert "ckpt-epoch0002.pt" in message and "truncated" in message


def test_flipped_byte_is_a_checksum_mismatch(tmp_path):
    manager = _saved(tmp_path)
    newest = manager.path_for(2)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    state, _, message = _load_with_warning(manager)
    assert state["epoch"] == 1
    assert "ckpt-epoch0002.pt" in message and "checksum mismatch" in message


def test_corrupted_checksum_file_falls_back(tmp_path):
    manager = _saved(tmp_path)
    sidecar = manager.path_for(2).with_name("ckpt-epoch0002.pt.sha256")
    meta = json.loads(sidecar.read_text())
    meta["sha256"] = "0" * 64
    sidecar.write_text(json.dumps(meta))
    state, _, message = _load_with_warning(manager)
    assert state["epoch"] == 1 and "ckpt-epoch0002.pt" in message and "checksum mismatch" in message


def test_checkpoint_without_its_checksum_file_is_not_trusted(tmp_path):
    manager = _saved(tmp_path)
    manager.path_for(2).with_name("ckpt-epoch0002.pt.sha256").unlink()  # killed between the two writes
    state, _, message = _load_with_warning(manager)
    assert state["epoch"] == 1 and "no checksum file" in message


def test_no_checkpoint_is_none_and_all_bad_is_an_error(tmp_path):
    assert CheckpointManager(tmp_path / "empty").load_latest() is None
    manager = _saved(tmp_path, epochs=(1,))
    manager.path_for(1).write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointError, match="no usable checkpoint"):
            manager.load_latest()


def test_custom_warn_callback_and_load_checked(tmp_path):
    seen = []
    manager = CheckpointManager(tmp_path, warn=seen.append)
    manager.save(_state(1), 1)
    manager.save(_state(2), 2)
    manager.path_for(2).write_bytes(b"garbage")
    assert manager.load_latest()[0]["epoch"] == 1 and len(seen) == 1
    with pytest.raises(CheckpointError, match="ckpt-epoch0002.pt"):
        load_checked(manager.path_for(2))


def test_pickled_code_is_refused(tmp_path):
    path = save_atomic({"fn": random.Random}, tmp_path / "bad.pt")  # checksum fine, content not plain
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checked(path)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leave a cached gaussian in numpy's state
    path = save_atomic({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.standard_normal()), torch.rand(3))
    restore_rng_state(load_checked(path)["rng"])
    got = (random.random(), float(np.random.standard_normal()), torch.rand(3))
    assert expected[0] == got[0] and expected[1] == got[1] and torch.equal(expected[2], got[2])
