"""The DiHT caption rule's edges, and the real easyocr TextSpotter on the labelled set (bench/textspot_set.py)."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from pipeline.filter.spotting import spot_and_match
from pipeline.filter.textspot import (Detection, TextSpotParams, TextSpotter, _longest_common_window, assign_blocks,
                                      assign_lines, block_runs, caption_match, keep_readable, matched_detections,
                                      normalise)

# ---------------------------------------------------------------- caption_match: the rule's edges


def test_five_shared_characters_match_four_do_not():
    caption = "a dog running on the beach"
    match = caption_match([("BEACHFRONT", 0.95)], caption)
    assert match is not None and match.n_chars == 5 and match.span == "beach" and match.text == "BEACHFRONT"
    assert caption_match([("BEACXFRONT", 0.95)], caption) is None          # only "beac": 4
    assert caption_match([("beac", 0.99)], caption) is None
    assert caption_match([("beac", 0.99)], caption, min_chars=4).n_chars == 4  # threshold is configurable


def test_confidence_threshold_is_inclusive():
    caption = "a sunset over the golden gate bridge"
    assert caption_match([("GOLDEN GATE", 0.79)], caption) is None
    assert caption_match([("GOLDEN GATE", 0.80)], caption).conf == pytest.approx(0.80)
    assert caption_match([("GOLDEN GATE", 0.79)], caption, min_conf=0.7) is not None


def test_text_present_but_not_in_caption_is_kept():
    assert caption_match([("SALE 50% OFF", 0.99), ("www.shop.com", 0.97)], "a dog running on the beach") is None
    assert caption_match([], "a dog running on the beach") is None
    assert caption_match([("anything goes", 0.99)], "") is None
    assert caption_match([("anything goes", 0.99)], None) is None


def test_normalisation_case_punctuation_spaces_unicode():
    caption = "View of the Golden Gate, San Francisco"
    m = caption_match([("GOLDEN-GATE!!", 0.9)], caption)
    assert m.span == "Golden Gate" and m.n_chars == 10 and caption[m.start:m.end] == m.span
    assert caption_match([("ＧＯＬＤＥＮ", 0.9)], caption).span == "Golden"   # full-width (NFKC)
    assert caption_match([("goldengate", 0.9)], caption).n_chars == 10      # OCR dropped the space
    assert normalise("Straße, Ｎo.5")[0] == "strasseno5"


def test_best_detection_wins():
    caption = "two zebras grazing in a field during the day"
    m = caption_match([("zebra", 0.99), ("grazing in a field", 0.85), ("during", 0.6)], caption)
    assert m.text == "grazing in a field" and m.span == "grazing in a field"


def test_longest_common_window_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        best = max([j - i for i in range(len(a)) for j in range(i + 1, len(a) + 1) if a[i:j] in b] + [0])
        n, start = _longest_common_window(a, b, 3)
        assert n == (best if best >= 3 else 0)
        if n:
            assert b[start:start + n] in a


def test_params_validation():
    with pytest.raises(ValueError, match="multiple of 32"):
        TextSpotParams(canvas_size=300)
    with pytest.raises(ValueError):
        TextSpotParams(batch_size=0)
    with pytest.raises(ValueError, match="canvas_min"):
        TextSpotParams(canvas_min=100)
    with pytest.raises(ValueError, match="engine"):
        TextSpotParams(engine="tesseract")


def test_detection_scale_policy():
    """The canvas's long side is the image's clamped to [canvas_min, canvas_size]: small images are
    upscaled (a 256-px download is not shrunk to 160 px any more), large ones capped."""
    p = TextSpotParams(engine="easyocr", canvas_min=384, canvas_size=640)
    assert p.canvas_scale(256, 256) == pytest.approx(1.5) and p.canvas_scale(224, 168) == pytest.approx(384 / 224)
    assert p.canvas_scale(480, 500) == 1.0 and p.canvas_scale(1024, 768) == pytest.approx(0.625)
    assert TextSpotParams(canvas_size=160).canvas_bounds() == (160, 160)   # an explicit cap wins over the minimum
    for engine in ("easyocr", "ppocr"):
        lo, hi = TextSpotParams(engine=engine).canvas_bounds()
        assert lo >= 256 and hi >= lo   # the measured defaults never shrink the download stage's 256 px


# ---------------------------------------------------------------- TextSpotter with the real weights

@pytest.fixture(scope="module")
def spotter():
    return TextSpotter(gpu=False)


def _rendered(text: str, size=(480, 200)) -> np.ndarray:
    import matplotlib
    from pathlib import Path
    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans-Bold.ttf"), 40)
    img = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(img).text((20, 70), text, font=font, fill=(0, 0, 0))
    return np.asarray(img)


def test_spot_reads_text_and_skips_blank_images(spotter):
    blank = np.full((300, 400, 3), 128, np.uint8)
    tiny = np.zeros((1, 1, 3), np.uint8)
    found = spotter.spot([_rendered("HELLO WORLD"), blank, tiny])
    assert found[1] == [] and found[2] == []
    words = " ".join(d.text for d in found[0]).lower()  # word-level detections (merge_gap), on one line
    assert len(found[0]) >= 2 and len({d.line for d in found[0]}) == 1, found[0]
    assert all(0 <= d.box[0] < d.box[2] <= 480 and 0 <= d.box[1] < d.box[3] <= 200 for d in found[0])
    assert "hello" in words and "world" in words, found[0]
    with pytest.raises(ValueError, match="uint8 RGB"):
        spotter.spot([np.zeros((10, 10), np.uint8)])


def test_spot_and_match_verdicts(spotter):
    # the wiring, with a lower confidence gate so it does not hinge on one word's confidence
    params = dataclasses.replace(spotter.params, min_conf=0.5)
    image = _rendered("Sunflowers")
    results = spot_and_match([image, image], ["a field of sunflowers at dawn", "a dog on a beach"],
                             params=params, spotter=spotter)
    assert results[0].drop and results[0].match.span == "sunflowers", results[0]
    assert not results[1].drop and results[1].detections  # text found, but not the caption's
    with pytest.raises(ValueError, match="captions"):
        spot_and_match([image], [], spotter=spotter)


def _quality(results, items, min_conf):
    drops = [caption_match(r.detections, i.caption, min_conf=min_conf) is not None for r, i in zip(results, items)]
    tp = sum(d and i.drop for d, i in zip(drops, items))
    fp = sum(d and not i.drop for d, i in zip(drops, items))
    fn = sum(i.drop and not d for d, i in zip(drops, items))
    return tp / max(1, tp + fp), tp / max(1, tp + fn)


def test_labelled_set_precision_and_recall(spotter):
    """Issue 3's target on the labelled set (60 pairs, 25 to drop), the easyocr engine (canvas capped at
    320 px), the paper's min_conf 0.8: precision >= 0.95 and recall >= 0.9. Measured: P 1.0, R 0.96 with bf16 CRAFT (CPUs
    with bf16 units) / 0.92 with fp32 CRAFT; the misses are misreads of coarse boxes ("bbed" for "bed",
    "MRROR"). CPU cost: ~0.5 s per image (~30-45 s here on 2 cores)."""
    from bench.textspot_set import build_set
    items = build_set()
    assert len(items) >= 40 and 0.3 < sum(i.drop for i in items) / len(items) < 0.6
    assert {i.kind for i in items} == {"caption_text", "clean", "other_text", "natural"}
    # web-size images (400-1024 px) with >= 20-px overlay titles: a 320-px detector canvas reads them, the
    # default 640-px cap would cost ~4x the CRAFT time here for the same verdicts
    web = TextSpotter(gpu=False, params=dataclasses.replace(spotter.params, canvas_size=320))
    results = spot_and_match([i.image for i in items], [i.caption for i in items], spotter=web)
    assert [r.drop for r in results] == [caption_match(r.detections, i.caption) is not None
                                        for r, i in zip(results, items)]
    misses = [(i.name, i.text, r.detections[:3]) for r, i in zip(results, items) if r.drop != i.drop]
    precision, recall = _quality(results, items, min_conf=0.8)
    assert precision >= 0.95 and recall >= 0.9, (precision, recall, misses)
    assert not any(r.drop for r, i in zip(results, items) if i.kind == "clean")


def test_reread_keeps_the_more_confident_reading(spotter):
    """Boxes read below min_conf are read again from wider crops; a re-read never lowers a confidence
    and, without captions, every box is reported (no early settling)."""
    image = _rendered("Sunflowers and tulips")
    once = TextSpotter(gpu=False, params=dataclasses.replace(spotter.params, reread_margins=())).spot([image])[0]
    again = spotter.spot([image])[0]
    assert len(once) == len(again) >= 1
    assert all(b.conf >= a.conf - 1e-6 for a, b in zip(once, again)), (once, again)


def test_operating_point_flickr_set(spotter):
    """The download stage's images (img2dataset: 256 px, border, JPEG q95) of real Flickr8k photos: the set
    is labelled by construction, and the spotter (CRAFT at 160 px for 256-px images) drops the pairs
    showing their caption's words, keeps the clean ones, and reports every detection (not only matches)."""
    from bench.textspot_set import build_flickr_set
    items = build_flickr_set(256, n_caption_text=4, n_clean=3, n_other_text=2)
    assert [i.image.shape for i in items] == [(256, 256, 3)] * 9
    assert [i.kind for i in items].count("caption_text") == 4 and sum(i.drop for i in items) == 4
    results = spot_and_match([i.image for i in items], [i.caption for i in items], spotter=spotter)
    drops = [r.drop for r in results]
    assert sum(d and i.drop for d, i in zip(drops, items)) >= 3, [(i.text, r.detections) for r, i in zip(results, items)]
    assert not any(d and not i.drop for d, i in zip(drops, items))
    other = [r for r, i in zip(results, items) if i.kind == "other_text"]
    assert any(r.detections and not r.drop for r in other)   # text read, kept, still reported


