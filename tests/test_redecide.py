"""Re-deciding from stored evidence equals a fresh filter run; refusals; sweep accounting.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_redecide.py

Input: 12 real Flickr8k photos x 3 captions (its own caption; a second caption with some of its words
rendered onto the photo - text_shortcut; a bare noun phrase or another photo's caption), plus an
undecodable image and an empty caption: 38 rows, 24 distinct images to text-spot (~0.3 s each on a
CPU core). One source run with the DiHT defaults, two fresh runs with other thresholds.
"""
import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import schemas as S
from bench.textspot_set import render_text
from jobs.cat_filter import cat_filter
from jobs.redecide import main as redecide_main
from jobs.redecide import redecide, sweep
from pipeline.captions import CaptionParams
from pipeline.image_stage import ImageStageParams
from pipeline.redecide import NotRedecidable
from pipeline.textspot import TextSpotParams

N_PHOTOS = 12
# threshold sets checked against fresh runs: the example; and a lower caption-length limit with a
# stricter text rule (a max_caption_chars of 45 drops some Flickr captions as caption_too_long)
FRESH = {"c2": dict(min_complexity=2, min_conf=0.7, min_chars=4),
         "strict": dict(max_caption_chars=45, min_conf=0.9, min_chars=6)}


def _noisy_input(shared_data, path) -> str:
    flickr = shared_data / "flickr8k"
    photos = pq.ParquetFile(flickr / "images.parquet").read_row_group(0, columns=["image", "jpg"]).slice(0, N_PHOTOS)
    photos = photos.to_pylist()
    names = [p["image"] for p in photos]
    caps = {}
    for r in pq.read_table(flickr / "captions.parquet", filters=[("image", "in", names)]).to_pylist():
        caps.setdefault(r["image"], {})[r["n"]] = r["caption"].strip()
    rng = random.Random(0)
    rows = []
    for i, p in enumerate(photos):
        c, stem = caps[p["image"]], p["image"][:-4]
        rows.append({"key": f"{stem}_0", "caption": c[0], "jpg": p["jpg"], "noise": "none"})
        words = c[1].rstrip(" .").split()
        phrase = " ".join(words[1:4]) if len(words) > 4 else " ".join(words)
        shown = render_text(Image.open(io.BytesIO(p["jpg"])).convert("RGB"), phrase, rng)
        buf = io.BytesIO()
        shown.save(buf, format="JPEG", quality=90)
        rows.append({"key": f"{stem}_1", "caption": c[1], "jpg": buf.getvalue(), "noise": "text_shortcut"})
        if i % 2:
            rows.append({"key": f"{stem}_2", "caption": caps[names[(i + 1) % N_PHOTOS]][2], "jpg": p["jpg"],
                         "noise": "misaligned"})
        else:
            rows.append({"key": f"{stem}_2", "caption": " ".join(c[2].split()[:2]), "jpg": p["jpg"],
                         "noise": "low_complexity"})
    rows.append({"key": "broken", "caption": "A man is riding a red bike down the street", "jpg": b"not an image",
                 "noise": "none"})
    rows.append({"key": "empty", "caption": " ", "jpg": photos[0]["jpg"], "noise": "none"})
    for r in rows:
        r["url"] = f"http://flickr8k.invalid/{r['key']}.jpg"
    out = str(path / "noisy.parquet")
    pq.write_table(pa.Table.from_pylist(rows), out, row_group_size=16)
    return out


def _params(min_complexity=1, max_caption_chars=1000, min_conf=0.8, min_chars=5):
    return dict(caption=CaptionParams(min_complexity=min_complexity, max_caption_chars=max_caption_chars),
                image=ImageStageParams(textspot=TextSpotParams(min_conf=min_conf, min_chars=min_chars)))


@pytest.fixture(scope="module")
def runs(spark, shared_data, tmp_path_factory):
    """The source run (defaults), fresh runs with the FRESH thresholds, and their re-decisions."""
    base = tmp_path_factory.mktemp("redecide")
    inp = _noisy_input(shared_data, base)
    out = {"input": inp, "source": str(base / "source")}
    cat_filter(inp, out["source"], spark=spark, rows_per_part=20)
    for name, thresholds in FRESH.items():
        out[f"fresh_{name}"] = str(base / f"fresh_{name}")
        cat_filter(inp, out[f"fresh_{name}"], spark=spark, rows_per_part=20, **_params(**thresholds))
        out[f"redecided_{name}"] = str(base / f"redecided_{name}")
        redecide(out["source"], out[f"redecided_{name}"], spark=spark, **thresholds)
    return out


def _ledger(out) -> dict[str, dict]:
    t = pq.read_table(f"{out}/ledger", schema=S.LEDGER.arrow)  # every stage folder
    return {r["key"]: r for r in t.to_pylist()}


def _shards(out) -> dict[str, dict]:
    t = pq.read_table(f"{out}/shards", schema=S.SHARD.arrow)
    return {r["key"]: r for r in t.to_pylist()}


def _stats(out) -> dict:
    import json
    with open(f"{out}/stats.json") as fh:
        s = json.load(fh)
    return {k: s[k] for k in ("n_input", "n_kept", "n_dropped", "n_failed", "by_stage")}


