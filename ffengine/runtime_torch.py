"""The network itself, in PyTorch: uint8 pixels in, pooled MobileNetV2 features (and the last feature map) out.

:class:`FeatureNet` puts the input normalisation inside the model, so the caller hands
over the ``prepare`` batch untouched and every runtime (eager PyTorch here, ONNX Runtime
in :mod:`ffengine.runtime_onnx`, which exports this very module) computes the same thing.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models import mobilenet_v2

from ffengine.errors import WeightsError
from ffengine.weights import SETTING, Preprocess


def build_features(state_dict: dict[str, torch.Tensor] | None) -> torch.nn.Sequential:
    """``mobilenet_v2().features`` with the given ``features.*`` tensors (random init when ``None``)."""
    features = mobilenet_v2(weights=None).features
    if state_dict is not None:
        stripped = {k.removeprefix("features."): v for k, v in state_dict.items()}
        try:
            features.load_state_dict(stripped, strict=True)
        except RuntimeError as exc:  # shapes or names do not fit (normally caught by resolve_weights)
            raise WeightsError(f"{SETTING}: the tensors do not fit MobileNetV2 features ({str(exc)[:300]})") from None
    return features.eval()


class Normalise(torch.nn.Module):
    """``(n, S, S, 3)`` uint8 RGB -> ``(n, 3, S, S)`` float32 scaled by the model's mean and std: the one place
    pixels become network input (the engine, its exported graph and fine-tuning all use it)."""

    def __init__(self, preprocess: Preprocess) -> None:
        super().__init__()
        mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", inv_std, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # NHWC uint8 viewed as NCHW is already channels_last in memory: no copy, and the
        # channels_last kernels of oneDNN / cuDNN take it as is.
        return (pixels.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std


class FeatureNet(torch.nn.Module):
    """``(n, S, S, 3)`` uint8 RGB -> ``(n, 1280)`` float32 pooled features and the ``(n, 1280, h, w)`` map
    they pool (what :mod:`ffengine.items` reads where a garment is): normalise, ``features``, global average pool."""

    def __init__(self, features: torch.nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.features = features
        self.normalise = Normalise(preprocess)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalise(pixels)
        # Global average pool as a pooling op (not ``mean``): ONNX Runtime then pools in its
        # blocked layout instead of converting the 1280 x 7 x 7 map back first.
        fmap = self.features(x)
        return torch.nn.functional.adaptive_avg_pool2d(fmap, 1).flatten(1), fmap


class TorchRunner:
    """Eager PyTorch on any device (CPU, CUDA, MPS); batches go through as they come.

    Always computes in eval mode: if training left the model in train mode, it is switched
    to eval for the forward pass and switched back after.
    """

    name = "torch"

    def __init__(self, net: FeatureNet, device: torch.device) -> None:
        self.net = net
        self.device = device

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.with_maps(batch)[0]

    def with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(n, 1280)`` features and ``(n, 1280, h, w)`` feature maps, float32."""
        training = self.net.training
        if training:
            self.net.eval()
        try:
            with torch.inference_mode():
                pixels = torch.from_numpy(batch).to(self.device, non_blocking=True)
                feats, fmap = self.net(pixels)
                return feats.float().cpu().numpy(), fmap.float().cpu().numpy()
        finally:
            if training:
                self.net.train()
