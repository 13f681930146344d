"""Hostile and unusual pictures: everything becomes RGB or an ImageRejected with a reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ffengine.errors import ImageRejected
from ffengine.images import load_image, read_image_bytes, square_crop


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rejected(source: object, reason: str, **kw: object) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        load_image(source, **kw)  # type: ignore[arg-type]
    err = info.value
    assert err.reason == reason, (err.reason, str(err))
    message = str(err)
    assert message and message[0].isupper() and "Traceback" not in message and "\n" not in message
    return err


def test_plain_jpeg_bytes_and_path(image_bytes, tmp_path):
    data = image_bytes(seed=3, size=(64, 48))
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    for source in (data, bytearray(data), memoryview(data), path, str(path)):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (64, 48)


def test_exif_orientation_is_applied():
    # 40x20 landscape, left half red, right half blue; EXIF 6 says "rotate 90 degrees clockwise to view".
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    img = load_image(encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes()))
    assert img.size == (20, 40)
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[0] > 200 and top[2] < 60, top  # the red (left) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_palette_with_transparency_becomes_white():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([10, 200, 30] + [0, 0, 0] * 255)
    img.putpixel((0, 0), 1)
    out = load_image(encode(img, "PNG", transparency=1))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((4, 4)) == (10, 200, 30)


def test_rgba_alpha_is_flattened_on_white():
    arr = np.zeros((6, 6, 4), np.uint8)
    arr[..., :3] = (0, 0, 200)
    arr[:3, ..., 3] = 255  # top half opaque blue, bottom half fully transparent
    out = load_image(encode(Image.fromarray(arr, "RGBA"), "PNG"))
    assert out.getpixel((2, 1)) == (0, 0, 200)
    assert out.getpixel((2, 4)) == (255, 255, 255)


def test_greyscale_and_cmyk_become_rgb():
    grey = load_image(encode(Image.new("L", (10, 10), 90), "PNG"))
    assert grey.mode == "RGB" and grey.getpixel((3, 3)) == (90, 90, 90)
    red = load_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = red.getpixel((8, 8))
    assert red.mode == "RGB" and r > 230 and g < 30 and b < 30


def test_16_bit_greyscale_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16).repeat(4, axis=0)
    for fmt in ("PNG", "TIFF"):
        out = np.asarray(load_image(encode(Image.fromarray(arr), fmt)))
        assert out[0, :, 0].tolist() == [0, 128, 255, 4], fmt  # Pillow's own convert would give 0, 255, 255, 255


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (12, 12), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    r, g, b = load_image(data).getpixel((6, 6))
    assert r > 200 and b < 50


def test_webp_and_bmp_are_accepted():
    for fmt in ("WEBP", "BMP"):
        assert load_image(encode(Image.new("RGB", (9, 7), (1, 2, 3)), fmt)).size == (9, 7)


def test_not_an_image():
    err = rejected(b"%PDF-1.4 definitely not a picture" * 10, "not_image")
    assert "JPEG" in str(err)


def test_formats_outside_the_allow_list_are_refused_unopened():
    # ICO decodes fine in Pillow, but nobody photographs a dress as an icon; every format we
    # accept is another parser exposed to the internet (EPS would even start Ghostscript).
    rejected(encode(Image.new("RGB", (16, 16)), "ICO"), "not_image")
    rejected(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "not_image")


def test_truncated_jpeg(image_bytes):
    data = image_bytes(seed=1, size=(200, 150))
    rejected(data[: len(data) // 2], "truncated")


def test_empty_bytes_and_empty_file(tmp_path):
    rejected(b"", "empty")
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    rejected(path, "empty")


def test_missing_file(tmp_path):
    err = rejected(tmp_path / "nope.jpg", "not_found")
    assert "nope.jpg" in str(err)


def test_oversized_file_bytes_and_path(image_bytes, tmp_path):
    data = image_bytes(seed=2, size=(120, 90))
    err = rejected(data, "too_large", max_bytes=len(data) - 1)
    assert "MiB" in str(err)
    path = tmp_path / "big.jpg"
    path.write_bytes(data)
    rejected(path, "too_large", max_bytes=100)


def test_byte_limits_are_printed_in_mib_everywhere(tmp_path):
    # The same 20 * 1024 * 1024 limit used to read "21 MB" in the CLI and "20 MB" in the bot.
    from ffengine.fetch import _too_large as fetch_too_large
    from ffengine.images import MAX_BYTES, format_mib, mib

    assert (format_mib(MAX_BYTES), mib(MAX_BYTES), mib(300_000), format_mib(0)) == ("20 MiB", "20", "0.3", "0 MiB")
    path = tmp_path / "big.jpg"
    path.write_bytes(b"\xff\xd8" + b"x" * (MAX_BYTES + 3 * 1024 * 1024 // 10))
    assert str(rejected(path, "too_large")) == "The image is too large (20.3 MiB); the limit is 20 MiB."
    assert str(fetch_too_large(None, MAX_BYTES)) == "image too large (more than 20 MiB; the limit is 20 MiB)"


def test_read_image_bytes_returns_the_bytes_with_load_images_checks(image_bytes, tmp_path):
    data = image_bytes(seed=4, size=(40, 30))
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    for source in (data, bytearray(data), memoryview(data), path, str(path)):
        out = read_image_bytes(source)
        assert type(out) is bytes and out == data
    for source, reason, kw in (
        (path, "too_large", {"max_bytes": len(data) - 1}),
        (data, "too_large", {"max_bytes": len(data) - 1}),
        (b"", "empty", {}),
        (tmp_path / "nope.jpg", "not_found", {}),
    ):
        with pytest.raises(ImageRejected) as info:
            read_image_bytes(source, **kw)  # type: ignore[arg-type]
        assert info.value.reason == reason


def png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims ``width`` x ``height``: a decompression bomb's header."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_decompression_bomb_is_refused_from_the_header():
    bomb = png_claiming(8_000, 8_000)  # 64 megapixels (192 MB decoded) in 70 bytes
    assert len(bomb) < 200
    err = rejected(bomb, "too_many_pixels")
    assert "8000x8000" in str(err) and "50 megapixels" in str(err)
    # Beyond Pillow's own guard, and even with our limit lifted, it is still refused.
    rejected(png_claiming(40_000, 40_000), "too_many_pixels")
    rejected(png_claiming(40_000, 40_000), "too_many_pixels", max_pixels=10**12)


def test_pixel_limit_applies_to_normal_pictures(image_bytes):
    rejected(image_bytes(size=(100, 100)), "too_many_pixels", max_pixels=9_999)
    assert load_image(image_bytes(size=(100, 100)), max_pixels=10_000).size == (100, 100)


def test_damaged_files_never_escape_as_other_exceptions():
    rng = np.random.default_rng(7)
    picture = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    outcomes = set()
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        good = encode(picture, fmt)
        for _ in range(12):
            bad = bytearray(good)
            for pos in rng.integers(0, len(bad), size=4):
                bad[pos] = int(rng.integers(0, 256))
            try:
                outcomes.add(load_image(bytes(bad)).mode)
            except ImageRejected as err:
                outcomes.add(err.reason)
    assert outcomes <= {"RGB", "not_image", "truncated", "corrupt", "too_many_pixels", "empty"}, outcomes
    assert outcomes & {"not_image", "truncated", "corrupt"}  # the mutations did break some files


def test_big_jpeg_is_decoded_at_reduced_size_but_never_below_draft_side():
    data = encode(Image.new("RGB", (4000, 3000), (120, 60, 30)), "JPEG")
    drafted = load_image(data)
    assert min(drafted.size) >= 512 and drafted.size[0] < 4000
    assert load_image(data, draft_side=None).size == (4000, 3000)


@pytest.mark.parametrize("size", [(168, 224), (640, 512), (500, 300), (385, 287), (224, 224), (100, 61), (1200, 1500)])
def test_square_crop_is_torchvisions_resize_and_centre_crop(size):
    from torchvision import transforms

    rng = np.random.default_rng(sum(size))
    # Smooth random picture (upscaled noise), like a photo rather than per-pixel noise.
    small = Image.fromarray(rng.integers(0, 256, (size[1] // 8 + 2, size[0] // 8 + 2, 3), dtype=np.uint8))
    img = small.resize(size, Image.Resampling.BICUBIC)
    got = square_crop(img, 256, 224)
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
    want = np.asarray(transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(img))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_square_crop_handles_extreme_shapes_and_modes():
    strip = Image.new("RGB", (1, 3000), (10, 20, 30))  # would be 256 x 768000 pixels if resized whole
    assert square_crop(strip, 256, 224)[100, 100].tolist() == [10, 20, 30]
    tiny = Image.new("L", (3, 2), 77)
    out = square_crop(tiny, 256, 224)
    assert out.shape == (224, 224, 3) and (out == 77).all()
