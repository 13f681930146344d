"""Inputs built to exhaust memory or hang: thin strips, devices, pipes, folders, growing files, and
files whose decoding costs far more than their picture size says (``tests/hostile_images.py``).

The probes of issues 11 (items 1 and 2) and 20 (items 1 to 4), each refused cheaply or read
within bounds. What each costs in CPU and memory is measured by ``bench/hostile.py``. Peak memory
of decoding is measured in a fresh process from its resident-set high-water mark: Pillow
allocates pixels outside Python's allocator, where ``tracemalloc`` cannot see them.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffengine.errors import ImageRejected
from ffengine.images import JPEG_SCAN_PIXELS, jpeg_scans, load_image, read_image_bytes
from tests import hostile_images
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
    message = str(rejected(tall, "bad_shape"))
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
        with pytest.raises(ImageRejected) as info:
            read("/dev/zero")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == "not_a_file", str(info.value)
    assert "device" in str(info.value)
    assert peak < MIB


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


# ------------------------------------------------------------------ costs the picture size does not show (issue 20)


def test_a_progressive_jpeg_of_thousands_of_scans_is_refused_unopened():
    bomb = hostile_images.progressive_scan_bomb(8_000, 6_000, scans=3_000)
    assert len(bomb) < 2 * MIB and jpeg_scans(bomb) > 3_000
    assert "scans" in str(rejected(bomb, "too_costly"))


def test_the_scan_limit_follows_the_picture_size():
    # the same count of repeated scans is cheap on a small picture and refused on a 48 MP one
    allowed_at_48mp = JPEG_SCAN_PIXELS // (8_000 * 6_000)
    small = hostile_images.progressive_scan_bomb(800, 600, scans=2 * allowed_at_48mp)
    assert load_image(small).size == (800, 600)
    rejected(hostile_images.progressive_scan_bomb(8_000, 6_000, scans=2 * allowed_at_48mp), "too_costly")


def test_ordinary_progressive_jpegs_are_decoded():
    for mode, scans in (("RGB", 10), ("L", 6)):  # libjpeg's own progressive scripts
        data = encode(photo_like(4_000, 3_000).convert(mode), "JPEG", progressive=True, quality=90)
        assert jpeg_scans(data) == scans
        assert load_image(data).size == (1_000, 750)


def test_scans_of_a_thumbnail_inside_a_segment_are_not_counted():
    thumbnail = encode(photo_like(160, 120), "JPEG", progressive=True)
    app1 = b"\xff\xe1" + (len(thumbnail) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + thumbnail
    photo = encode(photo_like(640, 480), "JPEG")
    with_thumbnail = photo[:2] + app1 + photo[2:]
    assert jpeg_scans(thumbnail) == 10 and jpeg_scans(with_thumbnail) == 1
    assert load_image(with_thumbnail).size == (640, 480)


def test_a_jpeg_of_endless_segments_is_refused_before_the_walk_gets_long():
    photo = encode(photo_like(64, 48), "JPEG")
    comments = b"\xff\xfe\x00\x02" * 20_000  # empty COM segments
    assert "parts" in str(rejected(photo[:2] + comments + photo[2:], "too_costly"))


def test_a_tiff_tile_far_larger_than_its_picture_is_refused():
    bomb = hostile_images.tiff_tile_bomb(side=64, tile=32_768)
    assert len(bomb) < 2 * MIB
    assert "32768x32768" in str(rejected(bomb, "too_costly"))


def test_a_tiff_tile_somewhat_larger_than_its_picture_is_decoded():
    img = load_image(hostile_images.tiff_tile_bomb(side=64, tile=256))
    assert img.size == (64, 64) and img.getpixel((5, 5)) == (0, 0, 0)


def test_run_length_bmps_are_refused_rather_than_decoded_in_python():
    bomb = hostile_images.bmp_rle_bomb()
    assert len(bomb) < 32 * 1024
    assert "bmp_rle" in str(rejected(bomb, "unsupported"))
    assert load_image(encode(Image.new("RGB", (40, 30), (9, 8, 7)), "BMP")).getpixel((0, 0)) == (9, 8, 7)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_a_giant_exif_block_is_not_rewritten_and_its_orientation_applies(fmt):
    bomb = hostile_images.exif_bomb(fmt, entries=9_000_000)
    assert len(bomb) > 16 * MIB
    img = load_image(bomb)
    # 64 x 48, left half blue, Orientation 6: shown turned a quarter clockwise, blue on top
    assert img.size == (48, 64)
    assert img.getpixel((24, 5))[2] > 150 and img.getpixel((24, 58))[0] > 150


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for the resident-set high-water mark")
@pytest.mark.timeout(300)
def test_hostile_files_cost_little_memory(tmp_path):
    files = {
        "scans.jpg": hostile_images.progressive_scan_bomb(),
        "tile.tif": hostile_images.tiff_tile_bomb(),
        "exif.png": hostile_images.exif_bomb("PNG"),
        "exif.webp": hostile_images.exif_bomb("WEBP"),
        "rle.bmp": hostile_images.bmp_rle_bomb(),
    }
    outcomes, peaks = {}, {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        outcomes[name], peaks[name] = peak_of_loading(tmp_path / name)
    print("peak resident-set growth, MiB:", {name: round(peak, 1) for name, peak in peaks.items()})
    assert outcomes == {
        "scans.jpg": "too_costly",
        "tile.tif": "too_costly",
        "exif.png": [48, 64],
        "exif.webp": [48, 64],
        "rle.bmp": "unsupported",
    }
    assert max(peaks.values()) < 100, peaks  # the probes cost 1 to 1.5 GiB each
