"""The CAT filter job end to end on a real local[2] SparkSession: sample, LAION captions, bad input."""
import json
import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas as S
from jobs.cat_filter import cat_filter
from pipeline.store.partitions import InputError, ParamsChanged
from tests.conftest import LAION_SAMPLE, ROOT


def read_ledger(out) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(out, "ledger"))


def assert_invariants(out, n_input):
    stats = json.load(open(os.path.join(out, "stats.json")))
    ledger = read_ledger(out)
    assert len(ledger) == n_input == stats["n_input"]
    assert ledger.key.is_unique
    assert stats["n_input"] == stats["n_kept"] + stats["n_dropped"] + stats["n_failed"]
    assert set(ledger.status) <= set(S.STATUSES)
    assert ledger[ledger.status != S.KEPT].reason.notna().all(), "every non-kept row has a reason"
    captions = pd.read_parquet(os.path.join(out, "captions"))
    assert len(captions) == n_input and captions.key.is_unique
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["resume_identity"]["input"]["fingerprint"] and manifest["versions"]["spacy"]
    return stats, ledger


@pytest.fixture(scope="module")
def sample_run(spark, sample_parquet, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("filter") / "sample")
    cat_filter(str(sample_parquet), out, spark=spark, rows_per_part=64)
    return out


def test_sample_runs_all_stages(sample_run, sample_parquet):
    n = pq.ParquetFile(sample_parquet).metadata.num_rows
    stats, ledger = assert_invariants(sample_run, n)
    reasons = set(ledger.reason.dropna())
    # the sample holds every kind of caption: each rule fires at least once
    assert {S.R_NO_ACTION, S.R_EMPTY_CAPTION, S.R_TOO_LONG, S.R_DUPLICATE, S.R_TEXT_SPOTTED,
            S.R_DOWNLOAD_FAILED} <= reasons
    shards = pd.read_parquet(os.path.join(sample_run, "shards"))
    assert len(shards) == stats["n_kept"] > 0
    assert set(shards.key) == set(ledger[ledger.status == S.KEPT].key)
    assert (shards.complexity >= 1).all() and shards.has_action.all()
    assert shards.jpg.map(lambda b: b[:2] == b"\xff\xd8").all()
    html = open(os.path.join(sample_run, "report.html")).read()
    assert "text_spotted" in html and "data:image/jpeg;base64" in html
    spotted = ledger[ledger.reason == S.R_TEXT_SPOTTED]
    assert spotted.matched_span.notna().all() and (spotted.ocr_conf >= 0.8).all()
    # the engine that read each image is in every text-spot ledger row and in the manifest; the stored
    # evidence has each word's box and line (issue 26)
    from pipeline.filter.textspot import TextSpotParams
    read = ledger[(ledger.stage == S.STAGE_TEXTSPOT) & (ledger.status != S.FAILED)]
    assert len(read) and (read.ocr_engine == TextSpotParams().engine).all()
    with open(os.path.join(sample_run, "manifest.json")) as fh:
        assert json.load(fh)["resume_identity"]["image"]["textspot"]["engine"] == TextSpotParams().engine
    words = [d for dets in pq.read_table(os.path.join(sample_run, "ocr"), schema=S.OCR.arrow).column("detections")
             .to_pylist() for d in dets or []]
    assert words and all(d["line"] >= 0 and d["x0"] < d["x1"] and d["y0"] < d["y1"] for d in words)


def test_rerun_is_idempotent_and_resume_skips_done_parts(spark, sample_run, sample_parquet, tmp_path):
    before = {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(sample_run, "shards"))
              for f in fs}
    stats1 = json.load(open(os.path.join(sample_run, "stats.json")))
    cat_filter(str(sample_parquet), sample_run, spark=spark, rows_per_part=64)  # everything done: no part reruns
    after = {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(sample_run, "shards"))
             for f in fs}
    assert before == after
    stats2 = json.load(open(os.path.join(sample_run, "stats.json")))
    timing = ("seconds", "phase_seconds")
    assert {k: v for k, v in stats1.items() if k not in timing} == {k: v for k, v in stats2.items() if k not in timing}


def test_resume_with_other_parameters_is_refused(spark, sample_run, sample_parquet):
    from pipeline.filter.captions import CaptionParams
    with pytest.raises(ParamsChanged, match="min_complexity"):
        cat_filter(str(sample_parquet), sample_run, spark=spark, rows_per_part=64,
                   caption=CaptionParams(min_complexity=2))


