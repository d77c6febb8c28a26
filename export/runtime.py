"""ONNX Runtime sessions configured for measurement, latency statistics and batched inference.

No torch here: this runs on the target board. Sessions are configured explicitly (threads,
sequential execution, optimization level, providers) because ORT's defaults depend on the machine
and would make two measurements incomparable; idle threads do not spin, so one measurement does
not steal cores from the next one (or from another process on a shared machine).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort

from rcomp.errors import RcompError

GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass
class LatencyStats:
    """Per-inference wall time in milliseconds; p90 is MLPerf's single-stream figure."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    warmup: int

    @classmethod
    def from_seconds(cls, times: list[float], warmup: int) -> "LatencyStats":
        ms = np.asarray(times, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(ms.mean()), len(ms), warmup)

    def to_dict(self) -> dict:
        return asdict(self)


def make_session(
    path, *, threads: int, graph_optimization: str, provider: str = "CPUExecutionProvider"
) -> ort.InferenceSession:
    """A session with every setting that affects timing made explicit. ``path`` may be bytes."""
    if graph_optimization not in GRAPH_OPTIMIZATION:
        raise RcompError(f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATION)}, got {graph_optimization!r}")
    if provider not in ort.get_available_providers():
        raise RcompError(f"execution provider {provider!r} is not available here; available: {', '.join(ort.get_available_providers())}")
    if threads < 1:
        raise RcompError(f"threads must be at least 1, got {threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = GRAPH_OPTIMIZATION[graph_optimization]
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    source = path if isinstance(path, bytes) else os.fspath(path)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=[provider])
    except Exception as exc:  # ORT raises its own pybind types (InvalidProtobuf, Fail, NoSuchFile)
        name = "model" if isinstance(path, bytes) else os.path.basename(source)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RcompError(f"{name}: onnxruntime cannot load it: {first}") from None


def effective_threads(target) -> int:
    """The profile's thread count, capped at this machine's cores.

    Asking ORT for more intra-op threads than there are cores oversubscribes them: on 2 cores a
    4-thread ResNet20 measured a p90 ten times worse than 2 threads, which says nothing about a
    4-core board. The check report states when the cap applied.
    """
    return max(1, min(int(target.threads), os.cpu_count() or 1))


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info(target) -> dict:
    """What a latency figure depends on besides the model: the machine, the runtime, the session.

    Stored with every check report so a later ``--baseline`` comparison can tell whether two
    latencies are comparable (the hostname is kept for people, not compared).
    """
    return {"hostname": platform.node(), "machine": platform.machine(), "cpu_model": cpu_model(),
            "cpus": os.cpu_count(), "onnxruntime": ort.__version__, "provider": target.execution_provider,
            "threads": effective_threads(target), "graph_optimization": target.graph_optimization}


def session_for_target(path, target) -> ort.InferenceSession:
    """:func:`make_session` with a profile's :class:`rcomp.config.Target` settings."""
    return make_session(path, threads=effective_threads(target), graph_optimization=target.graph_optimization,
                        provider=target.execution_provider)


def _io(session: ort.InferenceSession) -> tuple[str, list, str]:
    inp = session.get_inputs()[0]
    return inp.name, list(inp.shape), session.get_outputs()[0].name


def _random_input(input_shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(tuple(input_shape), dtype=np.float32)


def measure_latency(session, input_shape, *, warmup: int = 10, runs: int = 100, seed: int = 0) -> LatencyStats:
    """Time ``runs`` single inferences (after ``warmup`` untimed ones) with ``time.perf_counter``."""
    if runs < 1:
        raise RcompError(f"latency runs must be at least 1, got {runs}")
    name, _, out = _io(session)
    feed = {name: _random_input(input_shape, seed)}
    for _ in range(warmup):
        session.run([out], feed)
    return LatencyStats.from_seconds(_timed(session, out, feed, runs), warmup)


def _timed(session, out: str, feed: dict, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run([out], feed)
        times.append(time.perf_counter() - t0)
    return times


def compare_latency(
    sessions: dict, input_shape, *, runs: int = 100, warmup: int = 10, rounds: int = 5, seed: int = 0
) -> dict[str, LatencyStats]:
    """Latency of several models measured round-robin in one process, so the ratio is fair.

    The ``runs`` timed inferences per model are split into ``rounds`` blocks; in each round every
    model runs one block, and the order rotates between rounds. Machine noise (other jobs, clock
    changes) then lands on all models alike instead of on whichever was measured second.
    """
    if runs < 1 or rounds < 1:
        raise RcompError(f"runs and rounds must be at least 1, got {runs} and {rounds}")
    names = list(sessions)
    feeds = {}
    for n in names:
        in_name, _, out = _io(sessions[n])
        feeds[n] = (out, {in_name: _random_input(input_shape, seed)})
        for _ in range(warmup):
            sessions[n].run([out], feeds[n][1])
    times: dict[str, list[float]] = {n: [] for n in names}
    blocks = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    for r, block in enumerate(blocks):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n] += _timed(sessions[n], *feeds[n], block)
    return {n: LatencyStats.from_seconds(times[n], warmup) for n in names}


def predict(session, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for ``x`` [N, C, H, W]. A static batch dim B is honoured by feeding chunks of B
    (the last chunk zero-padded); a symbolic one by chunks of ``batch_size``."""
    name, shape, out = _io(session)
    x = np.ascontiguousarray(x, dtype=np.float32)
    static = [d if isinstance(d, int) else None for d in shape]
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(static[1:], x.shape[1:])):
        raise RcompError(f"input of shape {tuple(x.shape)} does not fit the model input {tuple(shape)}")
    step = static[0] or batch_size
    chunks = []
    for i in range(0, len(x), step):
        chunk = x[i : i + step]
        n = len(chunk)
        if static[0] and n < step:
            chunk = np.concatenate([chunk, np.zeros((step - n,) + chunk.shape[1:], np.float32)])
        chunks.append(session.run([out], {name: chunk})[0][:n])
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def accuracy(session, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy (a fraction in [0, 1]); an empty set is an error, not 100 %."""
    if len(x) == 0:
        raise RcompError("accuracy of an empty set is undefined")
    return float(np.mean(predict(session, x, batch_size).argmax(1) == np.asarray(y)))
