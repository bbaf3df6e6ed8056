"""Reliability of the filter: SIGKILL and resume, the bad-input matrix, a 1M-row input on a capped driver.

The kill test runs the job as users do (spark-submit in its own process group), kills the whole
tree with SIGKILL at several points, reruns, and compares with an uninterrupted run.
"""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

import schemas as S
from jobs.cat_filter import cat_filter
from pipeline.filter.download import DownloadParams
from tests.conftest import COCO_MINI, LAION_SAMPLE, ROOT

SPARK_SUBMIT = os.path.join(os.path.dirname(sys.executable), "spark-submit")


def submit_cmd(inp, out, *extra, job="cat_filter.py"):
    return [SPARK_SUBMIT, "--master", "local[2]", "--conf", "spark.ui.enabled=false",
            "--driver-java-options", f"-Dlog4j2.configurationFile={ROOT}/conf/log4j2.properties",
            str(ROOT / "jobs" / job), "--input", str(inp), "--output", str(out), *extra]


def snapshot(out) -> dict:
    """The job's result: ledger and shard rows, and stats, independent of file names and timings."""
    ledger = pd.read_parquet(os.path.join(out, "ledger")).sort_values("key").reset_index(drop=True)
    shards = pd.read_parquet(os.path.join(out, "shards")).sort_values("key").reset_index(drop=True)
    stats = json.load(open(os.path.join(out, "stats.json")))
    stats.pop("seconds")
    stats.pop("phase_seconds")
    return {"ledger": ledger, "shards": shards, "stats": stats}


def assert_same(a, b):
    pd.testing.assert_frame_equal(a["ledger"], b["ledger"])
    assert list(a["shards"].key) == list(b["shards"].key)
    assert (a["shards"].jpg == b["shards"].jpg).all()
    assert a["stats"] == b["stats"]


def markers(out, stage):
    d = os.path.join(out, "_done", stage)
    return {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)} if os.path.isdir(d) else {}


def kill_when(cmd, out, stage, n_markers, timeout=400):
    """Start the job; SIGKILL its whole process tree once `stage` has n_markers finished parts. When the job
    ends by itself first (or takes too long), the assertion shows the tail of its output."""
    log = f"{out}.{stage}.{n_markers}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    t0 = time.time()
    while len(markers(out, stage)) < n_markers:
        if proc.poll() is not None or time.time() - t0 > timeout:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            tail = open(log, errors="replace").read()[-3000:]
            raise AssertionError(f"job ended (exit {proc.returncode}) before {n_markers} {stage} parts were done, "
                                 f"or ran over {timeout} s; its output ends:\n{tail}")
        time.sleep(0.1)
    kill_session(proc)
    return markers(out, stage)


