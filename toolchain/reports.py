"""Atomic file output and plain-text tables.

A run that is killed (Ctrl-C, OOM, a full disk) must never leave a half-written report, ONNX file
or checkpoint where a later step would read it, so every output goes to a temp file in the same
folder and is renamed into place: ``os.replace`` is atomic on POSIX and Windows within one file
system. No torch here: the checking half writes its reports on boards without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

__all__ = [
    "atomic_output",
    "render_markdown_table",
    "render_table",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def _temp_path(path: Path) -> Path:
    # Keep the suffix last so libraries that pick a format from the extension still work; the
    # leading dot hides leftovers from globbing (``*.onnx``) should the process be SIGKILLed.
    return path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}{path.suffix}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not possible on Windows or some network file systems."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; it replaces ``path`` only if the block succeeds.

    For libraries that insist on writing the file themselves (``onnx.save``, ``torch.save``).
    The temp file does not exist when the block starts, so writers that refuse to overwrite work.
    """
    final = Path(path)
    tmp = _temp_path(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_output: the block did not write {tmp}")
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(final.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    final = Path(path)
    tmp = _temp_path(final)
    try:
        # O_EXCL with mode 0o666 lets the umask decide permissions, as a plain open() would;
        # tempfile.mkstemp would leave every report readable by its owner only (0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(final.parent)
    return final


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes_atomic(path, text.encode(encoding))


def _jsonable(obj: Any) -> Any:
    """Fallback for json.dumps: the values reports actually contain (dataclasses, numpy, paths)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """JSON with indent 2 and keys in insertion order; serialized fully before the file is touched."""
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, default=_jsonable)
    return write_text_atomic(path, text + "\n")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _cell(value: Any, float_format: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isfinite(value):
        return format(value, float_format)
    return str(value)


def _is_numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _normalize(
    rows: Sequence[Mapping[str, Any] | Sequence[Any]],
    headers: Sequence[str] | Mapping[str, str] | None,
) -> tuple[list[str], list[list[Any]]]:
    """(header labels, row values); dict rows pick their columns by key, list rows by position."""
    if rows and isinstance(rows[0], Mapping):
        if headers is None:
            keys = list(dict.fromkeys(k for row in rows for k in row))  # union, first-seen order
            headers = keys
        keys = list(headers)
        labels = [headers[k] for k in keys] if isinstance(headers, Mapping) else keys
        return labels, [[row.get(k) for k in keys] for row in rows]  # type: ignore[union-attr]
    if headers is None:
        raise ValueError("headers are required for list rows")
    labels = list(headers.values()) if isinstance(headers, Mapping) else list(headers)
    for row in rows:
        if len(row) != len(labels):
            raise ValueError(f"row has {len(row)} cells, headers have {len(labels)}: {row!r}")
    return labels, [list(row) for row in rows]


def _prepare(rows, headers, float_format):
    labels, values = _normalize(rows, headers)
    numeric = [
        bool(values) and all(v is None or _is_numeric(v) for v in col) and any(v is not None for v in col)
        for col in zip(*values)
    ] or [False] * len(labels)
    cells = [[_cell(v, float_format) for v in row] for row in values]
    return labels, cells, numeric


def render_table(
    rows: Sequence[Mapping[str, Any] | Sequence[Any]],
    headers: Sequence[str] | Mapping[str, str] | None = None,
    *,
    float_format: str = ".4g",
) -> str:
    """A plain aligned text table: numbers right-aligned, text left-aligned, ``None`` as ``-``.

    ``headers`` is a list of keys (dict rows) / labels (list rows), or a mapping key -> label.
    """
    labels, cells, numeric = _prepare(rows, headers, float_format)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(labels)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(labels), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def render_markdown_table(
    rows: Sequence[Mapping[str, Any] | Sequence[Any]],
    headers: Sequence[str] | Mapping[str, str] | None = None,
    *,
    float_format: str = ".4g",
) -> str:
    """The same table as GitHub Markdown (numeric columns right-aligned, ``|`` escaped)."""
    labels, cells, numeric = _prepare(rows, headers, float_format)

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(esc(h) for h in labels) + " |"]
    out.append("|" + "|".join("---:" if num else "---" for num in numeric) + "|")
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in cells]
    return "\n".join(out)
