"""MobileNetV2 as a feature extractor: picture -> 1280-d float32 vector.

``features`` -> global average pool, exactly the study's extractor. The device is CUDA
when available (eager PyTorch, batched), CPU otherwise, or what ``FFENGINE_DEVICE`` says.
On CPU the network is exported to ONNX once and compiled by OpenVINO (bfloat16 where the
CPU has it), else run by ONNX Runtime (float32): 3-7x faster than eager PyTorch, which
remains the fallback and the reference. All of them give the same features up to rounding
(cosine >= 0.9999 for ONNX Runtime, mean 0.994 for bfloat16) and the same precision@5, so
one index serves any of them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ffengine import runtime_onnx, runtime_openvino
from ffengine.config import DEFAULT_WEIGHTS, check_device, check_runtime
from ffengine.errors import ConfigError
from ffengine.images import network_input
from ffengine.runtime_torch import FeatureNet, TorchRunner, build_features
from ffengine.weights import Preprocess, ResolvedWeights, resolve_weights

log = logging.getLogger(__name__)

FEATURE_DIM = 1280
#: Compiled CPU runtimes, in the order ``auto`` tries them: (installed?, runner class, lowest probe cosine).
CPU_RUNTIMES = {
    "openvino": (runtime_openvino.available, runtime_openvino.OpenVinoRunner, runtime_openvino.MIN_PROBE_COSINE),
    "onnx": (runtime_onnx.available, runtime_onnx.OnnxRunner, runtime_onnx.MIN_PROBE_COSINE),
}


class CompiledRunner(Protocol):
    """What :mod:`ffengine.runtime_openvino` and :mod:`ffengine.runtime_onnx` runners offer."""

    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...

    def run_here(self, batch: np.ndarray) -> np.ndarray: ...

    def with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; anything else as given, if this machine has it."""
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"FFENGINE_DEVICE={device} but no CUDA GPU is usable here (torch.cuda.is_available() is False); use auto or cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ConfigError(f"FFENGINE_DEVICE={device} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"FFENGINE_DEVICE={device} but Apple MPS is not available here; use auto or cpu")
    return chosen


