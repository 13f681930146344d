"""Weights resolution: every way FFENGINE_WEIGHTS can be wrong gives a WeightsError naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.models import mobilenet_v2

from ffengine.errors import WeightsError
from ffengine.weights import Preprocess, features_digest, resolve_weights, save_weights, sidecar_path

PREP = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def full_state() -> dict[str, torch.Tensor]:
    """A whole torchvision MobileNetV2 state_dict (features + 1000-class head), random init."""
    torch.manual_seed(0)
    return mobilenet_v2(weights=None).state_dict()


def refused(spec: object, *fragments: str) -> str:
    with pytest.raises(WeightsError) as info:
        resolve_weights(str(spec))
    message = str(info.value)
    assert "FFENGINE_WEIGHTS" in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def write_sidecar(pth: Path, **fields: object) -> None:
    sidecar_path(pth).write_text(json.dumps({"arch": "mobilenet_v2", **PREP.to_json(), **fields}))


def test_real_weights_file_and_sidecar(real_weights):
    resolved = resolve_weights(str(real_weights))
    assert resolved.preprocess == PREP
    assert len(resolved.state_dict) == 312 and all(k.startswith("features.") for k in resolved.state_dict)
    sidecar = json.loads(sidecar_path(real_weights).read_text())
    assert resolved.fingerprint.startswith(features_digest(resolved.state_dict)[:16])  # what the features depend on
    assert resolve_weights(str(real_weights)).fingerprint == resolved.fingerprint


def test_saved_weights_round_trip(full_state, tmp_path):
    path = save_weights(full_state, tmp_path / "m" / "weights.pth", PREP, base="test", epochs=2)
    side = json.loads(sidecar_path(path).read_text())
    assert side["base"] == "test" and side["mean"] == [0.5, 0.5, 0.5] and len(side["sha256"]) == 64
    resolved = resolve_weights(str(path))
    assert resolved.preprocess == PREP
    assert set(resolved.state_dict) == {k for k in full_state if k.startswith("features.")}
    key = "features.18.0.weight"
    assert torch.equal(resolved.state_dict[key], full_state[key])
    assert not list(path.parent.glob("*.tmp"))


def test_meta_cannot_override_preprocessing(full_state, tmp_path):
    path = save_weights(full_state, tmp_path / "w.pth", PREP, mean=[0.1, 0.1, 0.1], note="x")
    assert resolve_weights(str(path)).preprocess == PREP


def test_fine_tuned_file_with_another_head_loads(full_state, tmp_path):
    state = {k: v for k, v in full_state.items() if k.startswith("features.")}
    state["classifier.1.weight"] = torch.zeros(10, 1280)  # a 10-class fashion head
    state["classifier.1.bias"] = torch.zeros(10)
    path = tmp_path / "tuned.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)  # wrapped, as training scripts often save
    write_sidecar(path)
    resolved = resolve_weights(str(path))
    assert not any(k.startswith("classifier") for k in resolved.state_dict)


def test_checkpoint_without_num_batches_tracked_loads(full_state, tmp_path):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in full_state.items() if not k.endswith("num_batches_tracked")}, path)
    write_sidecar(path)
    assert len(resolve_weights(str(path)).state_dict) == 260


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.pth", "no such file", "IMAGENET1K_V2")


def test_missing_sidecar(full_state, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(full_state, path)
    refused(path, "w.json", "missing")


@pytest.mark.parametrize(
    ("sidecar", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2, 3]", "JSON object"),
        (json.dumps({"arch": "resnet50", "mean": [0.5] * 3, "std": [0.5] * 3}), "resnet50"),
        (json.dumps({"std": [0.5] * 3}), "mean"),
        (json.dumps({"mean": [0.5] * 3, "std": [0.5, 0.5, 0]}), "out of range"),
        (json.dumps({"mean": [0.5] * 2, "std": [0.5] * 3}), "out of range"),
        ('{"mean": [NaN, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}', "out of range"),
        (json.dumps({"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": 300, "resize": 256}), "out of range"),
    ],
)
def test_bad_sidecar(full_state, tmp_path, sidecar, fragment):
    path = tmp_path / "w.pth"
    torch.save(full_state, path)
    sidecar_path(path).write_text(sidecar)
    refused(path, fragment)


def test_garbage_pth(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"this is not a torch file at all" * 100)
    write_sidecar(path)
    refused(path, "cannot load weights")


class Payload:
    """Pickles as a call that creates a file: what a booby-trapped .pth would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": Payload(marker)}, path)
    write_sidecar(path)
    refused(path, "cannot load weights")
    assert not marker.exists()


def test_file_that_does_not_match_its_sidecar_hash(full_state, tmp_path):
    path = save_weights(full_state, tmp_path / "w.pth", PREP)
    other = dict(full_state)
    other["features.0.0.weight"] = other["features.0.0.weight"] + 1
    torch.save(other, path)  # replaced behind the sidecar's back
    refused(path, "sha256")


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "w.pth"
    torch.save([torch.zeros(3)], path)
    write_sidecar(path)
    refused(path, "state_dict")


def test_no_features_tensors(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, path)
    write_sidecar(path)
    refused(path, "features.*")


def test_features_of_another_width(tmp_path):
    path = tmp_path / "half.pth"
    torch.save(mobilenet_v2(weights=None, width_mult=0.5).state_dict(), path)
    write_sidecar(path)
    refused(path, "wrong shape", "features.0.0.weight")


def test_missing_and_unexpected_tensors(full_state, tmp_path):
    state = {k: v for k, v in full_state.items() if not k.startswith("features.18.")}
    state["features.19.0.weight"] = torch.zeros(1)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    write_sidecar(path)
    refused(path, "missing: features.18.0.weight", "unexpected: features.19.0.weight")


def test_non_finite_tensors(full_state, tmp_path):
    state = dict(full_state)
    state["features.5.conv.1.0.weight"] = torch.full_like(state["features.5.conv.1.0.weight"], float("nan"))
    path = tmp_path / "w.pth"
    torch.save(state, path)
    write_sidecar(path)
    refused(path, "NaN", "features.5.conv.1.0.weight")


def test_unknown_torchvision_name():
    refused("IMAGENET_V9", "IMAGENET1K_V1", "IMAGENET1K_V2")


def test_empty_setting():
    refused("   ", "empty")


def test_fingerprint_follows_weights_and_preprocessing(full_state, tmp_path):
    base = resolve_weights(str(save_weights(full_state, tmp_path / "a.pth", PREP))).fingerprint
    same = resolve_weights(str(save_weights(full_state, tmp_path / "b.pth", PREP))).fingerprint
    other_prep = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    prep_changed = resolve_weights(str(save_weights(full_state, tmp_path / "c.pth", other_prep))).fingerprint
    tweaked = dict(full_state)
    tweaked["features.18.1.bias"] = tweaked["features.18.1.bias"] + 0.01
    weights_changed = resolve_weights(str(save_weights(tweaked, tmp_path / "d.pth", PREP))).fingerprint
    assert base == same
    assert len({base, prep_changed, weights_changed}) == 3
