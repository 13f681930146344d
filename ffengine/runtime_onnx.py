"""ONNX Runtime on CPU: the same :class:`~ffengine.runtime_torch.FeatureNet`, exported once.

On CPU, ONNX Runtime runs MobileNetV2 about 3x faster than eager PyTorch at batch 1 (see
``bench/embed_speed.py``). The export (legacy TorchScript exporter: offline, no ``onnxscript``)
takes a second or two, so the ``.onnx`` file is cached on disk under a key made of the
actual tensor values, the preprocessing and the software versions, and written atomically
(temp file + rename) so that concurrent processes never read half a file. Every session is
checked against PyTorch on a probe batch before use: a bad cached file is deleted and
exported again; if a fresh export fails too, the caller falls back to PyTorch.

Batches are not run whole: on CPU, a big batch's activations no longer fit in cache, and
MobileNetV2's layers are too small to split well across cores. A batch is cut into single
pictures that run side by side, one per core; see :class:`OnnxRunner`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffengine.files import write_atomic
from ffengine.runtime_torch import FeatureNet, TorchRunner

log = logging.getLogger(__name__)

#: Bump when the exported graph changes, so old cache files are not reused.
EXPORT_VERSION = 3
OPSET = 17
INPUT_NAME = "pixels"
OUTPUT_NAME = "features"
MAP_NAME = "map"  # the last feature map, which the features pool
#: Minimum cosine similarity between ONNX Runtime and PyTorch on the probe batch.
MIN_PROBE_COSINE = 0.9999

_memo: OrderedDict[str, bytes] = OrderedDict()  # exported models of this process, by key
_MEMO_SIZE = 4
_memo_lock = threading.Lock()  # also makes two threads wanting the same model export it once


class OnnxUnavailable(RuntimeError):
    """ONNX Runtime cannot be used here (not installed, export failed, probe mismatch)."""


def available() -> bool:
    """True when ``onnxruntime`` imports."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/focusedfashion/onnx`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "focusedfashion" / "onnx"


def cpu_count() -> int:
    """Cores this process may run on (respects ``taskset`` / cgroup CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def model_key(net: FeatureNet, input_size: int) -> str:
    """Hash of what the exported graph depends on: tensors, normalisation, size, versions."""
    digest = hashlib.sha256()
    digest.update(f"v{EXPORT_VERSION}|opset{OPSET}|{input_size}|torch{torch.__version__}".encode())
    for name, tensor in list(net.state_dict().items()) + [("mean", net.normalise.mean), ("inv_std", net.normalise.inv_std)]:
        array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        digest.update(f"{name}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:24]


def export(net: torch.nn.Module, input_size: int, outputs: tuple[str, ...] = (OUTPUT_NAME, MAP_NAME)) -> bytes:
    """Export ``net`` (a CPU module; traced in eval mode) to ONNX bytes with a dynamic batch axis;
    ``outputs`` names what its ``forward`` returns, in order."""
    training = net.training
    net.eval()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(
                net,
                (torch.zeros(1, input_size, input_size, 3, dtype=torch.uint8),),
                buf,
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=list(outputs),
                dynamic_axes={INPUT_NAME: {0: "n"}} | {name: {0: "n"} for name in outputs},
            )
    finally:
        net.train(training)
    return buf.getvalue()


def cached_export(net: FeatureNet, input_size: int, cache_dir: Path | None, label: str) -> tuple[bytes, Path | None, bool]:
    """Exported model bytes, from this process's memo, the disk cache, or a fresh export.

    ``cache_dir=None`` keeps it in memory only. Returns the bytes, the cache file (if any)
    and whether the bytes were exported just now.
    """
    key = model_key(net, input_size)
    path = cache_dir / f"{_safe(label)}-{key}.onnx" if cache_dir is not None else None
    with _memo_lock:
        return _cached_export(net, input_size, key, path)


def _cached_export(net: FeatureNet, input_size: int, key: str, path: Path | None) -> tuple[bytes, Path | None, bool]:
    data = _memo.get(key)
    if data is not None:
        _memo.move_to_end(key)
        if path is not None and not path.is_file():
            _cache_on_disk(path, data)
        return data, path, False
    if path is not None and path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("cannot read cached ONNX model %s (%s); exporting again", path, exc)
    fresh = data is None
    if data is None:
        data = export(net, input_size)
        if path is not None:
            _cache_on_disk(path, data)
    _memo[key] = data
    while len(_memo) > _MEMO_SIZE:
        _memo.popitem(last=False)
    return data, path, fresh


def forget(data: bytes, path: Path | None) -> None:
    """Drop a model that failed its probe from the memo and the disk cache."""
    with _memo_lock:
        for key in [k for k, v in _memo.items() if v is data]:
            del _memo[key]
    if path is not None:
        path.unlink(missing_ok=True)


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)[:64] or "model"


def _cache_on_disk(path: Path, data: bytes) -> None:
    """Cache the exported model; a read-only home or a full disk only means exporting again next start."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        log.warning("cannot cache the ONNX model in %s (%s); it will be exported again next start", path.parent, exc)