class Embedder:
    """Turn RGB pictures into ``(n, 1280)`` C-contiguous float32 features.

    ``runtime``: ``auto`` (on CPU the first of OpenVINO and ONNX Runtime that is installed
    and agrees with PyTorch; PyTorch on GPUs), ``openvino`` or ``onnx`` (CPU only), or
    ``torch``. If no compiled runtime can be used, PyTorch takes over with a logged warning;
    ``.runtime`` says which one runs. ``cache_dir`` holds the exported ONNX file (default
    ``~/.cache/focusedfashion/onnx``; random-init models are never written to disk).

    Thread-safe: ``prepare`` runs in the caller's thread; one lock serialises batched forward
    passes (each spreads over all cores), ``on_caller_thread`` calls run side by side; all run
    in native code with the GIL released.
    """

    dim = FEATURE_DIM

    def __init__(
        self,
        resolved: ResolvedWeights | None,
        device: str = "auto",
        *,
        preprocess: Preprocess | None = None,
        runtime: str = "auto",
        cache_dir: Path | None = None,
    ) -> None:
        check_runtime(runtime, "runtime")
        self.device = pick_device(device)
        if runtime in CPU_RUNTIMES and self.device.type != "cpu":
            raise ConfigError(f"runtime {runtime!r} runs on CPU only; device is {self.device}")
        self.preprocess = resolved.preprocess if resolved else (preprocess or Preprocess())
        self.fingerprint = resolved.fingerprint if resolved else "random-init"
        self.source = resolved.source if resolved else "random-init"
        self.kind_head = resolved.kind_head if resolved else None
        features = build_features(resolved.state_dict if resolved else None)
        self._net = FeatureNet(features, self.preprocess).to(self.device)
        self._lock = threading.Lock()
        self._cache_dir = (cache_dir or runtime_onnx.default_cache_dir()) if resolved else None
        self._torch = TorchRunner(self._net, self.device)
        self._runner: TorchRunner | CompiledRunner = self._torch
        cpu = self.device.type == "cpu"
        self._choices = (runtime,) if runtime in CPU_RUNTIMES else tuple(CPU_RUNTIMES) if runtime == "auto" and cpu else ()
        if self._choices:
            self._compile()

    @classmethod
    def load(cls, weights: str = DEFAULT_WEIGHTS, device: str = "auto", *, runtime: str = "auto", cache_dir: Path | None = None) -> Embedder:
        """Resolve ``weights`` (torchvision name or file) and build the extractor."""
        return cls(resolve_weights(weights), device, runtime=runtime, cache_dir=cache_dir)

    @property
    def model(self) -> torch.nn.Module:
        """The torch ``features`` module, read-only: a trainer fine-tunes a copy (``train/finetune.py``), because
        the compiled runtimes were exported from these tensors and would not see them change."""
        return self._net.features

    @property
    def runtime(self) -> str:
        """``openvino``, ``onnx`` or ``torch``: what actually computes the features."""
        return self._runner.name

    def prepare(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Pictures -> ``(n, S, S, 3)`` uint8 network input (no model work; any thread)."""
        prep = self.preprocess
        out = np.empty((len(images), prep.input_size, prep.input_size, 3), dtype=np.uint8)
        for i, img in enumerate(images):
            out[i] = network_input(img, prep.fit, prep.resize, prep.input_size)
        return out

    @property
    def wants_one_picture_per_thread(self) -> bool:
        """True when throughput is best with one picture per call from one worker thread per core
        (a compiled CPU runtime, ``embed_arrays(..., on_caller_thread=True)``) rather than batches."""
        return self._runner is not self._torch

    def embed_arrays(self, batch: np.ndarray, *, on_caller_thread: bool = False) -> np.ndarray:
        """``(n, S, S, 3)`` uint8 (from :meth:`prepare`) -> ``(n, 1280)`` C-contiguous float32.

        ``on_caller_thread``: compute on the calling thread only, concurrently with other such
        calls (see :attr:`wants_one_picture_per_thread`); other runtimes ignore it.
        """
        size = self.preprocess.input_size
        if batch.ndim != 4 or batch.shape[1:] != (size, size, 3) or batch.dtype != np.uint8:
            raise ValueError(f"expected an (n, {size}, {size}, 3) uint8 batch from prepare(), got {batch.dtype} {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = np.ascontiguousarray(batch)
        with self._lock:
            runner = self._runner
            if not on_caller_thread or isinstance(runner, TorchRunner):
                return np.ascontiguousarray(runner(batch), dtype=np.float32)
        return np.ascontiguousarray(runner.run_here(batch), dtype=np.float32)

    def embed_with_maps(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """RGB pictures -> ``(n, 1280)`` features and the ``(n, 1280, h, w)`` float32 feature maps they pool
        (where :mod:`ffengine.items` looks for garments). For a shopper's photo or two: a map is large."""
        batch = self.prepare(images)
        with self._lock:
            feats, fmap = self._runner.with_maps(batch)
        return np.ascontiguousarray(feats, dtype=np.float32), np.ascontiguousarray(fmap, dtype=np.float32)

    def embed(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """RGB pictures -> ``(n, 1280)`` C-contiguous float32 features, in input order."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [self.embed_arrays(self.prepare(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return parts[0] if len(parts) == 1 else np.ascontiguousarray(np.concatenate(parts))

    def _compile(self) -> None:
        """Build the compiled CPU runtime from the weights: the first of ``self._choices``
        that is installed, loads and agrees with PyTorch; PyTorch itself (with a warning) if none does."""
        problems = []
        for name in self._choices:
            installed, make, min_cosine = CPU_RUNTIMES[name]
            if not installed():
                problems.append(f"{name} is not installed")
                continue
            try:
                self._runner = runtime_onnx.build_runner(self._net, self.preprocess.input_size, self._cache_dir, self.fingerprint, make, min_cosine)
                break
            except runtime_onnx.OnnxUnavailable as exc:
                problems.append(f"{name}: {exc}")
        else:
            log.warning("computing features with PyTorch on CPU (slower): %s", "; ".join(problems))
            self._runner = self._torch
        if problems and self._runner is not self._torch:
            log.info("features computed with %s (%s)", self._runner.name, "; ".join(problems))