def kill_session(proc) -> None:
    """SIGKILL every process of the job's session (it was started as a session leader): its process group,
    and pyspark's daemon and Python workers, which move to a process group of their own (pyspark.daemon's
    setpgid) and could otherwise finish a part after the kill (they only get SIGHUP once the daemon sees
    the JVM gone), so that the markers read next are the last ones."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline:
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()   # state, ppid, pgrp, session, ...
            if int(fields[3]) == proc.pid and fields[0] not in "ZX":
                left.append(int(pid))
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes of the killed job's session {proc.pid} outlived SIGKILL for 60 s")


def test_sigkill_at_several_points_then_resume_matches_uninterrupted(spark, sample_parquet, tmp_path):
    small = tmp_path / "input.parquet"  # the first 112 rows of the sample: 7 parts of 16
    pq.write_table(pq.read_table(sample_parquet).slice(0, 112), small, row_group_size=16)
    sample_parquet = small
    args = ("--rows-per-part", "16")
    reference = tmp_path / "reference"
    cat_filter(str(sample_parquet), str(reference), spark=spark, rows_per_part=16)
    n_parts = len(markers(reference, S.STAGE_CAPTION))
    assert n_parts >= 5

    out = tmp_path / "killed"
    cmd = submit_cmd(sample_parquet, out, *args)
    kill_when(cmd, out, S.STAGE_CAPTION, 2)                  # during the caption stage
    done_caption = kill_when(cmd, out, S.STAGE_TEXTSPOT, 2)  # rerun, killed again during text spotting
    assert len(done_caption) < n_parts, "the kill must land before the stage finished"
    caption_done_before = markers(out, S.STAGE_CAPTION)
    text_done_before = markers(out, S.STAGE_TEXTSPOT)

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(text_done_before)} of {n_parts} parts already done" in proc.stdout
    # finished parts were not redone: their markers were not rewritten
    after_caption, after_text = markers(out, S.STAGE_CAPTION), markers(out, S.STAGE_TEXTSPOT)
    assert all(after_caption[f] == t for f, t in caption_done_before.items())
    assert all(after_text[f] == t for f, t in text_done_before.items())
    assert not [f for r, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")], "no temporaries left"
    assert_same(snapshot(out), snapshot(reference))


def test_distill_sigkill_then_resume_matches_uninterrupted(spark, tmp_path):
    """Distillation killed (SIGKILL of the spark-submit tree) after its first embedded shard, rerun."""
    from bench.bench_distill import build_coco_filtered
    from jobs.distill_labels import distill_labels
    filtered = build_coco_filtered(tmp_path / "filtered", captions_per_image=1, n_shards=4)
    reference = tmp_path / "reference"
    distill_labels(str(filtered), str(reference), spark=spark, min_count=2)
    out = tmp_path / "killed"
    cmd = submit_cmd(filtered, out, "--min-count", "2", job="distill_labels.py")
    done = kill_when(cmd, out, "embed", 1)
    assert len(done) < 4, "the kill must land before every shard was embedded"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = markers(out, "embed")
    assert all(after[f] == t for f, t in done.items()), "embedded shards were not redone"
    for name in sorted(os.listdir(reference / "shards")):
        pd.testing.assert_frame_equal(pd.read_parquet(reference / "shards" / name), pd.read_parquet(out / "shards" / name))


# ---------------------------------------------------------------- the bad-input matrix

def _jpeg(path_or_img, size=None) -> bytes:
    img = Image.open(path_or_img).convert("RGB") if isinstance(path_or_img, (str, os.PathLike)) else path_or_img
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A valid PNG header declaring 100,000 x 100,000 pixels; decoding it would need 30 GB."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


BAD_CASES = {
    # case -> (expected status, expected reason) ; documented in the README table
    "good photo": (S.KEPT, None),
    "null caption": (S.DROPPED, S.R_EMPTY_CAPTION),
    "huge caption (50,000 chars)": (S.DROPPED, S.R_TOO_LONG),
    "non-image bytes (HTML)": (S.FAILED, S.R_DECODE_ERROR),
    "decompression bomb (100k x 100k PNG)": (S.FAILED, S.R_DECODE_ERROR),
    "truncated JPEG": (S.FAILED, S.R_DECODE_ERROR),
    "duplicate row (same url + caption)": (S.DROPPED, S.R_DUPLICATE),
    "duplicate key, other content": (S.KEPT, None),
    "img2dataset failed download": (S.FAILED, S.R_DOWNLOAD_FAILED),
    "caption column of ints (schema drift)": (S.FAILED, S.R_NON_STRING),
    "unreachable URL (metadata file)": (S.FAILED, S.R_DOWNLOAD_FAILED),
    "row in a corrupt row group": (S.FAILED, S.R_READ_ERROR),
    "webdataset row whose image is cut off a truncated tar": (S.FAILED, S.R_DOWNLOAD_FAILED),
}


def build_bad_input(root) -> dict[str, str]:
    """One folder with every bad case; returns case -> url (each case's url is unique)."""
    photos = sorted(os.listdir(COCO_MINI / "images"))
    good = _jpeg(COCO_MINI / "images" / photos[0])
    action = "A young man riding a brown horse on a sandy beach"
    os.makedirs(root)
    rows = [  # img2dataset-style file: key, url, caption, status, error_message, jpg
        ("k0", "good photo", action, "success", good),
        ("k1", "null caption", None, "success", good),
        ("k2", "huge caption (50,000 chars)", "A dog running " * 3600, "success", good),
        ("k3", "non-image bytes (HTML)", "A cat sitting on a mat", "success", b"<html>404</html>"),
        ("k4", "decompression bomb (100k x 100k PNG)", "A boy flying a kite", "success", _bomb_png()),
        ("k5", "truncated JPEG", "A woman riding a bike", "success", good[: len(good) // 3]),
        ("k6", "duplicate row (same url + caption)", action, "success", good),
        ("k0", "duplicate key, other content", "A little girl eating a red apple", "success",
         _jpeg(COCO_MINI / "images" / photos[1])),
        ("k8", "img2dataset failed download", "A dog chasing a ball", "failed_to_download", None),
    ]
    urls = {case: f"http://bad.invalid/{i}" for i, (_, case, *_r) in enumerate(rows)}
    urls["duplicate row (same url + caption)"] = urls["good photo"]
    pq.write_table(pa.table({
        "key": [r[0] for r in rows], "url": [urls[r[1]] for r in rows], "caption": [r[2] for r in rows],
        "status": [r[3] for r in rows], "error_message": [None if r[3] == "success" else "HTTP 404" for r in rows],
        "jpg": pa.array([r[4] for r in rows], pa.binary())}), os.path.join(root, "a_images.parquet"))
    # schema drift: a metadata file with URL/TEXT, TEXT typed int64 in one file, and unreachable URLs
    urls["caption column of ints (schema drift)"] = "http://127.0.0.1:9/int.jpg"
    pq.write_table(pa.table({"URL": ["http://127.0.0.1:9/int.jpg"], "TEXT": pa.array([42], pa.int64())}),
                   os.path.join(root, "b_drift.parquet"))
    urls["unreachable URL (metadata file)"] = "http://127.0.0.1:9/gone.jpg"  # port 9: connection refused
    pq.write_table(pa.table({"URL": ["http://127.0.0.1:9/gone.jpg"], "TEXT": ["A man throwing a frisbee"]}),
                   os.path.join(root, "c_unreachable.parquet"))
    # an empty shard
    pq.write_table(pa.table({"URL": pa.array([], pa.string()), "TEXT": pa.array([], pa.string())}),
                   os.path.join(root, "d_empty.parquet"))
    # a file whose first row group's pages are corrupt (the footer still reads)
    path = os.path.join(root, "e_corrupt_rowgroup.parquet")
    urls["row in a corrupt row group"] = "http://bad.invalid/rg0"
    pq.write_table(pa.table({"URL": ["http://bad.invalid/rg0", "http://bad.invalid/rg1"],
                             "TEXT": ["A horse eating grass " * 20, "A bird flying over a lake " * 20]}),
                   path, row_group_size=1, compression="zstd")
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(0).column(1)
    data = bytearray(open(path, "rb").read())
    start = col.data_page_offset + 12
    data[start:start + 40] = os.urandom(40)
    open(path, "wb").write(bytes(data))
    # unreadable files: garbage and a truncated Parquet (skipped with --skip-bad-files, listed in stats)
    open(os.path.join(root, "f_garbage.parquet"), "wb").write(b"not parquet at all")
    whole = open(os.path.join(root, "a_images.parquet"), "rb").read()
    open(os.path.join(root, "g_truncated.parquet"), "wb").write(whole[: len(whole) // 2])
    # webdataset shard (img2dataset output) whose tar is truncated: the second image is lost
    wds = os.path.join(root, "wds")
    os.makedirs(wds)
    big = _jpeg(COCO_MINI / "images" / photos[2], size=(640, 480))
    with tarfile.open(os.path.join(wds, "00000.tar"), "w") as tf:
        for key, blob in (("w0", good), ("w1", big)):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    tar = os.path.join(wds, "00000.tar")
    raw = open(tar, "rb").read()
    open(tar, "wb").write(raw[: len(raw) - len(big) // 2 - 1024])
    urls["webdataset row whose image is cut off a truncated tar"] = "http://bad.invalid/w1"
    urls["webdataset good photo"] = "http://bad.invalid/w0"
    pq.write_table(pa.table({"key": ["w0", "w1"], "url": ["http://bad.invalid/w0", "http://bad.invalid/w1"],
                             "caption": ["A tall man riding a blue bike on a busy street", "A dog catching a frisbee"],
                             "status": ["success", "success"], "error_message": [None, None]}),
                   os.path.join(wds, "00000.parquet"))
    return urls


def test_bad_input_matrix_through_filter_and_distill(spark, tmp_path):
    inp = tmp_path / "bad"
    urls = build_bad_input(str(inp))
    out = tmp_path / "out"
    stats = cat_filter(str(inp), str(out), spark=spark, skip_bad_files=True,
                       download=DownloadParams(timeout=2, processes_count=1, thread_count=2,
                                               allow_private_addresses=True))  # 127.0.0.1:9 must be tried
    ledger = pd.read_parquet(out / "ledger")
    assert ledger.key.is_unique
    assert len(ledger) == stats["n_input"] == stats["n_kept"] + stats["n_dropped"] + stats["n_failed"]
    assert ledger[ledger.status != S.KEPT].reason.notna().all()
    assert sorted(os.path.basename(b["file"]) for b in stats["bad_files"]) == ["f_garbage.parquet", "g_truncated.parquet"]
    outcome = {}
    for case, url in urls.items():
        rows = ledger[ledger.url == url]
        if case == "duplicate row (same url + caption)":
            rows = rows[rows.reason == S.R_DUPLICATE]
        elif case == "good photo":
            rows = rows[rows.reason != S.R_DUPLICATE]
        assert len(rows) == 1, (case, rows)
        outcome[case] = (rows.iloc[0].status, rows.iloc[0].reason)
    assert outcome["webdataset good photo"] == (S.KEPT, None)
    for case, expected in BAD_CASES.items():
        assert outcome[case] == expected, case
    # the duplicate key kept its content and got a new, traceable key
    assert ledger[ledger.url == urls["duplicate key, other content"]].key.iloc[0] == "k0~2"

    from jobs.distill_labels import distill_labels
    labels = tmp_path / "labels"
    distill_labels(str(out), str(labels), spark=spark, min_count=1, epochs=5)
    got = pd.read_parquet(labels / "shards")
    kept = pd.read_parquet(out / "shards")
    assert set(got.key) == set(kept.key)
    assert got.object_indices.map(len).gt(0).all()


# ---------------------------------------------------------------- bounded memory

def test_million_rows_with_a_1g_driver(tmp_path):
    """1,000,000 LAION-style rows, caption stage, driver capped at 1 GiB: no OOM, invariant holds."""
    base = pq.read_table(LAION_SAMPLE, columns=["URL", "TEXT"])
    n_rep = 1000
    inp = tmp_path / "million"
    inp.mkdir()
    for f in range(4):  # 4 files x 250 row groups of 1,000 rows
        with pq.ParquetWriter(inp / f"part-{f}.parquet", base.schema) as w:
            for r in range(n_rep // 4):
                i = f * (n_rep // 4) + r
                urls = pc.binary_join_element_wise(base.column("URL"), pa.scalar(f"?copy={i}"), "")
                w.write_table(pa.table({"URL": urls, "TEXT": base.column("TEXT")}))
    out = tmp_path / "out"
    cmd = submit_cmd(inp, out, "--stages", "caption", "--rows-per-part", "50000")
    cmd[1:1] = ["--driver-memory", "1g"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.load(open(out / "stats.json"))
    assert stats["n_input"] == 1_000_000 == stats["n_kept"] + stats["n_dropped"] + stats["n_failed"]
    # same caption, other url: not a duplicate; the ledger has a row per input row with a unique key
    counts = pq.read_table(out / "ledger", columns=["key"]).column("key")
    assert len(counts) == 1_000_000 and pc.count_distinct(counts).as_py() == 1_000_000
