"""Masking the caption text an image shows (`--text-action mask`, T-MARS) instead of dropping the pair.

    from pipeline.filter.mask import masked_detections, mask_image
    words = masked_detections(detections, caption, min_conf=0.8, min_chars=5)   # [] -> nothing to mask
    jpg = mask_image(decoded.image, words)                                      # JPEG bytes, same size

DiHT drops a pair whose image shows its own caption as text (pipeline.filter.textspot.caption_match);
T-MARS (Maini et al., ICLR 2024) keeps it with the text's boxes filled with their mean colour, so the
image keeps its visual content and loses the shortcut. Pure functions, no Spark, no spotter.

Which boxes (masked_detections). The words of every confident run that matches the caption under the
DiHT rule, found through textspot's public API (caption_match, confident_runs), extended to their whole
line: every detection sharing a line id with a matched word is masked, whatever its confidence. A line's
weak neighbours are masked too because a re-spot of the masked image would otherwise read them again,
possibly confidently now that the context changed ("SKIING" alone after "NO" was masked). Detections on
other lines (a licence plate, a logo the caption does not quote) stay: T-MARS masks all text, but the
issue asks for the matching detections only, and text that does not match the caption is no shortcut.
The search repeats on what is left until caption_match finds nothing, so the caption text shown twice
(two signs) is masked twice, and re-applying the rule to the unmasked detections keeps the pair.
Then, once the rule has matched, the lines of the *near matches* left are masked too: runs that match
at any confidence (NEAR_CONF 0) with one shared character fewer (min_chars - 1). A word read at 0.78, or
one character short ("BIZA" of "Ibiza"), is one re-read away from a match: on the labelled real-text
set at 256 px, masking the matched lines alone left 3 of 68 masked images in which a re-spot found the
caption again ("IBIZA" re-read from "BIZA", "Horeless," from "Horcless," at 0.75, "El Jugo" with "Jugo"
at 0.78 -> 0.81); with the near matches, none of the 68 (70 with block runs; masks cover 8.4% of an image
on average; the first 12 positives are re-checked by tests/test_mask.py). The matched words are the
match's run (TextMatch.run: a line's run, or a run across the stacked lines of a block); a block's
match masks every line its run went through. Masking the whole line rather than the
words of the common window alone (TextMatch.window) is deliberate: see "Which boxes" above.

How a box is filled (mask_image). Each box is padded on every side by PAD_FRACTION (0.2) of its height,
at least MIN_PAD_PX (1) pixel: detector boxes hug the glyphs, and anti-aliased edges, JPEG ringing and
the ascenders / descenders a tight box clips (1-2 px of 6-12 px text at the download stage's 256 px)
stay readable otherwise; a fifth of the height covers them without eating much of the picture. The
padded box (clipped to the image) is filled with its own mean colour (per channel, rounded), every mean
taken from the original pixels before any box is filled, boxes filled in the detections' order. Box
coordinates are first rounded to float32, as schemas.OCR stores them, so a re-decision from stored
evidence fills exactly the pixels a fresh run fills. The result is encoded as JPEG with the download
stage's quality (DownloadParams.encode_quality, 95) by pipeline.media.images.to_jpeg: same image and
boxes in, same bytes out (PIL's encoder is deterministic), which is what makes `make redecide` between
drop and mask byte-identical to a fresh run. Width and height are unchanged.
Tests: PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_mask.py
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.filter import textspot as ts
from pipeline.media import images as img

TEXT_ACTIONS = ("drop", "mask")   # --text-action: drop the pair (DiHT, the default) or mask its text (T-MARS)
PAD_FRACTION = 0.2                # padding on each side, as a fraction of the box's height (module docstring)
MIN_PAD_PX = 1
NEAR_CONF = 0.0                   # near matches (module docstring): any confidence,
NEAR_CHARS_LESS = 1               #   one shared character fewer than --min-chars
JPEG_QUALITY = 95                 # = pipeline.filter.download.DownloadParams.encode_quality (img2dataset's 95)


def _line_key(i: int, d) -> tuple:
    line = d[3] if len(d) > 3 and d[3] is not None else -1
    return ("line", line) if line >= 0 else ("alone", i)


def _matched_indices(dets: list, match: ts.TextMatch) -> list[int]:
    """Indices into `dets` of the words caption_match's `match` was made of (its run: a line's or a block's)."""
    where = {id(d): i for i, d in enumerate(dets)}
    return [where[id(d)] for d in match.run]


