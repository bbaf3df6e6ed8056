"""Re-deciding from stored evidence equals a fresh filter run; refusals; sweep accounting.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_redecide.py

Input: 12 real Flickr8k photos x 3 captions (its own caption; a second caption with some of its words
rendered onto the photo - text_shortcut; a bare noun phrase or another photo's caption), plus an
undecodable image, an empty caption and a 4-letter caption word shown on a photo: 39 rows, 25
distinct images to text-spot (~0.3 s each on a CPU core). One source run with the DiHT defaults, three fresh runs with other thresholds, each
re-decided by both engines (local: in-process, pipeline.filter.finalize; spark: Spark tasks and queries).
"""
import io
import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import schemas as S
from pipeline.media.render import render_text
from jobs.cat_filter import cat_filter
from jobs.cat_filter import _finalize
from jobs.redecide import LOCAL_MAX_ROWS, choose_engine, load_source, redecide, replan, sweep
from jobs.redecide import main as redecide_main
from pipeline.filter import finalize as fin
from pipeline.filter.captions import CaptionParams
from pipeline.filter.image_stage import ImageStageParams
from pipeline.filter.redecide import NotRedecidable
from pipeline.filter.textspot import TextSpotParams

N_PHOTOS = 12
# threshold sets checked against fresh runs: the example; a lower caption-length limit with a
# stricter text rule (a max_caption_chars of 45 drops some Flickr captions as caption_too_long); and the
# loosest text rule the evidence supports (more text shortcuts dropped than with the defaults)
FRESH = {"c2": dict(min_complexity=2, min_conf=0.7, min_chars=4),
         "strict": dict(max_caption_chars=45, min_conf=0.9, min_chars=6),
         "loose": dict(min_conf=0.5, min_chars=3)}
ENGINES = ("local", "spark")


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
    # a 4-letter caption word shown on the photo: kept by the DiHT defaults (< 5 characters), dropped by the
    # loose thresholds (min_chars 3), so every FRESH point changes verdicts whatever the engine's noise
    c0 = caps[names[0]][0]
    short = next(w for w in c0.split() if len(w) == 4 and w.isalpha())
    shown = render_text(Image.open(io.BytesIO(photos[0]["jpg"])).convert("RGB"), short.upper(), random.Random(1))
    buf = io.BytesIO()
    shown.save(buf, format="JPEG", quality=90)
    rows.append({"key": "short_text", "caption": c0, "jpg": buf.getvalue(), "noise": "text_shortcut"})
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
    """The source run (defaults), fresh runs with the FRESH thresholds, and their re-decisions by each engine."""
    base = tmp_path_factory.mktemp("redecide")
    inp = _noisy_input(shared_data, base)
    out = {"input": inp, "source": str(base / "source")}
    cat_filter(inp, out["source"], spark=spark, rows_per_part=20)
    for name, thresholds in FRESH.items():
        out[f"fresh_{name}"] = str(base / f"fresh_{name}")
        cat_filter(inp, out[f"fresh_{name}"], spark=spark, rows_per_part=20, **_params(**thresholds))
        for engine in ENGINES:
            out[f"redecided_{name}_{engine}"] = str(base / f"redecided_{name}_{engine}")
            redecide(out["source"], out[f"redecided_{name}_{engine}"], spark=spark, engine=engine, **thresholds)
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


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(FRESH))
def test_redecide_equals_a_fresh_run(runs, name, engine):
    redecided = runs[f"redecided_{name}_{engine}"]
    assert_same_output(redecided, runs[f"fresh_{name}"])
    # and the thresholds changed something: the outputs differ from the source
    assert _stats(redecided) != _stats(runs["source"])
    with open(f"{redecided}/manifest.json") as fh:
        assert json.load(fh)["engine"] == engine