# ---------------------------------------------------------------- lines: the rule on words of one line

def _line(words, y=10, h=20, conf=0.95, line=0):
    """Words laid out left to right on one baseline (10 px per character, 10 px gaps)."""
    out, x = [], 0
    for w in words:
        c = conf[len(out)] if isinstance(conf, list) else conf
        out.append(Detection(w, c, (x, y, x + 10 * len(w), y + h), line))
        x += 10 * len(w) + 10
    return out


def test_short_words_match_on_their_line():
    """A quoted phrase of short words ("ON TOP OF A") never gives 5 characters word by word, but does
    as a line; every word of the matched window must be confident, each keeps its own confidence."""
    caption = "a cat sitting on top of a car"
    words = _line(["ON", "TOP", "OF", "A"], conf=[0.9, 0.95, 0.85, 0.99])
    assert caption_match([(d.text, d.conf) for d in words], caption) is None   # the word-level rule
    m = caption_match(words, caption)
    assert m.text == "ON TOP OF A" and m.span == "on top of a" and m.n_chars == 8 and m.n_words == 4
    assert m.conf == pytest.approx(0.85)                                       # the weakest word of the run
    weak = _line(["ON", "TOP", "OF", "A"], conf=[0.9, 0.5, 0.85, 0.99])        # "TOP" below 0.8 breaks the run
    assert caption_match(weak, caption) is None
    assert caption_match(weak, caption, min_conf=0.5).n_chars == 8
    shuffled = [words[2], words[0], words[3], words[1]]                       # reading order comes from the boxes
    assert caption_match(shuffled, caption).text == "ON TOP OF A"
    apart = [d._replace(line=k) for k, d in enumerate(words)]                  # four lines: no match
    assert caption_match(apart, caption) is None


