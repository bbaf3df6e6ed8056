"""Text spotting for the CAT filter: the DiHT caption rule on lines, and the easyocr engine (batched CRAFT + english_g2).

    from pipeline.filter.textspot import TextSpotter, TextSpotParams, Detection, caption_match
    spotter = TextSpotter()                              # pipeline.media.devices: the Spark task's GPU, CUDA, or CPU
    spotter.spot([rgb_array, ...])                       # per image: [Detection(text, conf, box, line), ...]
    caption_match([("SUNSET BEACH", 0.93)], "a sunset beach in bali")   # -> TextMatch(...) or None
    matched_detections(spotter.spot([rgb])[0], caption)  # the words the match covers ([] when none)
    # engines behind one interface (easyocr here, ppocr in pipeline.filter.ppocr): pipeline.filter.spotting

The rule (DiHT, Radenovic et al. 2023): drop the pair when text read with confidence >= min_conf
shares >= min_chars characters with the caption within a sliding window. Precisely, here:
  * detections are words (text, confidence, box) grouped into lines (assign_lines: same baseline,
    gaps up to ~one character height, as easyocr's readtext merges); the candidate texts are, per
    line, the maximal runs of consecutive words that are each read with conf >= min_conf
    (confident_runs), joined in reading order. So a quoted phrase of short words ("ON TOP OF A")
    reaches 5 characters on its line, and a window only counts when every word in it is confident;
    plain (text, conf) pairs are each a line of their own (the word-level rule);
  * lines are grouped into blocks (assign_blocks: stacked lines of similar height, < half a line apart,
    overlapping horizontally by half the narrower one, as on a placard or a poster); the runs of
    confident words of a block read top to bottom (block_runs) are candidate texts too, so a quote set
    on several lines ("DONT / TAX / ME / BRO!") matches; computed from the stored evidence alone (text,
    conf, box, line id), so redecide re-applies it as a fresh run does;
  * normalise both strings: Unicode NFKC, casefold, keep letters and digits only (whitespace and
    punctuation removed, so OCR's dropped or extra spaces and stray punctuation do not matter);
  * a run matches when some window of min_chars consecutive characters of its normalised text
    occurs in the normalised caption, i.e. the longest common substring >= min_chars.
    "SUNSET" vs "a sunset beach" shares 6 -> match; "STOP" (4) never can; "Sale 50%" vs a caption
    without "sale5" or "ale50" does not.
  * the match reported is the longest common substring of the best run (most shared characters,
    then highest lowest-word confidence), with `span` the caption's original characters it covers, and
    the detections it was made of (TextMatch.run, .window; matched_detections: what masking covers).
rapidfuzz's LCSseq (longest common subsequence, a C upper bound of the substring length) rejects
non-matching runs cheaply; the exact window check runs only on the survivors.

Detection scale (both engines): the detector's canvas long side is the image's long side clamped to
[canvas_min, canvas_size] (TextSpotParams.canvas_bounds; per-engine defaults ENGINE_CANVAS measured by
bench/bench_textspot.py): the download stage's 256-px images are upscaled, large web images capped.
Text legible at 256 px is often 6-12 px high; the old "0.625x, never upscale" (160 px) lost most of it.

Speed and recognition quality: easyocr's readtext with defaults runs the CRAFT detector at the
image's native size (up to 2560 px), one image per call, then the recogniser one box per call: ~2-3 s
per 640x480 image on a CPU core. TextSpotter
  * resizes every image to its canvas (the detection-scale policy above) and stacks same-shaped canvases
    into one CRAFT batch (channels_last, bfloat16 where the CPU has bf16 units), boxes mapped back to the image;
  * skips boxes too small, and boxes too narrow to hold min_chars characters unless they share a line
    with other boxes (keep_readable: the short words of a phrase are read);
  * crops the remaining boxes from the original-resolution image, resized to the recogniser's 64 px
    height with INTER_AREA (easyocr's bilinear aliases large overlaid text), and reads all crops of
    the batch in few recogniser forwards (grouped by padded width);
  * re-reads boxes read below min_conf from slightly wider crops and keeps the more confident
    reading (coarse-canvas box edges clip letters), unless the image's verdict is already "drop".
bench/bench_textspot.py measures both engines against easyocr readtext and RapidOCR defaults at the
operating point (bench/results/textspot.json, .md; docs/text-spotting.md).
Tests: PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_textspot.py
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import tempfile
import time
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
from rapidfuzz.distance import LCSseq


# ---------------------------------------------------------------- the caption rule
class Detection(NamedTuple):
    """One recognised word: its text, recogniser confidence, box (x0, y0, x1, y1) in the image's pixels
    and the line it sits on (same baseline, gaps up to ~line_gap x its height; -1: a line of its own).
    Plain (text, conf) pairs are accepted wherever detections are: each is a line of its own."""
    text: str
    conf: float
    box: tuple | None = None
    line: int = -1


@dataclass(frozen=True)
class TextMatch:
    text: str          # the detections that matched, as recognised (a word, or words of one line joined by spaces)
    conf: float        # their lowest recogniser confidence
    span: str          # the caption substring it matches (original characters, for <mark> in reports)
    n_chars: int       # shared characters (letters/digits) of the longest common window
    start: int         # span = caption[start:end]
    end: int
    n_words: int = 1   # detections joined into `text`
    block: bool = False  # the run spans several lines of a block (block_runs), not one line
    # the detections of the matched run, in reading order, and those of them whose characters the common
    # window covers (matched_detections: what masking covers); the objects given to caption_match
    run: tuple = field(default=(), compare=False, repr=False)
    window: tuple = field(default=(), compare=False, repr=False)


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


def confident_runs(detections: Sequence, min_conf: float) -> list[list]:
    """The candidate texts of the rule: per line (detections sharing a line id >= 0, in reading order by
    box x0; a detection without a line is a line of its own), each maximal run of consecutive words
    whose every confidence is >= min_conf. A window inside a run therefore has only confident words,
    and a single confident word is a run (or part of one) too."""
    lines: dict[int, list] = defaultdict(list)
    alone = []
    for d in detections:
        line = d[3] if len(d) > 3 and d[3] is not None else -1
        (lines[line] if line >= 0 else alone).append(d)
    runs = []
    for words in [sorted(ws, key=lambda d: d[2][0] if d[2] is not None else 0.0) for ws in lines.values()] + \
            [[d] for d in alone]:
        run: list = []
        for d in [*words, None]:
            if d is not None and d[0] and d[1] >= min_conf:
                run.append(d)
            elif run:
                runs.append(run)
                run = []
    return runs


def caption_match(detections: Sequence, caption: str | None,
                  min_conf: float = 0.8, min_chars: int = 5, blocks: bool = True) -> TextMatch | None:
    """The DiHT text-spotting rule on lines and blocks: the best run of consecutive confident words (each
    word's conf >= min_conf) of one line (confident_runs) or, with `blocks`, of one block of stacked lines
    read top to bottom (block_runs: "DONT / TAX / ME / BRO!" on a placard), sharing a window of >=
    min_chars normalised characters with the caption, or None (keep the pair). Detections are Detection
    tuples or (text, conf) pairs (lines of their own: the word-level rule; no box, no block). Best = most
    shared characters, then highest (lowest-word) confidence; a line run before a block run on a tie."""
    if not caption or min_chars < 1:
        return None
    norm_caption, origin = normalise(caption)
    best: TextMatch | None = None
    candidates = [(run, False) for run in confident_runs(detections, min_conf)]
    if blocks:
        candidates += [(run, True) for run in block_runs(detections, min_conf)]
    for run, is_block in candidates:
        text = " ".join(d[0] for d in run)
        conf = min(float(d[1]) for d in run)
        norm_text = normalise(text)[0]
        n_chars, start = _longest_common_window(norm_text, norm_caption, min_chars)
        if n_chars < min_chars:
            continue
        if best is None or (n_chars, conf) > (best.n_chars, best.conf):
            lo, hi = origin[start], origin[start + n_chars - 1] + 1
            best = TextMatch(text, conf, caption[lo:hi], n_chars, lo, hi, len(run), is_block, tuple(run),
                             _window_words(run, norm_text.find(norm_caption[start:start + n_chars]), n_chars))
    return best


def _window_words(run: list, at: int, n_chars: int) -> tuple:
    """The words of `run` whose normalised characters overlap [at, at + n_chars) of the run's normalised text."""
    out, pos = [], 0
    for d in run:
        n = len(normalise(d[0])[0])
        if n and pos < at + n_chars and pos + n > at:
            out.append(d)
        pos += n
    return tuple(out)


def matched_detections(detections: Sequence, caption: str | None, min_conf: float = 0.8, min_chars: int = 5,
                       blocks: bool = True) -> list:
    """The detections caption_match's best match is made of: the words whose characters the common window
    covers (on one line, or across the lines of a block), in reading order; [] when the rule finds none.
    The same objects as in `detections` (what pipeline.filter.mask covers)."""
    match = caption_match(detections, caption, min_conf, min_chars, blocks)
    return list(match.window) if match else []


def block_runs(detections: Sequence, min_conf: float, line_gap: float = 0.5, min_overlap: float = 0.5,
               max_height_ratio: float = 1.5) -> list[list]:
    """Runs of consecutive confident words across the lines of a block (assign_blocks), read line by line
    top to bottom, each line left to right: the candidate texts of the rule for quotes set on several
    lines ("DONT / TAX / ME / BRO!"). Only runs that span >= 2 lines are returned (one-line runs are
    confident_runs'). A word below min_conf ends a run, as on a line."""
    lines = _line_words(detections)
    runs = []
    for block in assign_blocks([_line_box(ws) for ws in lines], line_gap, min_overlap, max_height_ratio):
        if len(block) < 2:
            continue
        run: list = []
        spans: set = set()
        for d, line in [*((d, k) for k in block for d in lines[k]), (None, -1)]:
            if d is not None and d[0] and d[1] >= min_conf:
                run.append(d)
                spans.add(line)
            else:
                if len(spans) > 1:
                    runs.append(run)
                run, spans = [], set()
    return runs


def _line_words(detections: Sequence) -> list[list]:
    """Detections with a box and a line id >= 0, grouped by line id (first-seen order), each line in
    reading order (box x0): the lines blocks are made of."""
    lines: dict[int, list] = {}
    for d in detections:
        line = d[3] if len(d) > 3 and d[3] is not None else -1
        if line >= 0 and d[2] is not None:
            lines.setdefault(line, []).append(d)
    return [sorted(ws, key=lambda d: d[2][0]) for ws in lines.values()]


def _line_box(words: list) -> tuple[float, float, float, float, float]:
    """(x0, y0, x1, y1, height) of a line: its words' union box and their median height."""
    boxes = [d[2] for d in words]
    heights = sorted(b[3] - b[1] for b in boxes)
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
            max(b[3] for b in boxes), heights[len(heights) // 2])


def assign_blocks(lines: Sequence[tuple], line_gap: float = 0.5, min_overlap: float = 0.5,
                  max_height_ratio: float = 1.5) -> list[list[int]]:
    """Blocks of stacked lines, as lists of line indices in reading order (top to bottom, then left to right).
    lines: (x0, y0, x1, y1, height) each. Line b follows line a in a block when b lies below a (centres apart
    by >= half the smaller height), the vertical gap between them is < line_gap x the larger height, their
    heights differ by < max_height_ratio x, and they overlap horizontally by >= min_overlap of the narrower
    line's width (stacked lines of a sign, a placard, a poster). Transitive; every line is in one block."""
    def stacked(i: int, j: int) -> bool:
        ax0, ay0, ax1, ay1, ah = lines[i]
        bx0, by0, bx1, by1, bh = lines[j]
        if min(ah, bh) <= 0 or max(ah, bh) >= max_height_ratio * min(ah, bh):
            return False
        if abs((ay0 + ay1) - (by0 + by1)) / 2 < min(ah, bh) / 2:
            return False   # side by side, not stacked
        gap = max(by0 - ay1, ay0 - by1)
        overlap = min(ax1, bx1) - max(ax0, bx0)
        return gap < line_gap * max(ah, bh) and overlap >= min_overlap * min(ax1 - ax0, bx1 - bx0)

    roots = _connected(len(lines), stacked)
    blocks: dict[int, list[int]] = {}
    for i, r in enumerate(roots):
        blocks.setdefault(r, []).append(i)
    return [sorted(b, key=lambda k: (lines[k][1] + lines[k][3], lines[k][0])) for b in
            sorted(blocks.values(), key=lambda b: min(b))]


def _connected(n: int, joined) -> list[int]:
    """Union-find over n items: joined(i, j) for i < j links two; per item, its group's root (transitive)."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if joined(i, j):
                parent[root(j)] = root(i)
    return [root(i) for i in range(n)]


def assign_lines(boxes: Sequence[tuple], line_gap: float = 1.0) -> list[int]:
    """Line ids for word boxes (x0, y0, x1, y1), the way easyocr's readtext merges words into lines:
    two boxes share a line when their vertical centres differ by < half the smaller height, their
    heights by < 2x, and the horizontal gap between them is < line_gap x the larger height (about one
    character). Transitive (a line is a chain of such neighbours); ids number lines by their first box."""
    def same_line(i: int, j: int) -> bool:
        x0, y0, x1, y1 = boxes[i]
        u0, v0, u1, v1 = boxes[j]
        hi, hj = y1 - y0, v1 - v0
        if min(hi, hj) <= 0 or max(hi, hj) > 2 * min(hi, hj) or abs((y0 + y1) / 2 - (v0 + v1) / 2) >= min(hi, hj) / 2:
            return False
        gap = max(u0 - x1, x0 - u1)   # < 0 when they overlap horizontally
        return gap < line_gap * max(hi, hj) and gap > -0.5 * min(x1 - x0, u1 - u0)

    ids: dict[int, int] = {}
    return [ids.setdefault(r, len(ids)) for r in _connected(len(boxes), same_line)]


# ---------------------------------------------------------------- parameters
ENGINES = ("easyocr", "ppocr")
# per engine, the detector canvas's long side (min, max), from the recall/CPU curve on the labelled real-text
# set at 256 px (bench/results/textspot.json "policy"; docs/text-spotting.md). ppocr, recall / CPU s per image:
# 160 px (the old policy) 0.27 / 0.01, 256: 0.62 / 0.04, 320: 0.77 / 0.06, 384: 0.81 / 0.07, 448: 0.83 / 0.08,
# 512: 0.91 / 0.10, 640: 0.87 / 0.15 - recall first, so 512. easyocr: 160: 0.19 / 0.12, 256: 0.21 / 0.30,
# 384: 0.27 / 0.66, 512: 0.26 / 1.18 (its recogniser misreads small real text): 384
ENGINE_CANVAS = {"easyocr": (384, 640), "ppocr": (512, 640)}

@dataclass(frozen=True)
class TextSpotParams:
    min_conf: float = 0.8         # DiHT: only confident detections count
    min_chars: int = 5            # DiHT: >= 5 shared characters; shorter overlaps are common words by chance
    match_blocks: bool = True     # the rule also on blocks of stacked lines ("DONT / TAX / ME" on a placard);
                                  #   recorded, so re-deciding an output written before blocks existed does not
                                  #   apply them (ImageStageParams.from_dict: False when a manifest lacks it)
    engine: str = "ppocr"         # easyocr (CRAFT + english_g2, torch) | ppocr (PP-OCRv4 det + rec, ONNX Runtime;
                                  #   pipeline.filter.ppocr). Default: the benchmark's pick (ENGINES, docs/text-spotting.md)
    canvas_min: int | None = None # detection-scale policy: the detector's canvas long side is the image's long
    canvas_size: int | None = None #  side clamped to [canvas_min, canvas_size] (small images upscaled, large ones
                                  #   capped); None = the engine's measured default (ENGINE_CANVAS). Real text at
                                  #   the download stage's 256 px is 6-12 px high: shrunk to 160 px (the old
                                  #   "never upscale x0.625") CRAFT missed 5 of 8 signs (bench/results/textspot.json)
    batch_size: int = 16          # canvases per CRAFT forward: little gain on CPU, the big one on GPU
    text_threshold: float = 0.7   # easyocr's defaults for the CRAFT heat maps: the weights were tuned
    low_text: float = 0.4         #   with them
    link_threshold: float = 0.4
    min_box_side: int = 8         # canvas px; easyocr drops boxes < 20 px at 640 (~10 px on our canvas)
    min_char_aspect: float = 0.25 # a character is >= ~0.25 box heights wide ('i', 'l'): boxes narrower
                                  #   than min_chars * this * height cannot hold a match; not recognised
    merge_gap: float = 0.1        # join CRAFT boxes closer than this x box height: word-level detections, each with
                                  #   its own confidence (easyocr's 0.5 joins a line into one detection whose
                                  #   confidence, a product over its characters, falls below 0.8 even when read
                                  #   exactly); lines are formed afterwards (assign_lines) for the rule
    line_gap: float = 1.0         # words share a line across gaps < this x their height (about one character)
    box_margin: float = 0.1       # easyocr's add_margin (box height fraction added around each box)
    reread_margins: tuple = (0.1, 0.2)  # a box read with confidence < min_conf is read again from crops this
                                  #   much larger (x box height; its best reading is kept, as easyocr's own
                                  #   contrast re-read does): box edges from a 320 px canvas are off by up to a
                                  #   heat-map cell (several original px), clipping or adding a letter stroke.
                                  #   Labelled set recall at 0.8: 0.84 -> 0.88 (0.1) -> 0.92 (0.1, 0.2), P 1.0
    max_boxes: int = 48           # bounds the recogniser's cost on dense text (pages); largest boxes first
    recog_batch_size: int = 32    # crops per recogniser forward (CPU too: one call per crop costs ~2x more)
    cpu_bf16: bool | None = None  # on CPU, CRAFT in bfloat16: ~2x less CPU time where the CPU has bf16 units
                                  #   (None = auto: avx512_bf16 or amx_bf16 in /proc/cpuinfo; emulated bf16 is
                                  #   slower than fp32). Labelled set recall 0.92 -> 0.96 (heat maps differ
                                  #   slightly: "MIRROR" read). The recogniser stays fp32: in bf16 its
                                  #   confidences drop ("colorful" 0.80 -> 0.70). GPU: fp32

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        for name in ("canvas_min", "canvas_size"):
            v = getattr(self, name)
            if v is not None and (v % 32 or v < 64):
                raise ValueError(f"{name} must be a multiple of 32 and >= 64, got {v}")
        if self.batch_size < 1 or self.recog_batch_size < 1 or self.min_chars < 1 or not 0 <= self.min_conf <= 1:
            raise ValueError(f"invalid text-spot parameters: {self}")
        if any(m < 0 for m in self.reread_margins):
            raise ValueError(f"reread_margins must be >= 0, got {self.reread_margins}")

    def canvas_bounds(self) -> tuple[int, int]:
        """(min, max) of the detector canvas's long side: the fields, or the engine's measured defaults."""
        lo, hi = ENGINE_CANVAS[self.engine]
        hi = self.canvas_size if self.canvas_size is not None else hi
        lo = min(self.canvas_min if self.canvas_min is not None else lo, hi)
        return lo, hi

    def canvas_scale(self, h: int, w: int) -> float:
        """Resize factor from an h x w image to its detector canvas (upscale below min, cap above max)."""
        lo, hi = self.canvas_bounds()
        long_side = max(h, w)
        return min(hi, max(lo, long_side)) / long_side


# ---------------------------------------------------------------- easyocr reader (one per process)
_READERS: dict = {}


def default_model_dir() -> str:
    import easyocr_en_models  # PyPI wheel with craft_mlt_25k.pth + english_g2.pth: nothing is downloaded
    return easyocr_en_models.model_dir()


def get_reader(gpu: bool | str | None, model_dir: str | None = None):
    """The process's easyocr.Reader for (device, model_dir); built once per device, offline.
    gpu: a torch device string, or True / False / None as TextSpotter takes it."""
    import torch
    device = _spot_device(gpu)
    model_dir = model_dir or default_model_dir()
    key = (device, model_dir)
    if key not in _READERS:
        # easyocr creates folders under EASYOCR_MODULE_PATH (default ~/.EasyOCR, maybe read-only on a cluster)
        os.environ.setdefault("EASYOCR_MODULE_PATH", os.path.join(tempfile.gettempdir(), "catcurate-easyocr"))
        import easyocr
        reader = easyocr.Reader(["en"], gpu=False if device == "cpu" else device, model_storage_directory=model_dir,
                                download_enabled=False, verbose=False)
        # easyocr wraps its GPU models in DataParallel over every visible GPU, which scatters batches onto
        # GPUs other tasks own and fails outright on any device but cuda:0: a task uses its one GPU
        for name in ("detector", "recognizer"):
            if isinstance(getattr(reader, name), torch.nn.DataParallel):
                setattr(reader, name, getattr(reader, name).module)
        _READERS[key] = reader
    return _READERS[key]


def _spot_device(gpu: bool | str | None) -> str:
    """TextSpotter's gpu argument as a device string: None = pipeline.media.devices.select_device() (the Spark
    task's GPU, else CUDA when present, else CPU), True = a GPU (the task's on a cluster), False = CPU."""
    from pipeline.media.devices import select_device
    if gpu is False:
        return "cpu"
    return select_device("cuda" if gpu is True else gpu)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (else bf16 convolutions are emulated: slower than fp32)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------- the spotter
RECOG_HEIGHT = 64  # english_g2's input height (easyocr's imgH)


class TextSpotter:
    """Batched easyocr: detection on fixed-size canvases, batched recognition of plausible boxes.

    TextSpotter(gpu=None, params=None, model_dir=None, **overrides): gpu=None means
    pipeline.media.devices.select_device() (the Spark task's GPU, else CUDA when present, else CPU); True a
    GPU, False the CPU, or a torch device string ("cuda:1"); overrides replace TextSpotParams fields
    (e.g. canvas_size=256)."""

    def __init__(self, gpu: bool | str | None = None, params: TextSpotParams | None = None,
                 model_dir: str | None = None, **overrides):
        import torch
        self.params = dataclasses.replace(params or TextSpotParams(), engine="easyocr", **overrides)
        self.device = _spot_device(gpu)
        self.gpu = self.device != "cpu"
        self.reader = get_reader(self.device, model_dir)
        bf16 = self.params.cpu_bf16
        self.bf16 = not self.gpu and (cpu_has_bf16() if bf16 is None else bool(bf16))
        self.detector, self.rec_features = self.reader.detector, None
        if not self.gpu:  # NHWC is what oneDNN's CPU convolutions run fastest (~20% less CPU time, fp32 too);
            # private copies: the process's reader (readtext users, the benchmark's naive path) stays as is
            self.detector = copy.deepcopy(self.reader.detector).to(memory_format=torch.channels_last)
            self.rec_features = copy.deepcopy(self.reader.recognizer.FeatureExtraction).to(
                memory_format=torch.channels_last)
        # easyocr's ignore list for 'en' (characters of the model not in the language), as readtext uses it
        character = self.reader.character
        self._ignore_idx = [character.index(c) + 1 for c in set(character) - set(self.reader.lang_char)]
        # CPU seconds (time.process_time: this process, all threads) spent in spot() since creation, for the
        # image stage's per-part timings (bench/bench_filter.py's phase split); two clock reads per call
        self.cpu_seconds = {"detect": 0.0, "recognise": 0.0}

    def spot(self, images: Sequence[np.ndarray], captions: Sequence[str | None] | None = None
             ) -> list[list[Detection]]:
        """Per image (H x W x 3 uint8 RGB), the recognised words: Detection(text, conf, box, line).

        All boxes of all images are read in batched recogniser forwards; boxes read with confidence
        < min_conf are read again from wider crops (reread_margins), the better reading kept. With
        `captions`, an image whose detections already match its caption is not re-read: its drop
        verdict cannot change any more."""
        import cv2
        p = self.params
        clock = time.process_time()
        boxes = self.detect(images)
        detected = time.process_time()
        self.cpu_seconds["detect"] += detected - clock
        greys = [cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2GRAY) if (h or f) else None
                 for im, (h, f, _l) in zip(images, boxes)]
        # one job per box: (image, horizontal box or None, free box or None, line id)
        jobs = [(i, b, None, line) for i, (h, _f, lines) in enumerate(boxes) for b, line in zip(h, lines)] + \
               [(i, None, f, -1) for i, (_h, fs, _l) in enumerate(boxes) for f in fs]
        readings = self._read([self._crop(greys[i], h, f, 0.0) for i, h, f, _l in jobs])

        def as_detections(pairs):
            return [Detection(t, c, _job_box(h, f), line) for (_i, h, f, line), (t, c) in pairs]

        for margin in p.reread_margins:
            settled = set()
            if captions is not None:
                per_image = defaultdict(list)
                for job, r in zip(jobs, readings):
                    per_image[job[0]].append((job, r))
                settled = {i for i, found in per_image.items()
                           if caption_match(as_detections(found), captions[i], p.min_conf, p.min_chars,
                                            p.match_blocks)}
            # free-form (rotated) boxes come from a perspective warp whose edges are not the problem
            redo = [k for k, (i, h, _f, _l) in enumerate(jobs)
                    if h is not None and readings[k][1] < p.min_conf and i not in settled]
            if not redo:
                break
            again = self._read([self._crop(greys[jobs[k][0]], jobs[k][1], None, margin) for k in redo])
            for k, r in zip(redo, again):
                if r[1] > readings[k][1]:
                    readings[k] = r
        results: list[list[Detection]] = [[] for _ in images]
        for job, r in zip(jobs, readings):
            results[job[0]].extend(as_detections([(job, r)]))
        self.cpu_seconds["recognise"] += time.process_time() - detected  # crops, recogniser, re-reads
        return results

    @staticmethod
    def _crop(grey: np.ndarray, box, free, margin: float) -> np.ndarray:
        """The box's crop of the original-resolution grey image, `margin` x box height added on each
        side, resized to the recogniser's height: INTER_AREA when shrinking (easyocr uses bilinear,
        which aliases thin strokes of large overlaid text: recall 0.76 -> 0.84 on the labelled set),
        bicubic when enlarging."""
        import cv2
        if free is not None:
            from easyocr.utils import four_point_transform
            crop = four_point_transform(grey, np.asarray(free, dtype="float32"))
        else:
            x0, x1, y0, y1 = box
            pad = int(round(margin * (y1 - y0)))
            crop = grey[max(0, y0 - pad):min(grey.shape[0], y1 + pad), max(0, x0 - pad):min(grey.shape[1], x1 + pad)]
        h, w = crop.shape[:2]
        if h < 1 or w < 1:
            return np.zeros((RECOG_HEIGHT, 1), np.uint8)
        if h > w:  # vertical text: easyocr reads it as a square-ish crop of the long side (its resize rule)
            size = (RECOG_HEIGHT, max(1, int(RECOG_HEIGHT * h / w)))
        else:
            size = (max(1, int(RECOG_HEIGHT * w / h)), RECOG_HEIGHT)
        interp = cv2.INTER_AREA if size[1] < h else cv2.INTER_CUBIC
        crop = cv2.resize(crop, size, interpolation=interp)
        if crop.shape[0] != RECOG_HEIGHT:  # vertical: easyocr's AlignCollate squashes it to the model height
            crop = cv2.resize(crop, (max(1, round(crop.shape[1] * RECOG_HEIGHT / crop.shape[0])), RECOG_HEIGHT),
                              interpolation=cv2.INTER_AREA)
        return crop

    def _read(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """easyocr's recogniser on many crops at once: crops grouped by padded width (easyocr pads one
        crop to ceil(width / 64) x 64 with its last column; same here, so each crop sees the input it
        would alone), up to recog_batch_size per forward. Greedy CTC decoding and easyocr's confidence
        (custom_mean over the non-blank frames' max probabilities), as readtext's defaults."""
        import torch
        import torch.nn.functional as F
        from easyocr.recognition import custom_mean
        out: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        buckets = defaultdict(list)
        for k, crop in enumerate(crops):
            buckets[math.ceil(crop.shape[1] / RECOG_HEIGHT) * RECOG_HEIGHT].append(k)
        converter, size = self.reader.converter, self.params.recog_batch_size
        for width, members in buckets.items():
            for b in range(0, len(members), size):
                chunk = members[b:b + size]
                x = np.empty((len(chunk), 1, RECOG_HEIGHT, width), np.float32)
                for j, k in enumerate(chunk):
                    w = crops[k].shape[1]
                    x[j, 0, :, :w] = crops[k]
                    x[j, 0, :, w:] = crops[k][:, w - 1:w]  # easyocr's NormalizePAD border padding
                x = torch.from_numpy(x).div_(127.5).sub_(1.0).to(self.device)  # (x / 255 - 0.5) / 0.5
                with torch.inference_mode():
                    prob = F.softmax(self._recognise(x), dim=2).float().cpu().numpy()
                if self._ignore_idx:
                    prob[:, :, self._ignore_idx] = 0.0
                    prob /= prob.sum(axis=2, keepdims=True)
                for j, k in enumerate(chunk):
                    index = prob[j].argmax(axis=1)
                    text = converter.decode_greedy(index, [len(index)])[0]
                    maxima = prob[j].max(axis=1)[index != 0]
                    out[k] = (str(text), float(custom_mean(maxima)) if len(maxima) else 0.0)
        return out

    def _recognise(self, x):
        """english_g2's forward (easyocr.model.vgg_model.Model); on CPU its VGG features run from the
        channels_last copy (~1.5x faster), the int8 BiLSTM and classifier as easyocr quantised them."""
        import torch
        if self.rec_features is None:
            return self.reader.recognizer(x, None)
        model = self.reader.recognizer
        features = self.rec_features(x.contiguous(memory_format=torch.channels_last))
        features = model.AdaptiveAvgPool(features.permute(0, 3, 1, 2)).squeeze(3)
        return model.Prediction(model.SequenceModeling(features).contiguous())

    def detect(self, images: Sequence[np.ndarray]) -> list[tuple[list, list, list]]:
        """Per image, easyocr's (horizontal boxes [x0, x1, y0, y1], free-form boxes, each horizontal box's
        line id) in original pixel coordinates."""
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
            scale = p.canvas_scale(h, w)   # the detection-scale policy: small images upscaled, large ones capped
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            # INTER_AREA when shrinking keeps thin strokes that INTER_LINEAR would alias away
            resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            shape = (math.ceil(nh / 32) * 32, math.ceil(nw / 32) * 32)  # CRAFT's U-net needs /32 sizes
            canvas = np.zeros((*shape, 3), np.uint8)
            canvas[:nh, :nw] = resized
            canvases[i], scales[i] = canvas, scale
            buckets[shape].append(i)  # same-shape canvases share a forward pass (4:3, 3:4, 1:1, ...)
        out: list[tuple[list, list, list]] = [([], [], []) for _ in images]
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
        if not self.gpu:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            y, _features = self.detector(x)
        return y.float().cpu().numpy()  # N x H/2 x W/2 x (text score, link score)

    def _boxes(self, heat: np.ndarray, scale: float) -> tuple[list, list, list]:
        from easyocr.craft_utils import getDetBoxes
        from easyocr.utils import group_text_box
        p = self.params
        boxes, _polys, _ = getDetBoxes(heat[:, :, 0], heat[:, :, 1], p.text_threshold, p.link_threshold, p.low_text)
        if len(boxes) == 0:
            return [], [], []
        to_original = 2.0 / scale  # heat maps are at half the canvas resolution
        polys = [(np.asarray(box) * to_original).astype(np.int32).reshape(-1) for box in boxes]
        # easyocr's grouping (slope, centre, height thresholds: its readtext defaults); words, lines below
        horizontal, free = group_text_box(polys, 0.1, 0.5, 0.5, p.merge_gap, p.box_margin, True)
        min_side = p.min_box_side / scale
        horizontal = [b for b in horizontal if max(b[1] - b[0], b[3] - b[2]) >= min_side]
        horizontal, lines = keep_readable(horizontal, [_job_box(b, None) for b in horizontal], p)
        free = [f for f in free if max(np.ptp([c[0] for c in f]), np.ptp([c[1] for c in f])) >= min_side]
        # largest first: overlaid titles and captions are the big text, so an early match comes sooner
        order = sorted(range(len(horizontal)), key=lambda k: -(horizontal[k][1] - horizontal[k][0]) *
                       (horizontal[k][3] - horizontal[k][2]))[:p.max_boxes]
        free = free[:max(0, p.max_boxes - len(order))]
        return [horizontal[k] for k in order], free, [lines[k] for k in order]


def _job_box(h, f) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) of an easyocr horizontal box [x0, x1, y0, y1] or free-form box (4 points)."""
    if h is not None:
        return (float(h[0]), float(h[2]), float(h[1]), float(h[3]))
    if f is not None:
        xs, ys = [float(c[0]) for c in f], [float(c[1]) for c in f]
        return (min(xs), min(ys), max(xs), max(ys))
    return None