@pytest.mark.parametrize("name", list(FRESH))
def test_both_engines_write_the_same_output(runs, name):
    local, spark_made = runs[f"redecided_{name}_local"], runs[f"redecided_{name}_spark"]
    assert_same_output(local, spark_made)
    for folder, schema in (("ledger", S.LEDGER), ("ocr", S.OCR)):  # every column, confidences to the bit
        a, b = (sorted(pq.read_table(f"{o}/{folder}", schema=schema.arrow).to_pylist(), key=lambda r: r["key"])
                for o in (local, spark_made))
        assert a == b, folder
    with open(f"{local}/stats.json") as fa, open(f"{spark_made}/stats.json") as fb:
        sa, sb = json.load(fa), json.load(fb)
    assert {k: v for k, v in sa.items() if k not in ("seconds", "phase_seconds", "engine")} == \
        {k: v for k, v in sb.items() if k not in ("seconds", "phase_seconds", "engine")}
    # the same examples, pictures and counts on the page: one selection rule (pipeline.filter.finalize)
    with open(f"{local}/report.html", "rb") as fa, open(f"{spark_made}/report.html", "rb") as fb:
        assert fa.read() == fb.read()


def test_auto_engine_chooses_by_input_rows():
    assert choose_engine("auto", 38) == "local"
    assert choose_engine("auto", LOCAL_MAX_ROWS) == "local"
    assert choose_engine("auto", LOCAL_MAX_ROWS + 1) == "spark"
    assert choose_engine("spark", 38) == "spark" and choose_engine("local", 10 ** 9) == "local"
    with pytest.raises(ValueError, match="engine"):
        choose_engine("dask", 38)


def test_source_stores_every_detection_and_what_can_change(runs):
    ocr = pq.read_table(f"{runs['source']}/ocr", schema=S.OCR.arrow).to_pylist()
    ledger = _ledger(runs["source"])
    spotted = {k for k, r in ledger.items() if r["stage"] == S.STAGE_TEXTSPOT and r["status"] != S.FAILED}
    assert {r["key"] for r in ocr} == spotted
    assert sum(len(r["detections"]) for r in ocr) > len(spotted) // 2  # rendered words were read
    with open(f"{runs['source']}/manifest.json") as fh:
        evidence = json.load(fh)["evidence"]
    assert evidence["redecidable"]["min_chars"].startswith(">= 3")
    with open(f"{runs['redecided_c2_local']}/manifest.json") as fh:
        m = json.load(fh)
    assert m["derived_from"]["output"] == runs["source"] and m["derived_from"]["changes"] == FRESH["c2"]
    assert m["resume_identity"]["caption"]["min_complexity"] == 2


def test_redecided_output_can_be_redecided_again(spark, runs, tmp_path):
    chained, direct = str(tmp_path / "chained"), str(tmp_path / "direct")
    redecide(runs["redecided_c2_spark"], chained, spark=spark, min_conf=0.9)  # auto: 38 rows, local
    redecide(runs["source"], direct, spark=spark, min_complexity=2, min_conf=0.9, min_chars=4)
    assert_same_output(chained, direct)
    with open(f"{chained}/manifest.json") as fh:
        assert json.load(fh)["engine"] == "local"


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


@pytest.mark.parametrize("engine", ENGINES)
def test_sweep_counts_add_up_and_match_the_runs(spark, runs, tmp_path, engine):
    grid = {"min_complexity": [1, 2], "min_conf": [0.5, 0.7, 0.8, 0.9], "min_chars": [3, 4, 5, 6]}
    table = sweep(runs["source"], str(tmp_path / "sweep"), grid, spark=spark, engine=engine)
    assert len(table) == 2 * 4 * 4
    n_input = _stats(runs["source"])["n_input"]
    for row in table:
        assert row["n_input"] == n_input == row["n_kept"] + row["n_dropped"] + row["n_failed"]
        assert sum(row[f"{t}_n"] for t in ("none", "text_shortcut", "misaligned", "low_complexity")) == n_input
    at = {(r["min_complexity"], r["min_conf"], r["min_chars"]): r for r in table}
    for point, out in (((1, 0.8, 5), runs["source"]), ((2, 0.7, 4), runs["fresh_c2"]),
                       ((1, 0.5, 3), runs["fresh_loose"])):
        s = _stats(out)
        assert (at[point]["n_kept"], at[point]["n_dropped"], at[point]["n_failed"]) == \
            (s["n_kept"], s["n_dropped"], s["n_failed"])
    # a looser text rule removes at least as many text shortcuts
    assert at[(1, 0.5, 3)]["text_shortcut_removed"] >= at[(1, 0.9, 6)]["text_shortcut_removed"]
    assert at[(1, 0.8, 5)]["text_shortcut_removed"] > 0
    for f in ("sweep.csv", "sweep.json", "sweep.png"):
        assert (tmp_path / "sweep" / f).stat().st_size > 0
    with open(tmp_path / "sweep" / "sweep.json") as fh:
        assert json.load(fh)["engine"] == engine