def test_runs_split_at_weak_words_but_keep_strong_windows():
    caption = "children playing football on the beach"
    words = _line(["FOOTBALL", "xq", "BEACH"], conf=[0.9, 0.3, 0.95])
    m = caption_match(words, caption)
    assert m.text == "FOOTBALL" and m.n_chars == 8   # FOOTBALL alone is a run of its own


def test_assign_lines_geometry():
    boxes = [(0, 0, 40, 20), (50, 1, 90, 21), (95, 0, 130, 20),   # a line: gaps <= one height
             (200, 0, 240, 20),                                    # same baseline, 70 px away: another line
             (0, 40, 40, 60),                                      # the next text line down
             (45, 5, 60, 60)]                                      # overlapping but 2.75x taller: not the line
    lines = assign_lines(boxes)
    assert lines[0] == lines[1] == lines[2]
    assert len({lines[0], lines[3], lines[4], lines[5]}) == 4
    assert assign_lines(boxes, line_gap=4.0)[3] == lines[0]       # a wider gap joins it
    assert assign_lines([]) == []


def test_short_boxes_are_read_when_they_share_a_line():
    p = TextSpotParams(min_chars=5, min_char_aspect=0.25)        # alone, a box needs width >= 1.25 x height
    boxes = [(0, 0, 20, 20), (25, 0, 45, 20),                     # "ON" "OF": narrow, but on one line
             (200, 100, 220, 120),                                # narrow and alone: not read
             (300, 0, 340, 20)]                                   # wide enough alone
    kept, lines = keep_readable(list(range(4)), boxes, p)
    assert kept == [0, 1, 3] and lines[0] == lines[1] != lines[2]


