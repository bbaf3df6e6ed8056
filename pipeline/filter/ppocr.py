"""PP-OCRv4 text spotting on ONNX Runtime: the second engine behind the text-spot stage's interface.

    from pipeline.filter.ppocr import PPOCRSpotter
    spotter = PPOCRSpotter(params=TextSpotParams(engine="ppocr"))   # or spotting.get_spotter(params)
    spotter.spot([rgb_array, ...])       # per image: [Detection(text, conf, box, line), ...], as TextSpotter

The models are the ONNX files inside the installed `rapidocr-onnxruntime` wheel (PP-OCRv4 detector,
4.7 MB; PP-OCRv4 recogniser, 10.9 MB, with its character list in the model's metadata): nothing is
downloaded. Execution providers: CUDA where the task has a GPU and onnxruntime-gpu is installed,
else the CPU (one intra-op thread per Spark task, CATCURATE_TASK_THREADS). One session per model,
device and thread count per Python worker (module cache), as easyocr's reader.

What runs, and how it differs from RapidOCR's own pipeline (`RapidOCR()(image)`):
  * detection (DB) on canvases sized by the same detection-scale policy as the easyocr engine
    (TextSpotParams.canvas_scale: the long side clamped to the engine's [min, max]; RapidOCR's default
    upscales the short side to 736), of the image without img2dataset's black border (_content: a 4:3
    photo in its 256 x 256 square is detected on a 512 x 384 canvas, not 512 x 512); one canvas per
    forward on CPU (batching costs ~1.5x more per canvas there), same-shape canvases stacked on GPU;
    the DB post-processing is RapidOCR's (thresh 0.3, box 0.5, unclip 1.6, dilation), on the canvas's
    unpadded region, boxes mapped to the original pixels (box threshold 0.3 / thresh 0.2 / unclip 2.0
    measured: no better on the real-text set);
  * no 180-degree direction classifier (upside-down text is rare on the web photos the filter sees);
  * boxes too narrow for min_chars characters are not read unless they share a line with others
    (textspot.keep_readable, as the easyocr engine);
  * recognition (SVTR-LCNet, 48 px high, BGR, (x/255 - 0.5)/0.5) in batches grouped by each crop's own
    padded width (>= REC_MIN_WIDTH = 128 px; PaddleOCR pads to 320, 2.5x the compute for a short word),
    so a crop's input never depends on the other crops of its batch (readings are the same whatever
    else shares the part: redecide's invariance);
  * crops with a word read below min_conf are read again from a crop widened by 0.15 x its height, then
    stretched 1.25x horizontally (REREADS), the reading with the more confident weakest word kept;
  * greedy CTC decoding; a detected line is split at recognised spaces into words, each with the mean
    of its characters' probabilities as confidence (PP-OCR's line score is the same mean over the line)
    and a box from its characters' frame positions; lines are then formed across detected boxes
    (textspot.assign_lines), so the caption rule sees the same evidence from both engines.
"""
from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from typing import Sequence

import numpy as np

from pipeline.filter.textspot import Detection, TextSpotParams, _spot_device, keep_readable

# recogniser input: 48 px high, padded to >= REC_MIN_WIDTH (then to a multiple of 64). PaddleOCR pads to 320;
# most crops here are short words, and a 320-px input costs ~2.5x a 128-px one (0.020 vs 0.008 CPU s):
# real text at 256 px (line rule, no re-reads) recall 0.859 (320), 0.872 (128), 0.872 (64); 128 vs 320: the
# readings differ in 52 of 171 images (mostly words split or merged, confidences +-0.01), one verdict (a gain)
REC_HEIGHT, REC_MIN_WIDTH = 48, 128
# crops with a word read below min_conf are read again, each variant in turn while still weak, and the
# reading whose weakest word is more confident is kept: (margin x height added on every side, horizontal
# stretch). Box edges from the DB map clip letters ("IGHT" 0.49 -> "NIGHT" 0.82) and narrow glyphs merge
# ("BrngtonHove" 0.79 -> "Brighton" 0.85 stretched). Real text at 256 px: recall 0.872 -> 0.897 (line rule),
# +0.016 CPU s/image; chosen looking at that set's misses (margins 0.1 and 0.2 instead of 0.15: +0)
REREADS: tuple = ((0.15, 1.0), (0.0, 1.25))
BORDER_LEVEL = 16   # img2dataset's black border: rows / columns with no pixel above this are not detected on
_SESSIONS: dict = {}