def test_sweep_engines_agree(spark, runs, tmp_path):
    grid = {"min_complexity": [1, 3], "min_conf": [0.3, 0.8, 0.95], "min_chars": [3, 8]}
    local, spark_made = (sweep(runs["source"], str(tmp_path / e), grid, spark=spark, engine=e) for e in ENGINES)
    assert local == spark_made


def _finish_both(spark, runs, tmp_path, edit):
    """A copy of a re-decided output per engine, `edit`ed (ledger rows lost or doubled), then finished."""
    plan = replan(runs["source"], load_source(runs["source"]))
    outs = {}
    for engine in ENGINES:
        out = str(tmp_path / engine)
        shutil.copytree(runs["redecided_c2_local"], out)
        edit(out)
        finish = (lambda out=out: fin.finalize(out, plan, {"images"}, 8)) if engine == "local" else \
            (lambda out=out: _finalize(spark, out, plan, {"images"}, 8))
        outs[engine] = (out, finish)
    return outs


def _edit_ledger(out: str, stage: str, change):
    """Rewrite the first ledger part of `stage` with change(rows) applied; returns what change returns."""
    path = sorted(Path(out, "ledger", stage).glob("*.parquet"))[0]
    rows = pq.read_table(path, schema=S.LEDGER.arrow).to_pylist()
    lost = change(rows)
    pq.write_table(S.LEDGER.from_rows(rows), path)
    return lost


def test_both_finalisations_reconcile_a_lost_ledger_row(spark, runs, tmp_path):
    lost = []
    outs = _finish_both(spark, runs, tmp_path,
                        lambda out: lost.append(_edit_ledger(out, S.STAGE_TEXTSPOT, lambda rows: rows.pop(0)["key"])))
    stats = {}
    for engine, (out, finish) in outs.items():
        stats[engine] = finish()
        reconciled = pq.read_table(f"{out}/ledger/{fin.RECONCILED}", schema=S.LEDGER.arrow).to_pylist()
        assert [(r["key"], r["status"], r["reason"]) for r in reconciled] == \
            [(lost[0], S.FAILED, S.R_UNACCOUNTED)], engine
        assert _stats(out)["n_failed"] == _stats(runs["redecided_c2_local"])["n_failed"] + 1
        assert len(_ledger(out)) == _stats(out)["n_input"]
    assert lost[0] == lost[1]
    assert stats["local"] == stats["spark"]


def test_both_finalisations_refuse_a_doubled_ledger_row(spark, runs, tmp_path):
    outs = _finish_both(spark, runs, tmp_path,
                        lambda out: _edit_ledger(out, S.STAGE_CAPTION, lambda rows: rows.append(dict(rows[0]))))
    for engine, (_, finish) in outs.items():
        with pytest.raises(RuntimeError, match="ledger invariant broken"):
            finish()


def _row(key, reason=None, jpg=None):
    return {**dict.fromkeys(S.LEDGER.columns), "key": key, "reason": reason, "jpg": jpg}


def test_report_examples_prefer_thumbnails_then_first_keys():
    rows = [_row("k5", jpg=b"5"), _row("k1"), _row("k2"), _row("k3", jpg=b"3"), _row("k3"),  # k3 twice
            _row("a9", "text_spotted"), _row("a1", "text_spotted")]
    examples = fin.select_examples(rows, 3)
    assert list(examples) == ["kept", "text_spotted"]
    # thumbnails first (by key), then the first keys; one row per key, with its thumbnail
    assert [(e["key"], e["jpg"]) for e in examples["kept"]] == [("k3", b"3"), ("k5", b"5"), ("k1", None)]
    assert [e["key"] for e in examples["text_spotted"]] == ["a1", "a9"]
    assert fin.select_examples(reversed(rows), 3) == examples  # the order rows come in does not matter
