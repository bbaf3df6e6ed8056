"""Text spotting for the CAT filter: batched easyocr (detect, then recognise) and the DiHT caption rule.

    from pipeline.textspot import TextSpotter, TextSpotParams, caption_match, spot_and_match
    spotter = TextSpotter()                              # GPU when torch.cuda.is_available()
    spotter.spot([rgb_array, ...])                       # per image: [(text, confidence), ...]
    caption_match([("SUNSET BEACH", 0.93)], "a sunset beach in bali")   # -> TextMatch(...) or None
    spot_and_match(images, captions, TextSpotParams())   # what the Spark job calls per partition

The rule (DiHT, Radenovic et al. 2023): drop the pair when a detection with confidence >= min_conf
shares >= min_chars characters with the caption within a sliding window. Precisely, here:
  * normalise both strings: Unicode NFKC, casefold, keep letters and digits only (whitespace and
    punctuation removed, so OCR's dropped or extra spaces and stray punctuation do not matter);
  * a detection matches when some window of min_chars consecutive characters of its normalised
    text occurs in the normalised caption, i.e. the longest common substring >= min_chars.
    "SUNSET" vs "a sunset beach" shares 6 -> match; "STOP" (4) never can; "Sale 50%" vs a caption
    without "sale5" or "ale50" does not.
  * the match reported is the longest common substring of the best detection (most shared
    characters, then highest confidence), with `span` the caption's original characters it covers.
rapidfuzz's LCSseq (longest common subsequence, a C upper bound of the substring length) rejects
non-matching detections cheaply; the exact window check runs only on the survivors.

Speed: easyocr's readtext with defaults runs the CRAFT detector at the image's native size (up to
2560 px), one image per call: ~2-3 s per 640x480 image on a CPU core. TextSpotter resizes every
image to a fixed canvas (long side 320), stacks same-shaped canvases into one batch for the CRAFT
net, maps boxes back to the original image, skips boxes too small or too narrow to hold min_chars
characters, and runs the recogniser only on the remaining boxes of the original-resolution image.
bench/bench_textspot.py measures it against the naive baseline (bench/results/textspot.json).
Tests: PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_textspot.py
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from rapidfuzz.distance import LCSseq


# ---------------------------------------------------------------- the caption rule
@dataclass(frozen=True)
class TextMatch:
    text: str          # the OCR detection that matched, as recognised
    conf: float        # its recogniser confidence
    span: str          # the caption substring it matches (original characters, for <mark> in reports)
    n_chars: int       # shared characters (letters/digits) of the longest common window
    start: int         # span = caption[start:end]
    end: int


def normalise(text: str) -> tuple[str, list[int]]:
    """NFKC + casefold, letters and digits only; also returns each output char's index in `text`.
    Normalised per character so every output character maps back to the original (for `span`)."""
    chars, origin = [], []
    for i, ch in enumerate(text):
        for out in unicodedata.normalize("NFKC", ch).casefold():
            if out.isalnum():
                chars.append(out)
                origin.append(i)
    return "".join(chars), origin


def _longest_common_window(text: str, caption: str, min_chars: int) -> tuple[int, int]:
    """(length, caption start) of the longest common substring of text and caption, or (0, -1) when
    it is shorter than min_chars. Grows windows of min_chars found by a set lookup: O(len) per size."""
    if LCSseq.similarity(text, caption, score_cutoff=min_chars) < min_chars:
        return 0, -1  # even the longest common subsequence is too short: no window can match
    best_len, best_start, size = 0, -1, min_chars
    while size <= len(text):
        windows = {caption[j:j + size]: j for j in range(len(caption) - size, -1, -1)}  # leftmost wins
        hits = [windows[text[i:i + size]] for i in range(len(text) - size + 1) if text[i:i + size] in windows]
        if not hits:
            break
        best_len, best_start, size = size, min(hits), size + 1
    return best_len, best_start


def caption_match(detections: Sequence[tuple[str, float]], caption: str | None,
                  min_conf: float = 0.8, min_chars: int = 5) -> TextMatch | None:
    """The DiHT text-spotting rule: the best detection (conf >= min_conf) sharing a window of
    >= min_chars normalised characters with the caption, or None (keep the pair)."""
    if not caption or min_chars < 1:
        return None
    norm_caption, origin = normalise(caption)
    best: TextMatch | None = None
    for text, conf in detections:
        if conf < min_conf or not text:
            continue
        n_chars, start = _longest_common_window(normalise(text)[0], norm_caption, min_chars)
        if n_chars < min_chars:
            continue
        if best is None or (n_chars, conf) > (best.n_chars, best.conf):
            lo, hi = origin[start], origin[start + n_chars - 1] + 1
            best = TextMatch(text, float(conf), caption[lo:hi], n_chars, lo, hi)
    return best


# ---------------------------------------------------------------- parameters
@dataclass(frozen=True)
class TextSpotParams:
    min_conf: float = 0.8         # DiHT: only confident detections count
    min_chars: int = 5            # DiHT: >= 5 shared characters; shorter overlaps are common words by chance
    canvas_size: int = 320        # detector input long side (multiple of 32): 4x fewer CRAFT pixels than a
                                  # 640x480 native; boxes match easyocr's at the same canvas (bench_textspot)
    batch_size: int = 16          # canvases per CRAFT forward: little gain on CPU, the big one on GPU
    text_threshold: float = 0.7   # easyocr's defaults for the CRAFT heat maps: the weights were tuned
    low_text: float = 0.4         #   with them
    link_threshold: float = 0.4
    min_box_side: int = 8         # canvas px; easyocr drops boxes < 20 px at 640 (~10 px on our canvas)
    min_char_aspect: float = 0.25 # a character is >= ~0.25 box heights wide ('i', 'l'): boxes narrower
                                  #   than min_chars * this * height cannot hold a match; not recognised
    merge_gap: float = 0.1        # join CRAFT boxes closer than this x box height: word-level detections, as
                                  #   text spotters report words. easyocr's 0.5 joins a line into one detection
                                  #   whose confidence (a product over its characters) falls below 0.8 even when
                                  #   read exactly ("TALKING ON A PHONE" 0.71 in the labelled set) -> lost recall
    box_margin: float = 0.1       # easyocr's add_margin (box height fraction added around each box); the
                                  #   coarse canvas's heat map cells are several original px: see bench
    max_boxes: int = 48           # bounds the recogniser's cost on dense text (pages); largest boxes first
    recog_batch_size: int = 32    # crops per recogniser call on GPU (easyocr runs one by one on CPU)

    def __post_init__(self):
        if self.canvas_size % 32 or self.canvas_size < 64:
            raise ValueError(f"canvas_size must be a multiple of 32 and >= 64, got {self.canvas_size}")
        if self.batch_size < 1 or self.min_chars < 1 or not 0 <= self.min_conf <= 1:
            raise ValueError(f"invalid text-spot parameters: {self}")


# ---------------------------------------------------------------- easyocr reader (one per process)
_READERS: dict = {}


def default_model_dir() -> str:
    import easyocr_en_models  # PyPI wheel with craft_mlt_25k.pth + english_g2.pth: nothing is downloaded
    return easyocr_en_models.model_dir()


def get_reader(gpu: bool, model_dir: str | None = None):
    """The process's easyocr.Reader for (gpu, model_dir); built once, offline."""
    model_dir = model_dir or default_model_dir()
    key = (bool(gpu), model_dir)
    if key not in _READERS:
        # easyocr creates folders under EASYOCR_MODULE_PATH (default ~/.EasyOCR, maybe read-only on a cluster)
        os.environ.setdefault("EASYOCR_MODULE_PATH", os.path.join(tempfile.gettempdir(), "catcurate-easyocr"))
        import easyocr
        _READERS[key] = easyocr.Reader(["en"], gpu=bool(gpu), model_storage_directory=model_dir,
                                       download_enabled=False, verbose=False)
    return _READERS[key]


