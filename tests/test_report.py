"""report.html is self-contained, escapes captions, highlights the matched text, and renders in Chromium."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.media.images import decode_image
from pipeline.filter.report import highlight, write_report
from schemas import (DROPPED, FAILED, R_DECODE_ERROR, R_LOW_COMPLEXITY, R_NO_ACTION, R_TEXT_SPOTTED,
                     STAGE_CAPTION, STAGE_TEXTSPOT)

ROOT = Path(__file__).resolve().parents[1]
COCO_IMAGES = ROOT.parent / "shared" / "data" / "coco-mini" / "images"
CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and Path(p).exists()), None)

STATS = {
    "n_input": 1000, "n_kept": 180, "n_dropped": 790, "n_failed": 30,
    "by_stage": {
        STAGE_CAPTION: {"in": 1000, "kept": 300, "dropped": {R_NO_ACTION: 600, R_LOW_COMPLEXITY: 100}, "failed": {}},
        "download": {"in": 300, "kept": 280, "dropped": {}, "failed": {"download_failed": 20}},
        STAGE_TEXTSPOT: {"in": 280, "kept": 180, "dropped": {R_TEXT_SPOTTED: 90}, "failed": {R_DECODE_ERROR: 10}},
    },
}


def _examples() -> dict[str, list[dict]]:
    photos = sorted(COCO_IMAGES.glob("*.jpg"))[:6]
    spotted = [{"key": f"k{i}", "status": DROPPED, "stage": STAGE_TEXTSPOT, "reason": R_TEXT_SPOTTED,
                "caption": f"A Golden Gate Bridge poster <script>alert({i})</script> & more",
                "complexity": 2, "ocr_text": "GOLDEN GATE", "ocr_conf": 0.93, "matched_span": "Golden Gate",
                "jpg": p.read_bytes()} for i, p in enumerate(photos[:4])]
    no_action = [{"key": "n0", "status": DROPPED, "stage": STAGE_CAPTION, "reason": R_NO_ACTION,
                  "caption": "Blue ceramic mug 350ml", "complexity": 1, "jpg": photos[4].read_bytes()},
                 {"key": "n1", "status": DROPPED, "stage": STAGE_CAPTION, "reason": R_NO_ACTION,
                  "caption": "Vintage poster", "complexity": 1}]  # caption stage: no image yet
    failed = [{"key": "f0", "status": FAILED, "stage": STAGE_TEXTSPOT, "reason": R_DECODE_ERROR,
               "caption": "a dog runs", "error_message": "corrupt or truncated image: OSError",
               "jpg": b"<html>not an image</html>"}]
    return {R_TEXT_SPOTTED: spotted, R_NO_ACTION: no_action, R_DECODE_ERROR: failed}


def test_highlight_escapes_and_marks():
    assert highlight("a <b> SUNSET beach", "sunset") == "a &lt;b&gt; <mark>SUNSET</mark> beach"
    assert highlight("a & b", None) == "a &amp; b"
    assert highlight("no match here", "absent") == "no match here"


def test_report_is_self_contained(tmp_path):
    path = write_report(tmp_path, STATS, _examples())
    assert path == tmp_path / "report.html" and not list(tmp_path.glob(".*tmp"))
    page = path.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(0)&lt;/script&gt;" in page
    assert page.count("<mark>Golden Gate</mark>") >= 4
    # nothing external: every src / href is a data URI or an in-page anchor
    refs = re.findall(r"""(?:src|href)=['"]([^'"]*)""", page)
    assert refs and all(r.startswith(("data:image/jpeg;base64,", "#")) for r in refs)
    thumbs = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", page)
    assert len(thumbs) == 5  # 4 text_spotted + 1 no_action with bytes; the HTML bytes are not an image
    import base64
    assert max(decode_image(base64.b64decode(t)).width for t in thumbs) <= 180
    assert "undecodable" in page and "no image" in page
    assert "<svg" in page and "text_spotted: 90" in page and "caption_no_action: 600" in page
    assert "Accounting mismatch" not in page


def test_report_flags_broken_accounting(tmp_path):
    stats = dict(STATS, n_kept=181)
    page = write_report(tmp_path, stats, {}).read_text()
    assert "Accounting mismatch" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    path = write_report(tmp_path / "out", STATS, _examples())
    png = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,2000",
           path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists(), f"no screenshot; chromium said: {proc.stderr[-2000:]}"
    shot = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert shot.shape[:2] == (2000, 1200)
    assert shot.std() > 20  # not blank
    # the funnel's kept bar (#4caf50) and the <mark> highlight (#ffeb3b) are on the page
    for colour in ((0x4C, 0xAF, 0x50), (0xFF, 0xEB, 0x3B)):
        assert (np.abs(shot - np.array(colour)).sum(axis=-1) < 12).sum() > 50, colour


def test_every_stage_says_what_passed_it(tmp_path):
    """stats.json names what went on from each stage ("passed"), so a stage that passed rows never reads as
    "kept 0"; a download failure on an input that holds its images still gets its funnel row."""
    from pipeline.filter.finalize import build_stats
    from pipeline.filter.report import funnel_stages, stage_passed
    counts = [{"stage": STAGE_CAPTION, "status": DROPPED, "reason": R_NO_ACTION, "count": 138},
              {"stage": "download", "status": FAILED, "reason": "download_failed", "count": 1},
              {"stage": STAGE_TEXTSPOT, "status": DROPPED, "reason": R_TEXT_SPOTTED, "count": 27},
              {"stage": STAGE_TEXTSPOT, "status": "kept", "reason": None, "count": 45}]
    stats = build_stats(counts, 211, {"images"})
    by = stats["by_stage"]
    assert [by[s]["in"] for s in (STAGE_CAPTION, "download", STAGE_TEXTSPOT)] == [211, 73, 72]
    assert [by[s]["passed"] for s in (STAGE_CAPTION, "download", STAGE_TEXTSPOT)] == [73, 72, 45]
    assert by[STAGE_CAPTION]["kept"] == 0 and by[STAGE_TEXTSPOT]["kept"] == 45
    assert funnel_stages(stats) == [STAGE_CAPTION, "download", STAGE_TEXTSPOT]
    del by["download"]["failed"]["download_failed"]
    assert funnel_stages(stats) == [STAGE_CAPTION, STAGE_TEXTSPOT]   # nothing ended there, no download ran
    assert stage_passed({"in": 10, "kept": 0, "dropped": {"a": 3}, "failed": {"b": 2}}) == 5   # older stats.json
    page = write_report(tmp_path, stats, {}).read_text(encoding="utf-8")
    assert "<th>passed</th>" in page
