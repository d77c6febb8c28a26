"""Resumable training checkpoints: atomic, checksummed, loaded without unpickling code.

A checkpoint is ``ckpt-epoch{N:04d}.pt`` (``torch.save`` bytes) plus a JSON sidecar
``ckpt-epoch{N:04d}.pt.sha256`` holding the SHA-256 and byte count of exactly those bytes. Both are
written atomically (temp file, fsync, ``os.replace``) and the sidecar is written *after* the
checkpoint, so a checkpoint counts only once its sidecar vouches for it: a process killed at any
point leaves either the previous good set or the new one. The sidecar's byte count lets a load
tell "truncated" from "checksum mismatch", which says whether the disk or the bits are to blame.

States hold tensors and plain Python values only (``torch.load(weights_only=True)``); the RNG
helpers below turn every RNG state into such values.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rcomp.errors import CheckpointError

from rcomp.reports import write_bytes_atomic

_NAME = re.compile(r"^ckpt-epoch(\d{4,})\.pt$")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt, truncated, unverified) and an older one used instead."""


# --------------------------------------------------------------------------------------------
# single files


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` and then its checksum sidecar, each atomically."""
    path = Path(path)
    data = _serialize(obj)
    write_bytes_atomic(path, data)
    meta = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    write_bytes_atomic(_sidecar(path), (json.dumps(meta) + "\n").encode())
    return path


def verify(path: str | Path) -> str | None:
    """``None`` if ``path`` matches its sidecar, else the reason it cannot be trusted."""
    path = Path(path)
    try:
        meta = json.loads(_sidecar(path).read_text())
        expected_hash, expected_size = meta["sha256"], int(meta["bytes"])
    except FileNotFoundError:
        return "no checksum file (save interrupted?)"
    except (ValueError, KeyError, TypeError):
        return "unreadable checksum file"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing"
    if len(data) < expected_size:
        return f"truncated ({len(data)} of {expected_size} bytes)"
    if len(data) != expected_size or hashlib.sha256(data).hexdigest() != expected_hash:
        return "checksum mismatch"
    return None


def load_checked(path: str | Path, map_location: Any = "cpu") -> Any:
    """Load a verified checkpoint; :class:`CheckpointError` with the reason otherwise."""
    path = Path(path)
    reason = verify(path)
    if reason is None:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not loadable"
            reason = f"not loadable with weights_only=True ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    raise CheckpointError(f"{path}: {reason}")


# --------------------------------------------------------------------------------------------
# a directory of epochs


class CheckpointManager:
    """Per-epoch checkpoints in one folder, keeping the newest ``keep`` good ones.

    ``warn`` receives the one-line message when a checkpoint is skipped; by default it is
    issued as a :class:`CheckpointWarning`.
    """

    def __init__(self, directory: str | Path, keep: int = 2, warn: Callable[[str], None] | None = None):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = Path(directory)
        self.keep = keep
        self._warn = warn

    def path_for(self, epoch: int) -> Path:
        return self.directory / f"ckpt-epoch{epoch:04d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(epoch, path) of every checkpoint file present, newest first (verified or not)."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found, reverse=True)

    def save(self, state: dict, epoch: int) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = save_atomic(state, self.path_for(epoch))
        self._prune()
        return path

    def _prune(self) -> None:
        """Delete everything older than the newest ``keep`` good checkpoints (bad ones included),
        and temp files a killed save left behind (hidden ``.ckpt-epoch*.tmp-*``)."""
        for stale in self.directory.glob(".ckpt-epoch*.tmp-*"):
            _unlink(stale)
        good = 0
        for _, path in self.checkpoints():
            if good >= self.keep:
                _unlink(path)
                _unlink(_sidecar(path))
            elif verify(path) is None:
                good += 1

    def load_latest(self, map_location: Any = "cpu") -> tuple[dict, Path] | None:
        """The newest checkpoint that verifies, falling back past bad ones with a warning.

        ``None`` when there is no checkpoint at all; :class:`CheckpointError` when there are
        checkpoints but none is good, because silently starting over would discard a run.
        """
        candidates = self.checkpoints()
        if not candidates:
            return None
        for _, path in candidates:
            try:
                return load_checked(path, map_location), path
            except CheckpointError as exc:
                self._emit(f"skipping checkpoint {exc}; falling back to the previous one")
        raise CheckpointError(f"no usable checkpoint in {self.directory} ({len(candidates)} found, all bad)")

    def _emit(self, message: str) -> None:
        if self._warn is not None:
            self._warn(message)
        else:
            warnings.warn(message, CheckpointWarning, stacklevel=3)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------------
# RNG states as plain values


def capture_rng_state() -> dict:
    """Every global RNG as tensors / lists, so ``weights_only=True`` can load it back."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