class OnnxRunner:
    """ONNX Runtime on CPU; ``runner(uint8 batch) -> (n, 1280) float32``.

    Two sessions on the same model, because one picture and many pictures are best served
    differently (measured in ``bench/embed_speed.py``):

    * one picture: a session whose intra-op threads split every layer across all cores, and
      spin only while a call runs (``force_spinning_stop``), so nothing burns CPU between photos;
    * a batch: single pictures run side by side on a one-thread session, one per core.
      MobileNetV2's layers are too small to split well, so running pictures in parallel is
      faster than splitting each one (and than larger micro-batches), and it has no thread
      barriers, so it degrades gracefully when decode threads or other processes share the
      cores, where spinning intra-op pools lose 2-3x.

    ``session.run`` releases the GIL, so decode threads keep working while it computes.
    :meth:`run_here` serves callers that already keep one worker thread per core (the index
    build decodes and embeds each picture on the same thread: no hand-offs, no batching).
    """

    name = "onnx"

    def __init__(self, model: bytes, *, threads: int | None = None) -> None:
        cores = threads or cpu_count()
        self.single = _session(model, cores)
        self._batched = _session(model, 1) if cores > 1 else self.single
        self._pool = ThreadPoolExecutor(cores, thread_name_prefix="ffengine-onnx") if cores > 1 else None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 1:
            return self.single.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        chunks = [batch[row : row + 1] for row in range(len(batch))]
        run = self.run_here
        parts = list(self._pool.map(run, chunks)) if self._pool is not None else [run(c) for c in chunks]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def run_here(self, batch: np.ndarray) -> np.ndarray:
        """Features computed on the calling thread only (one core); safe from many threads at once."""
        return self._batched.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    def with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(n, 1280)`` features and ``(n, 1280, h, w)`` feature maps, with all cores."""
        feats, fmap = self.single.run([OUTPUT_NAME, MAP_NAME], {INPUT_NAME: batch})
        return feats, fmap


def _session(model: bytes, threads: int):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 1:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def probe(runner: Any, net: FeatureNet, input_size: int) -> float:
    """Smallest cosine between ``runner``'s and PyTorch's features on a fixed random batch."""
    rng = np.random.default_rng(1234)
    batch = rng.integers(0, 256, size=(3, input_size, input_size, 3), dtype=np.uint8)
    got = np.concatenate([runner(batch[:1]), runner(batch[1:])])  # the one-picture and the batch paths
    want = TorchRunner(net, torch.device("cpu"))(batch)
    return float(cosine_rows(got, want).min())


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64 (random-init features are ~1e-8 in size)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return (a64 * b64).sum(axis=1) / np.where(den > 0, den, 1.0)


def build_runner(
    net: FeatureNet,
    input_size: int,
    cache_dir: Path | None,
    label: str,
    make: Callable[[bytes], Any] = OnnxRunner,
    min_cosine: float = MIN_PROBE_COSINE,
) -> Any:
    """Export (or reuse) ``net``, load it with ``make`` (:class:`OnnxRunner`, or another runtime
    that reads ONNX) and probe it against PyTorch; raise :class:`OnnxUnavailable` if that fails.

    A reused model (memo or disk) that fails to load or to match PyTorch is deleted and
    exported afresh once; only a fresh export that fails means the runtime is not usable.
    """
    for attempt in (1, 2):
        try:
            data, path, fresh = cached_export(net, input_size, cache_dir, label)
        except Exception as exc:  # noqa: BLE001 - any exporter failure means: use PyTorch
            raise OnnxUnavailable(f"ONNX export failed ({type(exc).__name__}: {str(exc)[:200]})") from exc
        try:
            runner = make(data)
            cosine = probe(runner, net, input_size)
            problem = None if cosine >= min_cosine else f"output disagrees with PyTorch (cosine {cosine:.6f} < {min_cosine})"
        except Exception as exc:  # noqa: BLE001 - a corrupt cache file fails here
            problem = f"did not load ({type(exc).__name__}: {str(exc)[:200]})"
        if problem is None:
            return runner
        forget(data, path)
        if fresh or attempt == 2:
            raise OnnxUnavailable(f"the exported ONNX model {problem}")
        log.warning("cached ONNX model %s %s; exporting it again", path or "(in memory)", problem)
    raise AssertionError("unreachable")
