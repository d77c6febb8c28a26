"""Guards against hostile or careless input: size caps, output-path checks and the output lock.

Everything here runs before any work starts, so a bad path or a second job on the same output
fails in a second with exit code 2 instead of after an hour of training. No torch (the checking
half imports this on boards without it). See docs/bad-input.md for the promises these keep.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

from rcomp.errors import RcompError

#: Largest image side rcomp accepts (profiles, --input, checkpoints, data): the 32x32 and 224x224
#: inputs edge models take are far below it, while a 10^5 x 10^5 input would ask for 10^10 floats
#: per channel before the first layer ran.
MAX_INPUT_SIDE = 4096
#: Largest channel count of an input image (1 grey, 3 RGB, 4 RGBA; more is a typo).
MAX_INPUT_CHANNELS = 16
#: Largest YAML file (profile, recipe) read: real ones are a few hundred bytes.
MAX_YAML_BYTES = 1024 * 1024
#: How much of a bad value an error message quotes back.
EXCERPT_CHARS = 40


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """At most ``limit`` characters of ``text`` on one line, so an error never echoes a file."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def check_input_shape(shape: Sequence[int], what: str) -> None:
    """Refuse (C, H, W) / (N, C, H, W) shapes too large to allocate, before anything allocates them."""
    dims = [int(s) for s in shape]
    if len(dims) < 3:
        return
    c, h, w = dims[-3:]
    if h > MAX_INPUT_SIDE or w > MAX_INPUT_SIDE or c > MAX_INPUT_CHANNELS:
        raise RcompError(f"{what}: input {'x'.join(map(str, dims))} is too large "
                         f"(at most {MAX_INPUT_CHANNELS} channels and {MAX_INPUT_SIDE} pixels a side)")


# --------------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (what a ``mkdir -p`` would start from)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """An output file (``--json``, ``export --out``): its folder exists and is writable, and the
    path is not a folder. Checked before any work, so a typo costs a second, not a run."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise RcompError(f"{option} {path}: is a folder, expected a file name")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise RcompError(f"{option} {path}: the folder {folder} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RcompError(f"{option} {path}: the folder {folder} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise RcompError(f"{option} {path}: the file exists and is not writable")
    return p


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """An output folder (``train``/``prune --out``): not an existing file (rcomp never moves a user's
    file aside), and creatable/writable from its nearest existing ancestor."""
    p = Path(path)
    for name in (p, p.with_name(p.name + ".partial")):
        if name.exists() and not name.is_dir():
            raise RcompError(f"{option} {path}: {name} is an existing file, expected a folder (rcomp does not move files)")
    base = _nearest_existing(p.absolute())
    if not base.is_dir():
        raise RcompError(f"{option} {path}: {base} is a file, so the folder cannot be created")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RcompError(f"{option} {path}: {base} is not writable")
    return p


# --------------------------------------------------------------------------------------------
# The output lock
# --------------------------------------------------------------------------------------------


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of an output (folder or file): ``.NAME.lock`` beside it."""
    p = Path(out).absolute()
    return p.with_name(f".{p.name}.lock")


class OutputLock:
    """An exclusive ``flock`` on ``.OUT.lock`` for the life of one job.

    A second job on the same output fails at once (exit 2) instead of interleaving its files with
    the first's. The kernel drops the lock when the process dies, so a killed run (kill -9, OOM)
    never leaves a stale lock; the file itself is removed on a clean release. Where ``fcntl`` does
    not exist (Windows) the lock is a no-op.
    """

    def __init__(self, out: str | os.PathLike, option: str = "--out"):
        self.out, self.option = Path(out), option
        self.path = lock_path(out)
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RcompError(f"{self.option} {self.out}: another rcomp job is writing to it "
                                 f"(lock {self.path}); wait for it or choose another output") from None
            if self._same_file(fd):
                break
            os.close(fd)  # the holder released and removed the file between our open and flock: retry
        self._fd = fd
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked, so no one can hold a lock on an unlinked file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked_output_file(path: str | os.PathLike | None, option: str) -> Iterator[None]:
    """Check an output file's path and hold its lock for the block (nothing when ``path`` is None)."""
    if path is None:
        yield
        return
    check_output_file(path, option)
    with OutputLock(path, option):
        yield
