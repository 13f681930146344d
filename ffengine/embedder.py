"""MobileNetV2 as a feature extractor: picture -> 1280-d float32 vector.

``features`` -> global average pool, exactly the study's extractor. Batched,
under ``torch.inference_mode``; CUDA when available unless told otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.models import mobilenet_v2

from ffengine.config import DEFAULT_WEIGHTS, check_device
from ffengine.weights import Preprocess, ResolvedWeights, resolve_weights

FEATURE_DIM = 1280


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; anything else as given (validated)."""
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_input_array(img: Image.Image, prep: Preprocess) -> np.ndarray:
    """Resize the shorter side to ``prep.resize``, centre-crop ``input_size``; HWC uint8."""
    w, h = img.size
    scale = prep.resize / min(w, h)
    new = (max(prep.input_size, round(w * scale)), max(prep.input_size, round(h * scale)))
    img = img.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)
    left = (new[0] - prep.input_size) // 2
    top = (new[1] - prep.input_size) // 2
    img = img.crop((left, top, left + prep.input_size, top + prep.input_size))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def build_feature_model(state_dict: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """``mobilenet_v2().features`` with the given tensors (random init when ``None``)."""
    features = mobilenet_v2(weights=None).features
    if state_dict is not None:
        stripped = {k.removeprefix("features."): v for k, v in state_dict.items()}
        features.load_state_dict(stripped, strict=True)
    return features.eval()


class Embedder:
    """Turn RGB pictures into ``(n, 1280)`` C-contiguous float32 features.

    Thread-safe: one lock serialises forward passes so that a worker pool can share it.
    """

    dim = FEATURE_DIM

    def __init__(self, resolved: ResolvedWeights | None, device: str = "auto", *, preprocess: Preprocess | None = None) -> None:
        self.device = pick_device(device)
        self.preprocess = resolved.preprocess if resolved else (preprocess or Preprocess())
        self.fingerprint = resolved.fingerprint if resolved else "random-init"
        self.source = resolved.source if resolved else "random-init"
        self.model = build_feature_model(resolved.state_dict if resolved else None).to(self.device)
        if self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)
        self._mean = torch.tensor(self.preprocess.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.preprocess.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._lock = threading.Lock()

    @classmethod
    def load(cls, weights: str = DEFAULT_WEIGHTS, device: str = "auto") -> Embedder:
        """Resolve ``weights`` (torchvision name or file) and build the extractor."""
        return cls(resolve_weights(weights), device)

    def prepare(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Pictures -> ``(n, H, W, 3)`` uint8 network input (no model work; any thread)."""
        return np.stack([to_input_array(img, self.preprocess) for img in images])

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """``(n, H, W, 3)`` uint8 -> ``(n, 1280)`` float32 features."""
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected (n, H, W, 3) uint8, got shape {batch.shape}")
        with self._lock, torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
            x = ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
            feats = self.model(x).mean(dim=(2, 3))
            return np.ascontiguousarray(feats.float().cpu().numpy(), dtype=np.float32)

    def embed(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """RGB pictures -> ``(n, 1280)`` C-contiguous float32 features, in input order."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = [self.embed_arrays(self.prepare(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