def masked_detections(detections: Sequence, caption: str | None, min_conf: float = 0.8,
                      min_chars: int = 5, blocks: bool = True) -> list:
    """The detections to mask ([] when the DiHT rule finds no match): every word on a line holding a run
    that matches the caption under the rule, repeated until nothing left matches, then the lines of the
    near matches left (NEAR_CONF, min_chars - NEAR_CHARS_LESS); in the detections' order. Detections
    without a box cannot be masked and are left out of the result (but still matched)."""
    chosen = _matched_lines(detections, range(len(detections)), caption, min_conf, min_chars, blocks)
    if chosen:
        rest = [i for i in range(len(detections)) if i not in chosen]
        chosen |= _matched_lines(detections, rest, caption, NEAR_CONF, max(1, min_chars - NEAR_CHARS_LESS), blocks)
    return [detections[i] for i in sorted(chosen) if len(detections[i]) > 2 and detections[i][2] is not None]


def _matched_lines(detections: Sequence, among, caption: str | None, min_conf: float, min_chars: int,
                   blocks: bool = True) -> set[int]:
    """Indices (of `among`) of every word on a line holding a run that matches under (min_conf, min_chars),
    repeated on what is left until nothing matches."""
    remaining = list(among)
    chosen: set[int] = set()
    while remaining:
        left = [detections[i] for i in remaining]
        match = ts.caption_match(left, caption, min_conf, min_chars, blocks)
        if match is None:
            break
        lines = {_line_key(remaining[j], left[j]) for j in _matched_indices(left, match)}
        hit = {i for i in remaining if _line_key(i, detections[i]) in lines}
        if not hit:   # cannot happen (a match has words); never loop forever
            break
        chosen |= hit
        remaining = [i for i in remaining if i not in hit]
    return chosen


def pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int] | None:
    """The padded box (x0, y0, x1, y1; x1, y1 exclusive) in whole pixels, clipped to the image; None when empty."""
    x0, y0, x1, y1 = (float(np.float32(v)) for v in box)   # as stored (schemas.OCR: float32)
    pad = max(MIN_PAD_PX, PAD_FRACTION * (y1 - y0))
    a, b = max(0, math.floor(x0 - pad)), max(0, math.floor(y0 - pad))
    c, d = min(width, math.ceil(x1 + pad)), min(height, math.ceil(y1 + pad))
    return (a, b, c, d) if c > a and d > b else None


def mask_array(rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """A copy of an H x W x 3 uint8 image with each padded box filled with its mean colour (means from the
    original pixels)."""
    h, w = rgb.shape[:2]
    out = rgb.copy()
    fills = []
    for box in boxes:
        px = pixel_box(box, w, h)
        if px is not None:
            a, b, c, d = px
            fills.append((px, np.rint(rgb[b:d, a:c].reshape(-1, rgb.shape[2]).mean(axis=0)).astype(np.uint8)))
    for (a, b, c, d), colour in fills:
        out[b:d, a:c] = colour
    return out


def mask_image(image: Image.Image | np.ndarray, detections: Sequence) -> bytes:
    """JPEG bytes (quality JPEG_QUALITY) of the image with the detections' boxes filled (module docstring)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    return img.to_jpeg(mask_array(rgb, [d[2] for d in detections]), quality=JPEG_QUALITY)


def mask_jpeg(data: bytes, detections: Sequence) -> bytes:
    """mask_image on encoded image bytes (decoded as the image stage decodes them)."""
    return mask_image(img.decode_image(data).image, detections)