def model_dir() -> str:
    import rapidocr_onnxruntime  # PyPI wheel carrying the PP-OCRv4 ONNX models: nothing is downloaded
    return os.path.join(os.path.dirname(rapidocr_onnxruntime.__file__), "models")


def _providers(device: str) -> list:
    import onnxruntime as ort
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def get_session(name: str, device: str, threads: int):
    """The process's ONNX Runtime session for a model file of the wheel on `device` (cached)."""
    key = (name, device, threads)
    if key not in _SESSIONS:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        _SESSIONS[key] = ort.InferenceSession(os.path.join(model_dir(), name), sess_options=opts,
                                              providers=_providers(device))
    return _SESSIONS[key]


class PPOCRSpotter:
    """PP-OCRv4 detection + recognition with the TextSpotter interface (spot, detect, cpu_seconds, params).

    PPOCRSpotter(gpu=None, params=None, threads=None, **overrides): gpu as TextSpotter's (None = the Spark
    task's device); threads = ONNX Runtime intra-op threads (default CATCURATE_TASK_THREADS or 1)."""

    DET_MODEL, REC_MODEL = "ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx"

    def __init__(self, gpu: bool | str | None = None, params: TextSpotParams | None = None,
                 threads: int | None = None, **overrides):
        import dataclasses
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess
        self.params = dataclasses.replace(params or TextSpotParams(engine="ppocr"), engine="ppocr", **overrides)
        self.device = _spot_device(gpu)
        self.gpu = self.device != "cpu"
        threads = threads or int(os.environ.get("CATCURATE_TASK_THREADS", "1"))
        self.det = get_session(self.DET_MODEL, self.device, threads)
        self.rec = get_session(self.REC_MODEL, self.device, threads)
        self.providers = self.det.get_providers()
        characters = self.rec.get_modelmeta().custom_metadata_map["character"].splitlines()
        self.characters = np.array(["", *characters, " "], dtype=object)  # CTC blank first, space last
        self.post = DBPostProcess(thresh=0.3, box_thresh=0.5, max_candidates=1000, unclip_ratio=1.6,
                                  score_mode="fast", use_dilation=True)  # RapidOCR's defaults
        self.cpu_seconds = {"detect": 0.0, "recognise": 0.0}

    # ------------------------------------------------------------ detection
    def detect(self, images: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Per image, the detected text boxes: 4 x 2 float32 corners (clockwise from top-left), original px."""
        import cv2
        p = self.params
        canvases, sizes, buckets, origins = {}, {}, defaultdict(list), {}
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i}: H x W x 3 uint8 RGB expected, got {image.shape} {image.dtype}")
            h, w = image.shape[:2]
            if min(h, w) < 4:
                continue
            scale = p.canvas_scale(h, w)
            y0, y1, x0, x1 = _content(image)   # without img2dataset's black border: a smaller canvas
            if min(y1 - y0, x1 - x0) < 4:
                continue
            origins[i] = (x0, y0, x1 - x0, y1 - y0)
            nh, nw = max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale))
            resized = cv2.resize(image[y0:y1, x0:x1, ::-1], (nw, nh),   # BGR, as PP-OCR was trained
                                 interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            shape = (math.ceil(nh / 32) * 32, math.ceil(nw / 32) * 32)
            canvas = np.zeros((3, *shape), np.float32)
            canvas[:, :nh, :nw] = (resized.transpose(2, 0, 1).astype(np.float32) - 127.5) / 127.5
            canvases[i], sizes[i] = canvas, (nh, nw)
            buckets[shape].append(i)
        out: list[list[np.ndarray]] = [[] for _ in images]
        name = self.det.get_inputs()[0].name
        # CPU: one canvas per forward (a batch of 16 512-px canvases costs 0.083 CPU s per canvas, one alone
        # 0.054: the batch's activations leave the cache); GPU: batch_size canvases
        size = p.batch_size if self.gpu else 1
        for indices in buckets.values():
            for b in range(0, len(indices), size):
                chunk = indices[b:b + size]
                maps = self.det.run(None, {name: np.stack([canvases[i] for i in chunk])})[0]
                for i, heat in zip(chunk, maps):
                    nh, nw = sizes[i]
                    x0, y0, w, h = origins[i]
                    boxes, _scores = self.post(heat[None, :, :nh, :nw], (h, w))
                    offset = np.array([x0, y0], np.float32)
                    out[i] = [q + offset for q in (_ordered(np.asarray(box, np.float32), w, h) for box in boxes)
                              if q is not None]
        return out

    # ------------------------------------------------------------ recognition
    def spot(self, images: Sequence[np.ndarray], captions: Sequence[str | None] | None = None
             ) -> list[list[Detection]]:
        """Per image, the recognised words: Detection(text, conf, box, line). `captions` is accepted for
        the interface and not used (PP-OCR is read once: there is no re-read to settle)."""
        import cv2
        p = self.params
        clock = time.process_time()
        quads = self.detect(images)
        detected = time.process_time()
        self.cpu_seconds["detect"] += detected - clock
        jobs = []   # (image, quad, line id)
        for i, qs in enumerate(quads):
            bounds = [_bounds(q) for q in qs]
            order = sorted(range(len(qs)), key=lambda k: -(bounds[k][2] - bounds[k][0]) * (bounds[k][3] - bounds[k][1]))
            qs, bounds = [qs[k] for k in order], [bounds[k] for k in order]
            kept, lines = keep_readable(list(range(len(qs))), bounds, p, [_extent(q) for q in qs])
            jobs += [(i, qs[k], line) for k, line in zip(kept[:p.max_boxes], lines[:p.max_boxes])]
        quads_read = [q for _i, q, _l in jobs]
        crops = [_warp(images[i], q) for i, q, _l in jobs]
        readings = self._read(crops)
        for margin, stretch in REREADS:
            redo = [k for k, words in enumerate(readings) if words and _weakest(words) < p.min_conf]
            if not redo:
                break
            wider = [_widen(jobs[k][1], margin, images[jobs[k][0]].shape) if margin else jobs[k][1] for k in redo]
            recrops = [_warp(images[jobs[k][0]], q) for k, q in zip(redo, wider)]
            if stretch != 1.0:
                recrops = [cv2.resize(c, (max(1, round(c.shape[1] * stretch)), c.shape[0])) for c in recrops]
            for k, q, crop, words in zip(redo, wider, recrops, self._read(recrops)):
                if words and _weakest(words) > _weakest(readings[k]):
                    readings[k], quads_read[k], crops[k] = words, q, crop
        results: list[list[Detection]] = [[] for _ in images]
        for (i, _q, line), q, crop, words in zip(jobs, quads_read, crops, readings):
            for text, conf, a, b in words:
                box = _bounds(q) if crop.shape[0] > crop.shape[1] else _sub_box(q, a, b)
                results[i].append(Detection(text, conf, box, line))
        self.cpu_seconds["recognise"] += time.process_time() - detected
        return results

    def _read(self, crops: list[np.ndarray]) -> list[list[tuple[str, float, float, float]]]:
        """Per crop (BGR), its words: (text, mean character probability, start, end as fractions of the
        crop's width)."""
        import cv2
        out: list[list] = [[] for _ in crops]
        buckets = defaultdict(list)
        resized = []
        for k, crop in enumerate(crops):
            h, w = crop.shape[:2]
            rw = max(1, min(int(math.ceil(REC_HEIGHT * w / max(h, 1))), 32 * REC_MIN_WIDTH))
            resized.append(rw)
            buckets[max(REC_MIN_WIDTH, math.ceil(rw / 64) * 64)].append(k)
        name = self.rec.get_inputs()[0].name
        size = self.params.recog_batch_size
        for width, members in buckets.items():
            for b in range(0, len(members), size):
                chunk = members[b:b + size]
                x = np.zeros((len(chunk), 3, REC_HEIGHT, width), np.float32)
                for j, k in enumerate(chunk):
                    if crops[k].size == 0:
                        continue
                    im = cv2.resize(crops[k], (resized[k], REC_HEIGHT))
                    x[j, :, :, :resized[k]] = (im.transpose(2, 0, 1).astype(np.float32) - 127.5) / 127.5
                prob = self.rec.run(None, {name: x})[0]   # N x T x classes (softmax)
                for j, k in enumerate(chunk):
                    out[k] = self._words(prob[j], width / resized[k])
        return out

    def _words(self, prob: np.ndarray, stretch: float) -> list[tuple[str, float, float, float]]:
        """Greedy CTC over one crop's frames, split at spaces: (word, mean char prob, start, end) with
        start/end the word's extent as fractions of the crop's (unpadded) width."""
        index = prob.argmax(axis=1)
        keep = (index != 0) & np.concatenate([[True], index[1:] != index[:-1]])
        frames = np.flatnonzero(keep)
        n = len(index)
        words, current = [], []
        for t in [*frames, None]:
            if t is None or self.characters[index[t]] == " ":
                if current:
                    text = "".join(self.characters[index[f]] for f in current)
                    conf = float(np.mean([prob[f, index[f]] for f in current]))
                    start, end = current[0] / n * stretch, (current[-1] + 1) / n * stretch
                    words.append((text, conf, min(1.0, start), min(1.0, end)))
                current = []
            else:
                current.append(t)
        return words


def _content(image: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the image without its outer rows and columns that are (near) black throughout,
    the border img2dataset's resize adds around a photo of another aspect ratio (black: no pixel above
    BORDER_LEVEL in any channel, JPEG ringing included). A black margin holds no readable text."""
    bright = image.max(axis=2) > BORDER_LEVEL
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    if not len(rows):
        return 0, 0, 0, 0
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _weakest(words: list[tuple]) -> float:
    return min(w[1] for w in words) if words else 0.0


def _widen(q: np.ndarray, margin: float, shape: tuple) -> np.ndarray:
    """Quad q grown by margin x its height on every side along its own axes, clipped to the image."""
    along, across = q[1] - q[0], q[3] - q[0]
    length, height = max(float(np.linalg.norm(along)), 1.0), max(float(np.linalg.norm(across)), 1.0)
    pad = margin * min(length, height) if height >= 1.5 * length else margin * height
    u, v = along / length, across / height
    out = np.array([q[0] - pad * (u + v), q[1] + pad * (u - v), q[2] + pad * (u + v), q[3] - pad * (u - v)],
                   np.float32)
    out[:, 0] = np.clip(out[:, 0], 0, shape[1] - 1)
    out[:, 1] = np.clip(out[:, 1], 0, shape[0] - 1)
    return out


def _ordered(box: np.ndarray, w: int, h: int) -> np.ndarray | None:
    """Corners clockwise from top-left, clipped to the image; None when a side is <= 3 px (RapidOCR's filter)."""
    by_x = box[np.argsort(box[:, 0], kind="stable")]
    (tl, bl), (tr, br) = by_x[:2][np.argsort(by_x[:2, 1], kind="stable")], by_x[2:][np.argsort(by_x[2:, 1], kind="stable")]
    q = np.array([tl, tr, br, bl], np.float32)   # left pair and right pair, each top first (rotated boxes too)
    q[:, 0] = np.clip(q[:, 0], 0, w - 1)
    q[:, 1] = np.clip(q[:, 1], 0, h - 1)
    if np.linalg.norm(q[0] - q[1]) <= 3 or np.linalg.norm(q[0] - q[3]) <= 3:
        return None
    return q


def _extent(q: np.ndarray) -> tuple[float, float]:
    """(length, height) of a quad along its reading direction (vertical text: its long side reads)."""
    w = float(max(np.linalg.norm(q[0] - q[1]), np.linalg.norm(q[3] - q[2])))
    h = float(max(np.linalg.norm(q[0] - q[3]), np.linalg.norm(q[1] - q[2])))
    return (h, w) if h >= 1.5 * w else (w, h)


def _bounds(q: np.ndarray) -> tuple[float, float, float, float]:
    return (float(q[:, 0].min()), float(q[:, 1].min()), float(q[:, 0].max()), float(q[:, 1].max()))


def _sub_box(q: np.ndarray, a: float, b: float) -> tuple[float, float, float, float]:
    """Bounds of the part of quad q between fractions a and b along its reading direction."""
    top = [q[0] + f * (q[1] - q[0]) for f in (a, b)]
    bottom = [q[3] + f * (q[2] - q[3]) for f in (a, b)]
    return _bounds(np.array([*top, *bottom]))


def _warp(image: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The quad's text as an upright BGR crop (perspective warp; tall crops turned to read left to right)."""
    import cv2
    w = int(max(np.linalg.norm(q[0] - q[1]), np.linalg.norm(q[3] - q[2])))
    h = int(max(np.linalg.norm(q[0] - q[3]), np.linalg.norm(q[1] - q[2])))
    if w < 1 or h < 1:
        return np.zeros((REC_HEIGHT, REC_HEIGHT, 3), np.uint8)
    target = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    crop = cv2.warpPerspective(np.ascontiguousarray(image[:, :, ::-1]), cv2.getPerspectiveTransform(q, target),
                               (w, h), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    if h >= 1.5 * w:
        crop = np.rot90(crop)
    return np.ascontiguousarray(crop)
