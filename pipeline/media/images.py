"""Safe image decoding for the text-spot stage: bytes -> RGB, or a clear ImageDecodeError.

    from pipeline.media.images import decode_image, to_jpeg, ImageDecodeError
    try:
        decoded = decode_image(row["jpg"])          # DecodedImage(image=<PIL RGB>, width, height, ...)
    except ImageDecodeError as err:
        ledger_row(reason=R_DECODE_ERROR, error_message=str(err))
    shard_row = {"jpg": to_jpeg(decoded.image), "width": decoded.width, "height": decoded.height}

Web images are hostile input. Every failure mode (empty bytes, HTML error pages, truncated or
corrupt files, decompression bombs, exotic modes) ends as ImageDecodeError with a message a person
can act on, so a Spark task never dies on one bad row. The pixel limit is checked on the declared
size in the header BEFORE any pixel is decoded, so a bomb never allocates its buffer.
Run the tests: PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_images.py
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 40 Mpx: above 8K video frames (33 Mpx) and typical DSLR photos (24-36 Mpx), far below what would
# hurt an executor (40 Mpx RGB = 120 MB decoded). PIL's own default guard is 89 Mpx, so ours fires first.
DEFAULT_MAX_PIXELS = 40_000_000
WHITE = (255, 255, 255)  # alpha is composited on white: web images with transparency assume a page background


class ImageDecodeError(ValueError):
    """The bytes are not a decodable, safe image. str(err) is the ledger's error_message."""


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image   # mode "RGB", EXIF orientation applied, first frame of animations
    width: int
    height: int
    source_format: str   # PIL's format name of the input, e.g. "JPEG", "PNG", "GIF"
    source_mode: str     # PIL mode before conversion, e.g. "CMYK", "I;16", "RGBA"
    n_frames: int        # > 1 for animations; only the first frame is used

    def array(self) -> np.ndarray:
        """H x W x 3 uint8 RGB array (what TextSpotter.spot takes)."""
        return np.asarray(self.image, dtype=np.uint8)


def image_digest(data: bytes) -> bytes:
    """128-bit content digest of encoded image bytes: the identity under which an image is spotted once
    (image stage) and its frozen features are cached (model_training.features)."""
    return hashlib.blake2b(data, digest_size=16).digest()


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode image bytes to RGB. Raises ImageDecodeError for anything that is not a safe image."""
    if data is None:
        raise ImageDecodeError("no image bytes (null)")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"image bytes expected, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("empty image bytes (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) instead of raising between 1x and 2x its limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(bytes(data)))  # parses the header only; no pixels yet
            width, height = im.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(f"invalid declared size {width}x{height}")
            if width * height > max_pixels:
                raise ImageDecodeError(f"declared size {width}x{height} = {width * height:,} pixels "
                                       f"exceeds the limit of {max_pixels:,} (decompression bomb guard)")
            source_format, source_mode = im.format or "unknown", im.mode
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                im.seek(0)
            im.load()  # decodes now: truncated / corrupt data raises here, not later in a consumer
            rgb = _to_rgb(im)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a recognised image format ({len(data):,} bytes, starts with "
                               f"{bytes(data[:16])!r})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"decompression bomb: {err}") from None
    except MemoryError:
        raise ImageDecodeError("out of memory while decoding") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise ImageDecodeError(f"corrupt or truncated image: {type(err).__name__}: {err}") from None
    return DecodedImage(rgb, rgb.width, rgb.height, source_format, source_mode, n_frames)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha on white, 16/32-bit scaled to 8-bit (PIL's convert would clip)."""
    try:
        im = ImageOps.exif_transpose(im)  # phone photos store rotation in EXIF; OCR needs upright text
    except Exception:
        pass  # a broken EXIF block is not a broken image: keep the stored orientation
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im), mode), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    values = values.astype(np.float64)
    if mode.startswith("I;16"):
        scale = 65535.0
    else:  # "I" (PNG 16-bit greyscale opens as I on some Pillow versions) or float "F"
        peak = float(values.max()) if values.size else 0.0
        scale = 255.0 if peak <= 255 else (65535.0 if peak <= 65535 else peak)
    return np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)


def to_jpeg(img: Image.Image | np.ndarray, quality: int = 95) -> bytes:
    """Re-encode an RGB image (PIL or H x W x 3 uint8 array) as JPEG bytes for the training shards."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