def keep_readable(items: list, boxes: list[tuple], p: TextSpotParams,
                  extents: list[tuple[float, float]] | None = None) -> tuple[list, list[int]]:
    """The items whose box can take part in a match, with their line ids (assign_lines over all boxes):
    a box on a line with others is kept whatever its width (short words of a quoted phrase: "ON TOP OF
    A"); a box alone on its line must be wide enough for min_chars characters (min_char_aspect x height
    each), else it is not recognised at all. extents: each box's (length, height) along its own reading
    direction where boxes are rotated (default: the axis-aligned width and height)."""
    lines = assign_lines(boxes, p.line_gap)
    count = defaultdict(int)
    for line in lines:
        count[line] += 1
    min_aspect = p.min_chars * p.min_char_aspect
    extents = extents or [(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes]
    keep = [k for k, (length, height) in enumerate(extents) if count[lines[k]] > 1 or length >= min_aspect * height]
    return [items[k] for k in keep], [lines[k] for k in keep]


# ---------------------------------------------------------------- what the Spark job calls
@dataclass(frozen=True)
class TextSpotResult:
    detections: list[Detection]           # every word read (text, conf, box, line; largest box first)
    match: TextMatch | None               # not None -> drop the pair (reason text_spotted)

    @property
    def drop(self) -> bool:
        return self.match is not None