# ---------------------------------------------------------------- blocks: quotes set on several lines

def _placard(words, conf=0.95, top=60, h=25, x0=30, line0=1):
    """One word per line, stacked (a placard: "DONT / TAX / ME / BRO!"), centred on x0 + 50."""
    out = []
    for k, w in enumerate(words):
        c = conf[k] if isinstance(conf, list) else conf
        width = 12 * len(w)
        out.append(Detection(w, c, (x0 + 50 - width / 2, top + k * h, x0 + 50 + width / 2, top + (k + 1) * h), line0 + k))
    return out


def test_block_matches_a_quote_across_stacked_lines():
    """A quote whose words stand on stacked lines of similar height ("DONT / TAX / ME / BRO!") matches as
    the block's text read top to bottom; no line of it reaches 5 characters alone."""
    caption = "A man in a cowboy hat holds a sign saying Dont tax me bro!"
    sign = _placard(["DONT", "TAX", "ME", "BrO!"], conf=[0.99, 1.0, 1.0, 0.72])   # "BrO!" weak: not in the run
    other = Detection("NDTAKEIT", 0.92, (190, 54, 236, 70), 0)
    assert caption_match([other, *sign], caption, blocks=False) is None
    m = caption_match([other, *sign], caption)
    assert m is not None and m.block and m.text == "DONT TAX ME" and m.span == "Dont tax me" and m.n_chars == 9
    assert m.n_words == 3 and m.conf == pytest.approx(0.99) and list(m.window) == sign[:3]
    assert matched_detections([other, *sign], caption) == sign[:3]
    assert matched_detections([other, *sign], caption)[0] is sign[0]       # the objects given, for masking
    assert matched_detections([other, *sign], "a man in a hat", min_chars=5) == []
    weak = _placard(["DONT", "TAX", "ME"], conf=[0.99, 0.5, 1.0])           # a weak word breaks the block's run
    assert caption_match(weak, caption) is None
    assert caption_match([(d.text, d.conf) for d in sign], caption) is None   # no boxes: no blocks


