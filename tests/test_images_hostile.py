"""Inputs built to exhaust memory or hang: thin strips, devices, pipes, folders, growing files.

The probes of issue 11 (items 1 and 2), each refused cheaply or read within bounds. Peak memory
of decoding is measured in a fresh process from its resident-set high-water mark: Pillow
allocates pixels outside Python's allocator, where ``tracemalloc`` cannot see them.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffengine.errors import ImageRejected
from ffengine.images import load_image, read_image_bytes
from tests.test_images import encode, rejected

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def grey_png(width: int, height: int) -> bytes:
    """A complete, valid flat-grey PNG, compressed row by row so that it is never held decoded here."""
    row = b"\x00" + b"\x80" * width  # filter byte, then the pixels
    rows_per_step = max(1, MIB // len(row))
    squeeze = zlib.compressobj(9)
    parts = [squeeze.compress(row * min(rows_per_step, height - done)) for done in range(0, height, rows_per_step)]
    idat = b"".join([*parts, squeeze.flush()])
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def photo_like(width: int, height: int) -> Image.Image:
    """Smooth random colours, compressing like a photo rather than like a flat fill."""
    rng = np.random.default_rng(width + height)
    small = Image.fromarray(rng.integers(0, 256, (height // 40, width // 40, 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BILINEAR)


# ------------------------------------------------------------------ thin strips


def test_a_thin_strip_is_refused_from_its_header():
    # 1 x 40,000,000 is under the 50-megapixel limit, but Pillow spends ~20 bytes per row on it.
    tall = grey_png(1, 40_000_000)
    assert len(tall) < 100_000
    started = time.perf_counter()
    message = str(rejected(tall, "bad_shape"))
    assert time.perf_counter() - started < 1.0
    assert "1x40000000" in message
    assert "40000000x1" in str(rejected(grey_png(40_000_000, 1), "bad_shape"))


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        ((12_001, 1_000), "bad_shape"),  # a side too long, though only 12 megapixels
        ((1_000, 12_001), "bad_shape"),
        ((21, 1), "bad_shape"),  # thinner than 1:20
        ((1, 21), "bad_shape"),
        ((12_000, 5_000), "too_many_pixels"),  # 60 megapixels: the area limit still comes first
    ],
)
def test_side_and_aspect_limits(size, reason):
    rejected(grey_png(*size), reason)


@pytest.mark.parametrize("size", [(12_000, 600), (600, 12_000), (20, 1), (1, 20)])
def test_the_limits_themselves_are_accepted(size):
    img = load_image(grey_png(*size))
    assert img.mode == "RGB" and img.size == size


PEAK_SCRIPT = """
import json, sys
from ffengine.errors import ImageRejected
from ffengine.images import load_image

def high_water_kib():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])

try:  # restart the high-water mark at the current size, forgetting the imports' own peak
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
except OSError:
    pass
before = high_water_kib()
try:
    outcome = list(load_image(sys.argv[1]).size)
except ImageRejected as exc:
    outcome = exc.reason