def assert_same_output(a, b):
    la, lb = _ledger(a), _ledger(b)
    assert la.keys() == lb.keys()
    for k in la:
        for col in ("status", "stage", "reason", "complexity", "has_action", "matched_span", "error_message", "caption"):
            assert la[k][col] == lb[k][col], (k, col, la[k][col], lb[k][col])
        # detections are batched through int8 dynamically quantised layers: another set of images in a
        # batch moves confidences in the last digits, never the verdicts above
        assert (la[k]["ocr_conf"] is None) == (lb[k]["ocr_conf"] is None), k
        if la[k]["ocr_conf"] is not None:
            assert la[k]["ocr_conf"] == pytest.approx(lb[k]["ocr_conf"], abs=0.02), k
    sa, sb = _shards(a), _shards(b)
    assert sorted(sa) == sorted(sb)
    assert all(sa[k] == sb[k] for k in sa)  # bytes, size and parse of every kept pair
    assert _stats(a) == _stats(b)
    ca = pq.read_table(f"{a}/captions", schema=S.CAPTIONS.arrow).drop(["source_file"]).to_pylist()
    cb = pq.read_table(f"{b}/captions", schema=S.CAPTIONS.arrow).drop(["source_file"]).to_pylist()
    assert sorted(ca, key=lambda r: r["key"]) == sorted(cb, key=lambda r: r["key"])


@pytest.mark.parametrize("name", list(FRESH))
def test_redecide_equals_a_fresh_run(runs, name):
    assert_same_output(runs[f"redecided_{name}"], runs[f"fresh_{name}"])
    # and the thresholds changed something: the outputs differ from the source
    assert _stats(runs[f"redecided_{name}"]) != _stats(runs["source"])


def test_source_stores_every_detection_and_what_can_change(runs):
    import json
    ocr = pq.read_table(f"{runs['source']}/ocr", schema=S.OCR.arrow).to_pylist()
    ledger = _ledger(runs["source"])
    spotted = {k for k, r in ledger.items() if r["stage"] == S.STAGE_TEXTSPOT and r["status"] != S.FAILED}
    assert {r["key"] for r in ocr} == spotted
    assert sum(len(r["detections"]) for r in ocr) > len(spotted) // 2  # rendered words were read
    with open(f"{runs['source']}/manifest.json") as fh:
        evidence = json.load(fh)["evidence"]
    assert evidence["redecidable"]["min_chars"].startswith(">= 3")
    with open(f"{runs['redecided_c2']}/manifest.json") as fh:
        m = json.load(fh)
    assert m["derived_from"]["output"] == runs["source"] and m["derived_from"]["changes"] == FRESH["c2"]
    assert m["resume_identity"]["caption"]["min_complexity"] == 2


def test_redecided_output_can_be_redecided_again(spark, runs, tmp_path):
    chained, direct = str(tmp_path / "chained"), str(tmp_path / "direct")
    redecide(runs["redecided_c2"], chained, spark=spark, min_conf=0.9)
    redecide(runs["source"], direct, spark=spark, min_complexity=2, min_conf=0.9, min_chars=4)
    assert_same_output(chained, direct)


@pytest.mark.parametrize("change,why", [({"min_complexity": 0}, "never text-spotted"),
                                        ({"require_action": False}, "without an action"),
                                        ({"max_caption_chars": 5000}, "never parsed"),
                                        ({"min_chars": 2}, "never read"),
                                        ({"canvas_size": 640}, "how the evidence was computed")])
def test_unsupported_thresholds_are_refused(runs, tmp_path, change, why):
    with pytest.raises(NotRedecidable, match=why):
        redecide(runs["source"], str(tmp_path / "x"), **change)
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_cli_refusal_exits_2_with_the_reason(runs, tmp_path, capsys):
    assert redecide_main(["--source", runs["source"], "--into", str(tmp_path / "y"), "--min-complexity", "0"]) == 2
    assert "never text-spotted" in capsys.readouterr().err


def test_sweep_counts_add_up_and_match_the_runs(spark, runs, tmp_path):
    grid = {"min_complexity": [1, 2], "min_conf": [0.5, 0.7, 0.8, 0.9], "min_chars": [3, 4, 5, 6]}
    table = sweep(runs["source"], str(tmp_path / "sweep"), grid, spark=spark)
    assert len(table) == 2 * 4 * 4
    n_input = _stats(runs["source"])["n_input"]
    for row in table:
        assert row["n_input"] == n_input == row["n_kept"] + row["n_dropped"] + row["n_failed"]
        assert sum(row[f"{t}_n"] for t in ("none", "text_shortcut", "misaligned", "low_complexity")) == n_input
    at = {(r["min_complexity"], r["min_conf"], r["min_chars"]): r for r in table}
    for point, out in (((1, 0.8, 5), runs["source"]), ((2, 0.7, 4), runs["fresh_c2"])):
        s = _stats(out)
        assert (at[point]["n_kept"], at[point]["n_dropped"], at[point]["n_failed"]) == \
            (s["n_kept"], s["n_dropped"], s["n_failed"])
    # a looser text rule removes at least as many text shortcuts
    assert at[(1, 0.5, 3)]["text_shortcut_removed"] >= at[(1, 0.9, 6)]["text_shortcut_removed"]
    assert at[(1, 0.8, 5)]["text_shortcut_removed"] > 0
    for f in ("sweep.csv", "sweep.json", "sweep.png"):
        assert (tmp_path / "sweep" / f).stat().st_size > 0
