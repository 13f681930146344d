"""OpenVINO on CPU: the exported ONNX graph (:mod:`ffengine.runtime_onnx`) compiled by OpenVINO.

On CPUs with bfloat16 units (Intel AMX / AVX512-BF16, e.g. Sapphire Rapids) OpenVINO computes
in bfloat16 by default, which on this project's 2-core machine embeds ~1.7x faster than ONNX
Runtime in float32; elsewhere it computes in float32. bfloat16 features agree with PyTorch fp32
to a mean cosine of 0.994 (lowest 0.955 over catalog-10k) and give the same category precision@5
on 3,781 consumer photos (bench/embed_speed.py, bench/quality.py), so an index built with one
runtime serves queries embedded by another.

Two compiled models share the weights: one tuned for latency (one picture split across all
cores) and one for throughput (one stream per core, several pictures in flight), the same split
as :class:`ffengine.runtime_onnx.OnnxRunner`. Inference releases the GIL.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

#: Lowest cosine to PyTorch fp32 accepted on the probe batch: bfloat16 keeps ~3 significant
#: digits per layer (real photos: mean 0.994); a broken compile scores far lower.
MIN_PROBE_COSINE = 0.9


class OpenVinoUnavailable(RuntimeError):
    """OpenVINO cannot be used here (not installed, or the model did not compile)."""


def available() -> bool:
    """True when ``openvino`` imports."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoRunner:
    """``runner(uint8 batch) -> (n, 1280) float32`` with OpenVINO's CPU plugin.

    ``runner.precision`` says what it computes in (``bf16`` or ``f32``).
    """

    name = "openvino"

    def __init__(self, model: bytes) -> None:
        import openvino as ov

        core = ov.Core()
        graph = core.read_model(model=model, weights=b"")
        self.single = core.compile_model(graph, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        self.parallel = core.compile_model(graph, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
        self.precision: str = self.parallel.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.dim = self.parallel.output(0).get_partial_shape()[1].get_length()
        self._single = self.single.create_infer_request()
        self._single_lock = threading.Lock()
        self._queue = ov.AsyncInferQueue(self.parallel, int(self.parallel.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._queue_lock = threading.Lock()
        self._local = threading.local()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 1:
            with self._single_lock:
                return _features(self._single.infer({0: batch}))
        out = np.empty((len(batch), self.dim), np.float32)

        def done(request: Any, row: int) -> None:
            out[row] = request.get_output_tensor(0).data[0]

        with self._queue_lock:  # one picture per job, as many in flight as there are streams
            self._queue.set_callback(done)
            for row in range(len(batch)):
                self._queue.start_async({0: batch[row : row + 1]}, row)
            self._queue.wait_all()
        return out

    def with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(n, 1280)`` features and ``(n, 1280, h, w)`` feature maps (the latency-tuned model)."""
        with self._single_lock:
            result = self._single.infer({0: batch})
            return _features(result), np.array(result[1], dtype=np.float32, copy=True)

    def run_here(self, batch: np.ndarray) -> np.ndarray:
        """Features for ``batch`` with this thread's own request: safe from many threads at once."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.parallel.create_infer_request()
        return _features(request.infer({0: batch}))


def _features(result: Any) -> np.ndarray:
    """The output as a float32 array of our own: OpenVINO reuses a request's output buffer."""
    return np.array(result[0], dtype=np.float32, copy=True)