def test_laion_captions_through_catcurate(spark, tmp_path):
    """`make filter INPUT=../shared/data/laion-sample` as users run it: the catcurate command the make
    target calls, spark-submit underneath, caption stage; Spark's launcher noise is not shown."""
    out = tmp_path / "laion"
    cmd = [os.path.join(os.path.dirname(sys.executable), "catcurate"), "filter", "--master", "local[2]",
           "--input", str(LAION_SAMPLE.parent), "--output", str(out), "--stages", "caption", "--rows-per-part", "300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CAT filter funnel" in proc.stdout and "caption_no_action" in proc.stdout
    assert "incubator modules" not in proc.stderr and "NativeCodeLoader" not in proc.stderr, proc.stderr[-3000:]
    stats, ledger = assert_invariants(out, 1000)
    assert 0 < stats["n_kept"] < 1000
    # a second, independent run (other parts, in-process) gives the same rows and verdicts
    out2 = tmp_path / "laion2"
    cat_filter(str(LAION_SAMPLE.parent), str(out2), spark=spark, stages="caption", rows_per_part=1000)
    cols = ["key", "status", "stage", "reason", "complexity"]
    a = ledger[cols].sort_values("key").reset_index(drop=True)
    b = read_ledger(out2)[cols].sort_values("key").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


# ---------------------------------------------------------------- bad input

def _write(path, table: pa.Table, row_group_size=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def test_bad_captions_each_land_in_the_ledger(spark, tmp_path):
    good = "A brown dog is chasing a red ball in the park"
    long = "A man riding a horse " + "very " * 2000  # 10,000+ characters
    texts = [None, "", "   \n\t", good, good, long, "Stainless Steel Water Bottle 750ml"]
    urls = [f"http://x/{i}" for i in range(len(texts))]
    urls[4] = urls[3]  # exact duplicate row of row 3
    inp = tmp_path / "in"
    _write(str(inp / "a.parquet"), pa.table({"URL": urls, "TEXT": texts}))
    # non-string captions (an int column) and invalid UTF-8 (binary column) in other files
    _write(str(inp / "b.parquet"), pa.table({"URL": ["http://x/b0", "http://x/b1"], "TEXT": pa.array([7, None])}))
    _write(str(inp / "c.parquet"), pa.table({"URL": ["http://x/c0", "http://x/c1"],
                                             "TEXT": pa.array([b"caf\xe9 \xff bad", "A cat eating fish".encode()],
                                                              pa.binary())}))
    out = str(tmp_path / "out")
    cat_filter(str(inp), out, spark=spark, stages="caption")
    stats, ledger = assert_invariants(out, 11)
    by_url = ledger.set_index("url")
    assert by_url.loc["http://x/0"].reason == S.R_EMPTY_CAPTION
    assert by_url.loc["http://x/1"].reason == S.R_EMPTY_CAPTION
    assert by_url.loc["http://x/2"].reason == S.R_EMPTY_CAPTION
    assert by_url.loc["http://x/5"].reason == S.R_TOO_LONG
    assert by_url.loc["http://x/6"].reason == S.R_NO_ACTION
    assert by_url.loc["http://x/b0"].status == S.FAILED and by_url.loc["http://x/b0"].reason == S.R_NON_STRING
    assert by_url.loc["http://x/b1"].reason == S.R_EMPTY_CAPTION
    assert by_url.loc["http://x/c0"].reason == S.R_INVALID_UTF8 and "\ufffd" in by_url.loc["http://x/c0"].caption
    assert by_url.loc["http://x/c1"].status == S.KEPT
    dup = ledger[ledger.url == "http://x/3"]
    assert sorted(dup.status) == [S.DROPPED, S.KEPT] and (dup.reason == S.R_DUPLICATE).sum() == 1


def test_missing_caption_column_names_the_columns(tmp_path):
    _write(str(tmp_path / "in" / "x.parquet"), pa.table({"URL": ["u"], "ALT": ["a dog running"]}))
    with pytest.raises(InputError, match=r"caption.*columns found: \['URL', 'ALT'\]"):
        cat_filter(str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(InputError, match=r"'TXT' not found.*\['URL', 'ALT'\]"):
        cat_filter(str(tmp_path / "in"), str(tmp_path / "out"), caption_col="TXT")


def test_empty_input_folder_is_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError, match=r"holds no \.parquet, \.csv, \.tsv, \.json or \.jsonl files"):
        cat_filter(str(tmp_path / "in"), str(tmp_path / "out"))


def test_corrupt_parquet_error_names_the_file(spark, tmp_path):
    inp = tmp_path / "in"
    _write(str(inp / "good.parquet"), pa.table({"URL": ["http://x/1"], "TEXT": ["A dog chasing a cat"]}))
    (inp / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(InputError, match="broken.parquet"):
        cat_filter(str(inp), str(tmp_path / "out"))
    # with --skip-bad-files the file is listed in stats.json and the rest is filtered
    stats = cat_filter(str(inp), str(tmp_path / "out2"), spark=spark, stages="caption", skip_bad_files=True)
    assert stats["n_input"] == 1 and stats["bad_files"][0]["file"].endswith("broken.parquet")