# ---------------------------------------------------------------- the spotter
class TextSpotter:
    """Batched easyocr: detection on fixed-size canvases, recognition only on plausible boxes.

    TextSpotter(gpu=None, params=None, model_dir=None, **overrides): gpu=None means
    torch.cuda.is_available(); overrides replace TextSpotParams fields (e.g. canvas_size=256)."""

    def __init__(self, gpu: bool | None = None, params: TextSpotParams | None = None,
                 model_dir: str | None = None, **overrides):
        import torch
        self.params = dataclasses.replace(params or TextSpotParams(), **overrides)
        self.gpu = torch.cuda.is_available() if gpu is None else bool(gpu)
        self.reader = get_reader(self.gpu, model_dir)
        self.device = self.reader.device

    def spot(self, images: Sequence[np.ndarray], captions: Sequence[str | None] | None = None
             ) -> list[list[tuple[str, float]]]:
        """Per image (H x W x 3 uint8 RGB), the recognised texts with their confidences.

        With `captions`, an image's boxes are recognised largest first and recognition stops at the
        first detection that matches the image's caption (caption_match): the drop verdict cannot
        change any more, and the recogniser is the most expensive part on CPU after detection."""
        import cv2
        p = self.params
        results = []
        for i, (image, (horizontal, free)) in enumerate(zip(images, self.detect(images))):
            if not horizontal and not free:
                results.append([])  # nothing detected: the recogniser never runs (most photos)
                continue
            grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
            caption = captions[i] if captions is not None else None
            if not caption or self.gpu:  # GPU: one batched call is cheaper than stopping early
                found = self._recognize(grey, horizontal, free)
            else:
                found = []
                for box_h, box_f in [([b], []) for b in horizontal] + [([], [f]) for f in free]:
                    found += self._recognize(grey, box_h, box_f)
                    if caption_match(found[-1:], caption, p.min_conf, p.min_chars):
                        break
            results.append(found)
        return results

    def _recognize(self, grey: np.ndarray, horizontal: list, free: list) -> list[tuple[str, float]]:
        found = self.reader.recognize(grey, horizontal, free, reformat=False, detail=1,
                                      batch_size=self.params.recog_batch_size if self.gpu else 1)
        return [(str(text), float(conf)) for _box, text, conf in found]

    def detect(self, images: Sequence[np.ndarray]) -> list[tuple[list, list]]:
        """Per image, easyocr's (horizontal boxes, free-form boxes) in original pixel coordinates."""
        import cv2
        from easyocr.imgproc import normalizeMeanVariance
        p = self.params
        canvases, scales, buckets = [None] * len(images), [0.0] * len(images), defaultdict(list)
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i}: H x W x 3 uint8 RGB expected, got {image.shape} {image.dtype}")
            h, w = image.shape[:2]
            if min(h, w) < 4:
                continue  # a few pixels hold no readable text
            scale = p.canvas_size / max(h, w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            # INTER_AREA when shrinking keeps thin strokes that INTER_LINEAR would alias away
            resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            shape = (math.ceil(nh / 32) * 32, math.ceil(nw / 32) * 32)  # CRAFT's U-net needs /32 sizes
            canvas = np.zeros((*shape, 3), np.uint8)
            canvas[:nh, :nw] = resized
            canvases[i], scales[i] = canvas, scale
            buckets[shape].append(i)  # same-shape canvases share a forward pass (4:3, 3:4, 1:1, ...)
        out: list[tuple[list, list]] = [([], []) for _ in images]
        for indices in buckets.values():
            for b in range(0, len(indices), p.batch_size):
                chunk = indices[b:b + p.batch_size]
                maps = self._craft([normalizeMeanVariance(canvases[i]) for i in chunk])
                for i, heat in zip(chunk, maps):
                    out[i] = self._boxes(heat, scales[i])
        return out

    def _craft(self, batch: list[np.ndarray]) -> np.ndarray:
        import torch
        x = torch.from_numpy(np.stack(batch).transpose(0, 3, 1, 2)).to(self.device)
        with torch.inference_mode():
            y, _features = self.reader.detector(x)
        return y.float().cpu().numpy()  # N x H/2 x W/2 x (text score, link score)

    def _boxes(self, heat: np.ndarray, scale: float) -> tuple[list, list]:
        from easyocr.craft_utils import getDetBoxes
        from easyocr.utils import group_text_box
        p = self.params
        boxes, _polys, _ = getDetBoxes(heat[:, :, 0], heat[:, :, 1], p.text_threshold, p.link_threshold, p.low_text)
        if len(boxes) == 0:
            return [], []
        to_original = 2.0 / scale  # heat maps are at half the canvas resolution
        polys = [(np.asarray(box) * to_original).astype(np.int32).reshape(-1) for box in boxes]
        # easyocr's grouping (slope, centre, height thresholds: its readtext defaults); words not lines
        horizontal, free = group_text_box(polys, 0.1, 0.5, 0.5, p.merge_gap, p.box_margin, True)
        min_side = p.min_box_side / scale
        min_aspect = p.min_chars * p.min_char_aspect
        horizontal = [b for b in horizontal
                      if max(b[1] - b[0], b[3] - b[2]) >= min_side and (b[1] - b[0]) >= min_aspect * (b[3] - b[2])]
        free = [f for f in free if max(np.ptp([c[0] for c in f]), np.ptp([c[1] for c in f])) >= min_side]
        # largest first: overlaid titles and captions are the big text, so an early match comes sooner
        horizontal = sorted(horizontal, key=lambda b: -(b[1] - b[0]) * (b[3] - b[2]))[:p.max_boxes]
        free = free[:max(0, p.max_boxes - len(horizontal))]
        return horizontal, free


# ---------------------------------------------------------------- what the Spark job calls
@dataclass(frozen=True)
class TextSpotResult:
    detections: list[tuple[str, float]]   # recognised texts (all for kept pairs; up to the match for dropped)
    match: TextMatch | None               # not None -> drop the pair (reason text_spotted)

    @property
    def drop(self) -> bool:
        return self.match is not None


_SPOTTERS: dict = {}


def get_spotter(params: TextSpotParams, gpu: bool | None = None) -> TextSpotter:
    """The process's TextSpotter for these parameters (the reader inside is shared anyway)."""
    key = (params, gpu)
    if key not in _SPOTTERS:
        _SPOTTERS[key] = TextSpotter(gpu=gpu, params=params)
    return _SPOTTERS[key]


def spot_and_match(images: Sequence[np.ndarray], captions: Sequence[str | None],
                   params: TextSpotParams | None = None, spotter: TextSpotter | None = None) -> list[TextSpotResult]:
    """Spot text in a partition's decoded images (batched) and apply the caption rule to each pair."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    params = params or (spotter.params if spotter else TextSpotParams())
    spotter = spotter or get_spotter(params)
    results = []
    for detections, caption in zip(spotter.spot(images, captions), captions):
        match = caption_match(detections, caption, min_conf=params.min_conf, min_chars=params.min_chars)
        results.append(TextSpotResult(detections, match))
    return results