def test_block_window_words_and_line_matches_first():
    """A block's match reports the words its common window covers; a line that matches as well as the
    block wins the tie (it is the same evidence with fewer assumptions)."""
    caption = "protesters with a free hugs banner"
    sign = _placard(["XQZ", "FREE", "HUGS"])
    m = caption_match(sign, caption)
    assert m.block and m.text == "XQZ FREE HUGS" and m.span == "free hugs" and [d.text for d in m.window] == ["FREE", "HUGS"]
    line = _line(["FREE", "HUGS"], y=300)
    m = caption_match([*line, *sign], caption)
    assert not m.block and m.text == "FREE HUGS"


def test_assign_blocks_geometry():
    """Lines join a block when stacked (centres apart), close (gap < half a line), of similar height
    (< 1.5x) and overlapping horizontally by half the narrower line; blocks read top to bottom."""
    lines = [(0, 20, 100, 40, 20),     # 0
             (10, 0, 90, 20, 20),      # 1: right above 0 -> read first
             (20, 42, 80, 62, 20),     # 2: 2 px below 0
             (200, 0, 300, 20, 20),    # 3: beside 1, not stacked on anything
             (0, 100, 100, 120, 20),   # 4: 38 px below 2: too far
             (0, 62, 100, 102, 40),    # 5: right below 2 but twice as tall
             (90, 120, 190, 140, 20)]  # 6: below 4, overlapping 10 px of 100: not stacked
    blocks = assign_blocks(lines)
    assert [1, 0, 2] in blocks and [3] in blocks and [4] in blocks and [5] in blocks and [6] in blocks
    assert len(blocks) == 5
    assert assign_blocks(lines, line_gap=2.0)[0] == [1, 0, 2, 4]   # a wider gap joins 4 (5 still too tall)
    assert assign_blocks([]) == []


def test_block_side_by_side_lines_are_not_joined():
    """Words side by side on one baseline but on different line ids (too far apart for a line) do not
    form a block: a block stacks lines vertically."""
    caption = "the sunset beach"
    left = Detection("SUN", 0.95, (0, 0, 30, 20), 0)
    right = Detection("SET", 0.95, (200, 0, 230, 20), 1)
    assert block_runs([left, right], 0.8) == [] and caption_match([left, right], caption) is None
    below = Detection("SET", 0.95, (0, 22, 30, 42), 1)
    assert [[d.text for d in run] for run in block_runs([left, below], 0.8)] == [["SUN", "SET"]]
    assert caption_match([left, below], caption).span == "sunset"


def test_block_rule_from_stored_evidence_is_the_same():
    """Blocks are computed from the evidence the image stage stores (text, conf, float32 box, line id), so
    redecide re-applies them exactly: the verdicts from the stored rows equal those of the fresh detections."""
    from pipeline.filter.image_stage import detections_from_evidence
    caption = "A man in a cowboy hat holds a sign saying Dont tax me bro!"
    fresh = [*_placard(["DONT", "TAX", "ME", "BrO!"], conf=[0.99, 1.0, 1.0, 0.84], top=61.3, h=24.7),
             Detection("NDTAKEIT", 0.92, (190.5, 54.25, 236.1, 70.9), 0)]
    rows = [{"text": d.text, "conf": d.conf, "line": d.line,
             **{k: float(np.float32(v)) for k, v in zip(("x0", "y0", "x1", "y1"), d.box)}} for d in fresh]
    stored = detections_from_evidence(rows)
    for rule in ((0.8, 5), (0.9, 5), (0.8, 12), (0.5, 3)):
        a, b = caption_match(fresh, caption, *rule), caption_match(stored, caption, *rule)
        assert (a is None) == (b is None) and (a is None or (a.text, a.span, a.block) == (b.text, b.span, b.block)), rule
    assert caption_match(stored, caption).text == "DONT TAX ME BrO!"


# ---------------------------------------------------------------- the ppocr engine and the real-text set

