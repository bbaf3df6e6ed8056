"""The DiHT caption rule's edges, and the real easyocr TextSpotter on the labelled set (bench/textspot_set.py)."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from pipeline.filter.textspot import (Detection, TextSpotParams, TextSpotter, _longest_common_window, assign_lines,
                                      caption_match, keep_readable, normalise, spot_and_match)

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
    """Issue 3's target on the labelled set (60 pairs, 25 to drop), TextSpotParams defaults, the paper's
    min_conf 0.8: precision >= 0.95 and recall >= 0.9. Measured: P 1.0, R 0.96 with bf16 CRAFT (CPUs
    with bf16 units) / 0.92 with fp32 CRAFT; the misses are misreads of coarse boxes ("bbed" for "bed",
    "MRROR"). CPU cost: ~0.5 s per image (~30-45 s here on 2 shared cores)."""
    from bench.textspot_set import build_set
    items = build_set()
    assert len(items) >= 40 and 0.3 < sum(i.drop for i in items) / len(items) < 0.6
    assert {i.kind for i in items} == {"caption_text", "clean", "other_text", "natural"}
    results = spot_and_match([i.image for i in items], [i.caption for i in items], spotter=spotter)
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
