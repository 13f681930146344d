"""Resolve ``FFENGINE_WEIGHTS`` into MobileNetV2 feature weights plus how to feed them.

Two kinds of source, one result:

* a torchvision weights name (``IMAGENET1K_V2``, ``IMAGENET1K_V1``, ``DEFAULT``),
  downloaded by torchvision when online;
* a local ``state_dict`` file (``.pth``) with a JSON sidecar beside it
  (``model.pth`` -> ``model.json``) giving ``input_size``, ``resize``, ``mean``, ``std``,
  as in ``../shared/models/mobilenet_v2_imagenet.json``. Fine-tuned models from
  ``train/`` are written the same way.

Only the ``features.*`` tensors are used (the classifier is dropped), so a
fine-tuned file with any head size loads. Files are read with
``torch.load(weights_only=True)``: no code from the file is ever executed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ffengine.errors import WeightsError

SETTING = "FFENGINE_WEIGHTS"


@dataclass(frozen=True)
class Preprocess:
    """How a picture becomes the network's input: resize shorter side, centre crop, normalise."""

    input_size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_json(self) -> dict[str, object]:
        return {"input_size": self.input_size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict[str, object], where: str) -> Preprocess:
        try:
            mean = tuple(float(v) for v in data["mean"])  # type: ignore[union-attr]
            std = tuple(float(v) for v in data["std"])  # type: ignore[union-attr]
            size = int(data.get("input_size", 224))  # type: ignore[arg-type]
            resize = int(data.get("resize", round(size * 256 / 224)))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{where}: sidecar needs numeric 'mean', 'std' (3 values each) and 'input_size' ({exc})") from None
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or not 32 <= size <= resize <= 2048:
            raise WeightsError(f"{where}: sidecar preprocessing is out of range: {data}")
        return cls(input_size=size, resize=resize, mean=mean, std=std)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ResolvedWeights:
    """Feature-extractor tensors, their preprocessing, and a fingerprint naming both."""

    source: str
    state_dict: dict[str, torch.Tensor]
    preprocess: Preprocess
    fingerprint: str


def sidecar_path(weights_file: Path) -> Path:
    """``model.pth`` -> ``model.json``."""
    return weights_file.with_suffix(".json")


def fingerprint(weights_digest: str, preprocess: Preprocess) -> str:
    """Model identity = weights hash + preprocessing; an index remembers it."""
    prep = hashlib.sha256(json.dumps(asdict(preprocess), sort_keys=True).encode()).hexdigest()[:8]
    return f"{weights_digest[:16]}-{prep}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def looks_like_path(spec: str) -> bool:
    return any(ch in spec for ch in "/\\") or spec.endswith((".pth", ".pt", ".bin")) or Path(spec).exists()


def feature_tensors(state_dict: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Keep ``features.*`` (the part we embed with); refuse anything else."""
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{where}: expected a state_dict (a dict of tensors), got {type(state_dict).__name__}")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]  # common checkpoint wrapper
    feats = {k: v for k, v in state_dict.items() if k.startswith("features.") and isinstance(v, torch.Tensor)}
    if not feats:
        raise WeightsError(f"{where}: no MobileNetV2 'features.*' tensors in this file; is it a torchvision mobilenet_v2 state_dict?")
    return feats


def load_file(path: Path) -> ResolvedWeights:
    where = f"{SETTING}={path}"
    if not path.is_file():
        raise WeightsError(f"{where}: no such file. Point {SETTING} at a MobileNetV2 .pth file or a torchvision weights name such as IMAGENET1K_V2.")
    side = sidecar_path(path)
    if not side.is_file():
        raise WeightsError(f"{where}: the sidecar {side.name} (preprocessing: input_size, resize, mean, std) is missing beside it.")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{where}: sidecar {side.name} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise WeightsError(f"{where}: sidecar {side.name} must hold a JSON object")
    arch = meta.get("arch", "mobilenet_v2")
    if arch != "mobilenet_v2":
        raise WeightsError(f"{where}: sidecar says arch={arch!r}; only mobilenet_v2 is supported")
    preprocess = Preprocess.from_json(meta, where)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for bad files
        raise WeightsError(f"{where}: cannot load weights ({type(exc).__name__}: {str(exc)[:200]})") from None
    return ResolvedWeights(str(path), feature_tensors(raw, where), preprocess, fingerprint(file_sha256(path), preprocess))


def load_torchvision(name: str) -> ResolvedWeights:
    from torchvision.models import MobileNet_V2_Weights

    key = name.removeprefix("MobileNet_V2_Weights.")
    try:
        weights = MobileNet_V2_Weights[key] if key != "DEFAULT" else MobileNet_V2_Weights.DEFAULT
    except KeyError:
        names = ", ".join(w.name for w in MobileNet_V2_Weights)
        raise WeightsError(f"{SETTING}={name!r} is neither a file nor a torchvision weights name ({names}, DEFAULT)") from None
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:
        raise WeightsError(
            f"{SETTING}={name}: torchvision could not download the weights ({type(exc).__name__}). "
            f"Offline? Set {SETTING} to a local .pth file with its JSON sidecar."
        ) from None
    tf = weights.transforms()
    preprocess = Preprocess(
        input_size=int(tf.crop_size[0]), resize=int(tf.resize_size[0]), mean=tuple(tf.mean), std=tuple(tf.std)  # type: ignore[arg-type]
    )
    digest = hashlib.sha256(weights.url.encode()).hexdigest()
    return ResolvedWeights(weights.url, feature_tensors(state, name), preprocess, fingerprint(digest, preprocess))


def resolve_weights(spec: str) -> ResolvedWeights:
    """Turn a ``FFENGINE_WEIGHTS`` value into tensors; raise :class:`WeightsError` with a fix otherwise."""
    spec = spec.strip()
    if not spec:
        raise WeightsError(f"{SETTING} is empty; use a torchvision weights name such as IMAGENET1K_V2 or a .pth file")
    if looks_like_path(spec):
        return load_file(Path(spec).expanduser())
    return load_torchvision(spec)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, preprocess: Preprocess, **meta: object) -> Path:
    """Write a weights file and its sidecar (the format :func:`load_file` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pth.tmp")
    torch.save(state_dict, tmp)
    tmp.replace(path)
    sidecar = {"arch": "mobilenet_v2", **preprocess.to_json(), **meta, "sha256": file_sha256(path)}
    side_tmp = sidecar_path(path).with_suffix(".json.tmp")
    side_tmp.write_text(json.dumps(sidecar, indent=2))
    side_tmp.replace(sidecar_path(path))
    return path