@pytest.fixture(scope="module")
def ppocr():
    from pipeline.filter.ppocr import PPOCRSpotter
    return PPOCRSpotter(gpu=False, threads=1)


def test_ppocr_gives_the_same_evidence(ppocr):
    """PP-OCR (ONNX models from the installed wheel) reads words with boxes, confidences and lines, the
    evidence the easyocr engine gives, and the rule works on it unchanged."""
    blank = np.full((300, 400, 3), 128, np.uint8)
    found = ppocr.spot([_rendered("SUNSET BEACH CLUB", size=(640, 200)), blank, np.zeros((2, 2, 3), np.uint8)])
    assert found[1] == [] and found[2] == []
    assert all(isinstance(d, Detection) and 0 <= d.conf <= 1 for d in found[0])
    assert " ".join(d.text for d in found[0]).upper().replace(" ", "") == "SUNSETBEACHCLUB", found[0]
    assert len({d.line for d in found[0]}) == 1 and all(d.line >= 0 for d in found[0])
    assert all(0 <= d.box[0] < d.box[2] <= 640 and 0 <= d.box[1] < d.box[3] <= 200 for d in found[0])
    assert [d.text for d in sorted(found[0], key=lambda d: d.box[0])] == ["SUNSET", "BEACH", "CLUB"]  # words
    assert caption_match(found[0], "drinks at the sunset beach club").span == "sunset beach club"
    assert ppocr.cpu_seconds["detect"] > 0 and ppocr.cpu_seconds["recognise"] > 0
    with pytest.raises(ValueError, match="uint8 RGB"):
        ppocr.spot([np.zeros((10, 10), np.uint8)])


def test_ppocr_reading_does_not_depend_on_the_batch(ppocr):
    """A crop's recogniser input depends on the crop alone (batches grouped by own padded width), so an
    image reads the same whatever else is in its part: the image stage's redecide invariance."""
    a, b = _rendered("Sunflowers and tulips"), _rendered("A VERY LONG BANNER OF TEXT", size=(900, 200))
    alone = ppocr.spot([a])[0]
    together = ppocr.spot([b, a, b])[1]
    assert [(d.text, d.box, d.line) for d in alone] == [(d.text, d.box, d.line) for d in together]
    assert [d.conf for d in alone] == pytest.approx([d.conf for d in together], abs=1e-5)


def test_ppocr_detects_inside_the_black_border(ppocr):
    """img2dataset's border (black rows / columns around a photo of another aspect ratio) is not put on
    the detector's canvas: the photo alone and in its bordered square read the same words, at the same
    places (shifted by the border), with the same canvas scale."""
    from pipeline.filter.ppocr import _content
    photo = _rendered("Sunflowers and tulips", size=(256, 144))
    square = np.zeros((256, 256, 3), np.uint8)
    square[56:200] = photo
    assert _content(square) == (56, 200, 0, 256) and _content(photo) == (0, 144, 0, 256)
    assert _content(np.zeros((8, 8, 3), np.uint8)) == (0, 0, 0, 0)
    assert ppocr.spot([np.zeros((64, 64, 3), np.uint8)]) == [[]]
    alone, bordered = ppocr.spot([photo, square])
    assert [d.text for d in alone] == [d.text for d in bordered] and alone
    for a, b in zip(alone, bordered):
        assert b.box == pytest.approx((a.box[0], a.box[1] + 56, a.box[2], a.box[3] + 56), abs=1e-3)
        assert b.conf == pytest.approx(a.conf, abs=1e-5)


