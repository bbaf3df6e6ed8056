"""Every bad-image case of issue 3 is decoded safely or raises ImageDecodeError with a clear message."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.media.images import DEFAULT_MAX_PIXELS, DecodedImage, ImageDecodeError, decode_image, to_jpeg


def _photo(size=(64, 48)) -> Image.Image:
    """A real photo (skimage's astronaut), resized: JPEG artefacts on real content, not a flat colour."""
    from skimage import data
    return Image.fromarray(data.astronaut()).resize(size)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _assert_rgb(decoded: DecodedImage, width: int, height: int):
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (width, height)
    arr = decoded.array()
    assert arr.shape == (height, width, 3) and arr.dtype == np.uint8
    return arr


def test_valid_jpeg_roundtrip():
    decoded = decode_image(_encode(_photo(), "JPEG", quality=90))
    arr = _assert_rgb(decoded, 64, 48)
    assert decoded.source_format == "JPEG" and arr.std() > 10  # real content survived
    again = decode_image(to_jpeg(decoded.image))
    assert np.abs(again.array().astype(int) - arr.astype(int)).mean() < 6


def test_truncated_jpeg():
    data = _encode(_photo((256, 192)), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_corrupt_jpeg():
    data = bytearray(_encode(_photo(), "JPEG"))
    sof = data.find(b"\xff\xc0")  # baseline start-of-frame marker: the header declaring the size
    assert sof > 0
    data[sof + 2: sof + 40] = b"\xff" * 38
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_image(bytes(data))


def test_zero_bytes():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="null"):
        decode_image(None)


def test_html_is_not_an_image():
    page = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>"
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        decode_image(page)


def test_png_alpha_composited_on_white():
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 0] = 200                       # red everywhere ...
    rgba[:, :10, 3] = 255                    # ... opaque on the left, fully transparent on the right
    decoded = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    arr = _assert_rgb(decoded, 20, 10)
    assert decoded.source_mode == "RGBA"
    assert tuple(arr[5, 2]) == (200, 0, 0)
    assert tuple(arr[5, 15]) == (255, 255, 255)


def test_palette_png_with_transparency():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))
    decoded = decode_image(_encode(img, "PNG", transparency=0))
    arr = _assert_rgb(decoded, 8, 8)
    assert tuple(arr[0, 0]) == (10, 200, 30) and tuple(arr[0, 7]) == (255, 255, 255)


def test_cmyk_jpeg():
    cmyk = _photo().convert("CMYK")
    decoded = decode_image(_encode(cmyk, "JPEG", quality=95))
    arr = _assert_rgb(decoded, 64, 48)
    assert decoded.source_mode == "CMYK"
    reference = np.asarray(_photo(), dtype=int)
    assert np.abs(arr.astype(int) - reference).mean() < 20  # colours survive the CMYK round trip


def test_grayscale():
    decoded = decode_image(_encode(_photo().convert("L"), "PNG"))
    arr = _assert_rgb(decoded, 64, 48)
    assert decoded.source_mode == "L"
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_16bit_grayscale_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (4, 1))
    decoded = decode_image(_encode(Image.fromarray(ramp), "PNG"))
    arr = _assert_rgb(decoded, 32, 4)
    assert decoded.source_mode.startswith("I")
    # a naive convert("RGB") clips everything above 255 to white; scaling keeps the ramp
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255 and 100 < arr[0, 16, 0] < 160
    assert (np.diff(arr[0, :, 0].astype(int)) >= 0).all()


def test_decompression_bomb_rejected_before_decoding():
    # a 100,000 x 100,000 PNG declared in a ~60-byte file: decoding would allocate 30 GB
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))
    assert len(bomb) < 200
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(bomb)
    # also just over our own limit (PIL's built-in guard would not fire here)
    side = int(DEFAULT_MAX_PIXELS ** 0.5) + 1
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b""))


def test_max_pixels_is_configurable():
    data = _encode(_photo(), "JPEG")
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 1,000"):
        decode_image(data, max_pixels=1000)
    assert decode_image(data, max_pixels=64 * 48).width == 64


def test_one_by_one():
    decoded = decode_image(_encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    assert tuple(_assert_rgb(decoded, 1, 1)[0, 0]) == (1, 2, 3)
    assert decode_image(to_jpeg(decoded.image)).width == 1


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (12, 10), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    decoded = decode_image(data)
    arr = _assert_rgb(decoded, 12, 10)
    assert decoded.n_frames == 3 and decoded.source_format == "GIF"
    assert tuple(arr[3, 3]) == (255, 0, 0)


def test_to_jpeg_accepts_arrays():
    arr = np.asarray(_photo())
    decoded = decode_image(to_jpeg(arr, quality=80))
    assert decoded.source_format == "JPEG" and decoded.array().shape == arr.shape