print(json.dumps({"outcome": outcome, "peak_mib": (high_water_kib() - before) / 1024}))
"""


def peak_of_loading(path: Path) -> tuple[object, float]:
    """What ``load_image(path)`` returns (size or reason) and how far it raised the resident set (MiB), in a fresh process.

    The high-water mark is read from ``/proc`` (``VmHWM``), not ``ru_maxrss``: the latter starts a
    spawned process at its parent's size, which would hide everything below that.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout)
    return result["outcome"], result["peak_mib"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for the resident-set high-water mark")
@pytest.mark.timeout(300)
def test_peak_memory_of_extreme_shapes_is_that_of_a_photo(tmp_path):
    files = {
        "tall": grey_png(1, 40_000_000),  # 78 KB; decoded by the old code into ~0.8 GB
        "wide": encode(photo_like(12_000, 600), "PNG", compress_level=1),  # the most extreme shape accepted
        "jpeg": encode(photo_like(4_000, 3_000), "JPEG", quality=90),  # a 12-megapixel phone photo
        "png": encode(photo_like(4_000, 3_000), "PNG", compress_level=1),
    }
    outcomes, peaks = {}, {}
    for name, data in files.items():
        path = tmp_path / f"{name}.{'jpg' if name == 'jpeg' else 'png'}"
        path.write_bytes(data)
        outcomes[name], peaks[name] = peak_of_loading(path)
    print("peak resident-set growth, MiB:", {name: round(peak, 1) for name, peak in peaks.items()})
    assert outcomes == {"tall": "bad_shape", "wide": [12_000, 600], "jpeg": [1_000, 750], "png": [4_000, 3_000]}
    assert peaks["tall"] < 32, peaks
    assert peaks["wide"] <= 3 * peaks["png"], peaks
    assert max(peaks.values()) < 200, peaks


# ------------------------------------------------------------------ huge pictures of other formats


def huge_picture(fmt: str) -> tuple[bytes, tuple[int, int]]:
    """A 17-megapixel picture (above the size reduced after decoding) and the size it shows."""
    size = (4_300, 4_000)
    if fmt == "TIFF":  # orientation 6 (rotate to view) lives in TIFF tags, not in an EXIF block
        img = Image.new("L", size, 30)
        img.paste(220, (size[0] // 2, 0, *size))  # right half light
        return encode(img, "TIFF", tiffinfo={0x0112: 6}), (size[1], size[0])
    palette = Image.new("P", size, 1)
    palette.putpalette([255, 0, 0, 0, 0, 200] + [0, 0, 0] * 254)
    palette.paste(0, (0, 0, size[0] // 2, size[1]))  # left half transparent (index 0)
    return encode(palette, "PNG", transparency=0, compress_level=1), size


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_huge_pictures_are_shrunk_after_decoding_keeping_orientation_and_transparency(fmt):
    data, shown = huge_picture(fmt)
    full = load_image(data, draft_side=None)
    assert full.size == shown
    small = load_image(data)
    assert min(small.size) >= 512 and small.size[0] < shown[0]
    assert abs(small.size[0] / small.size[1] - shown[0] / shown[1]) < 0.01
    if fmt == "TIFF":  # rotated: the light half is now at the bottom, as in the full-size decode
        assert small.getpixel((50, 10)) == full.getpixel((50, 10)) == (30, 30, 30)
        assert small.getpixel((50, small.size[1] - 10)) == full.getpixel((50, shown[1] - 10)) == (220, 220, 220)
    else:  # the transparent half is white, the opaque half keeps its palette colour
        assert small.getpixel((10, 10)) == full.getpixel((10, 10)) == (255, 255, 255)
        assert small.getpixel((small.size[0] - 10, 10)) == full.getpixel((shown[0] - 10, 10)) == (0, 0, 200)


# ------------------------------------------------------------------ paths that are not image files


@pytest.mark.timeout(20)
@pytest.mark.parametrize("read", [read_image_bytes, load_image], ids=["read_image_bytes", "load_image"])
def test_dev_zero_is_refused_without_reading_it(read):
    # It reports size 0 and never ends: the old code read it until the process was killed.
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with pytest.raises(ImageRejected) as info:
            read("/dev/zero")
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == "not_a_file", str(info.value)
    assert "device" in str(info.value)
    assert elapsed < 1.0 and peak < MIB


@pytest.mark.timeout(20)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageRejected) as info:
        read_image_bytes(fifo)
    assert info.value.reason == "not_a_file" and "pipe" in str(info.value)


def test_a_folder_is_refused(tmp_path):
    assert "folder" in str(rejected(tmp_path, "not_a_file"))


def test_a_symlink_to_an_image_is_read(tmp_path):
    data = encode(Image.new("RGB", (8, 6), (1, 2, 3)), "PNG")
    (tmp_path / "real.png").write_bytes(data)
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    assert read_image_bytes(tmp_path / "link.png") == data


def test_a_file_that_grows_after_reporting_its_size_is_read_only_to_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "growing.jpg"
    path.write_bytes(b"\xff\xd8" + b"x" * 1_000)
    limit, grown_to = MIB, 64 * MIB
    real_stat = os.stat

    def grows_after(real):
        def stat(target, *args, **kwargs):
            result = real(target, *args, **kwargs)
            if real_stat(path).st_size < grown_to:
                os.truncate(path, grown_to)  # sparse: no disk used; reads as zeros
            return result

        return stat

    monkeypatch.setattr(os, "stat", grows_after(os.stat))
    monkeypatch.setattr(os, "fstat", grows_after(os.fstat))
    tracemalloc.start()
    try:
        with pytest.raises(ImageRejected) as info:
            read_image_bytes(path, limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too_large"
    assert real_stat(path).st_size == grown_to  # it did grow after its size was taken
    assert peak < 3 * limit, peak  # read one byte past the limit, not the 64 MiB there