def test_ppocr_rereads_weak_crops(ppocr, monkeypatch):
    """A crop read with a word below min_conf is read again from a wider and a stretched crop and the
    more confident reading kept: on the labelled photo whose poster says "PROM / NIGHT", the detector's
    box clips the N ("IGHT" 0.49); the wider crop reads "NIGHT" >= 0.8, and the block rule matches."""
    import pipeline.filter.ppocr as pp
    from bench.textspot_set import build_realtext_set
    item = next(i for i in build_realtext_set(256) if "3015891201" in i.name)
    found = ppocr.spot([item.image])[0]
    night = [d for d in found if d.text == "NIGHT"]
    assert night and night[0].conf >= 0.8, found
    assert caption_match(found, item.caption).span == "Prom Night"
    monkeypatch.setattr(pp, "REREADS", ())
    once = ppocr.spot([item.image])[0]
    assert "NIGHT" not in [d.text for d in once] and caption_match(once, item.caption) is None, once
    weakest = lambda ds: min(d.conf for d in ds)
    assert weakest([d for d in found if d.line == night[0].line]) > weakest([d for d in once if d.line == night[0].line])


def _committed(set_name: str, path: str) -> dict:
    import json
    from pathlib import Path
    results = json.loads((Path(__file__).resolve().parents[1] / "bench/results/textspot.json").read_text())
    return results["cpu"][set_name][path]


def test_real_text_set_at_256px_default_engine(ppocr):
    """The labelled real-text set (bench/data/realtext_labels.csv: real photos, looked at one by one;
    drop = the caption quotes legible natural text) as the download stage stores it at 256 px: the
    default engine's precision and recall are those bench/results/textspot.json commits (one image of
    slack for CPU kernels that round differently), and the issue's targets (recall >= 0.9 at precision 1)
    are checked against that committed figure by the benchmark, not here. Whole set: ~171 images."""
    from bench.textspot_set import build_realtext_set
    assert TextSpotParams().engine == "ppocr"
    items = build_realtext_set(256)
    assert len(items) >= 150 and sum(i.drop for i in items) >= 60
    assert all(i.image.shape == (256, 256, 3) for i in items)
    results = spot_and_match([i.image for i in items], [i.caption for i in items], spotter=ppocr)
    precision, recall = _quality(results, items, min_conf=0.8)
    committed = _committed("real_256", "ppocr")
    n_drop = sum(i.drop for i in items)
    misses = [(i.name, i.caption, [d.text for d in r.detections][:5]) for r, i in zip(results, items) if r.drop != i.drop]
    assert recall >= committed["recall"] - 1.5 / n_drop, (recall, committed["recall"], misses)
    assert precision >= committed["precision"] - 0.02, (precision, misses)


def test_real_text_subset_at_256px_easyocr(spotter):
    """easyocr stays supported: on a stratified subset of the real-text set (40 images, ~18 to drop) it
    finds quoted scene text at 256 px with precision 1, as the benchmark measured for the whole set."""
    from bench.textspot_set import build_realtext_set
    items = build_realtext_set(256, limit=40)
    results = spot_and_match([i.image for i in items], [i.caption for i in items], spotter=spotter)
    precision, recall = _quality(results, items, min_conf=0.8)
    committed = _committed("real_256", "easyocr")
    assert precision >= committed["precision"] - 0.02
    assert recall >= committed["recall"] - 0.15, (recall, committed["recall"])   # a subset: sampling slack


def test_blocks_are_recorded_and_outputs_from_before_them_are_redecided_on_lines_only():
    """match_blocks is an image-stage setting in the manifest: an output whose manifest predates it was
    decided line by line, and a re-decision from its evidence must not add block matches."""
    from pipeline.filter.image_stage import ImageStageParams
    record = ImageStageParams().to_dict()
    assert record["textspot"]["match_blocks"] is True
    assert ImageStageParams.from_dict(record).textspot.match_blocks is True
    del record["textspot"]["match_blocks"]
    assert ImageStageParams.from_dict(record).textspot.match_blocks is False
    caption = "A man in a cowboy hat holds a sign saying Dont tax me bro!"
    sign = _placard(["DONT", "TAX", "ME"])
    old = ImageStageParams.from_dict(record).textspot
    assert caption_match(sign, caption, old.min_conf, old.min_chars, old.match_blocks) is None
    assert caption_match(sign, caption) is not None
