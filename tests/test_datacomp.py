"""DataComp: CommonPool metadata in, score filters composed with the CAT stages, the filtering-track subset file.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_datacomp.py

Input: a CommonPool-shaped Parquet file (uid, url, text, original_width, original_height,
clip_b32_similarity_score, clip_l14_similarity_score, face_bboxes, sha256) with 64 real LAION captions
and urls from ../shared, synthetic uids (32 hex) and scores (a few null / NaN); two COCO photos as
DataComp-downloaded shards. Nothing is fetched here (the download stage: tests/test_retry_downloads.py).
"""
import hashlib
import io
import json
import os
import random
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas as S
from jobs.cat_filter import cat_filter
from jobs.redecide import redecide
from pipeline.filter import datacomp
from pipeline.filter.redecide import NotRedecidable
from pipeline.filter.score_stage import ScoreParams, StagePlan, parse_stages
from pipeline.store.partitions import InputError
from tests.conftest import COCO_MINI, LAION_SAMPLE

N = 64
B32, L14 = "clip_b32_similarity_score", "clip_l14_similarity_score"
SCORE = ScoreParams(min_score=((B32, 0.2),), top_fraction=((L14, 0.5),))


def uid_of(i: int, salt: str = "") -> str:
    return hashlib.md5(f"commonpool-{salt}{i}".encode()).hexdigest()


def commonpool_table(urls, texts, salt="", missing=(3, 17, 40), nan=(8,)) -> pa.Table:
    rng = random.Random(7)
    n = len(urls)
    b32 = [round(rng.uniform(0.1, 0.4), 6) for _ in range(n)]
    l14 = [round(rng.uniform(0.1, 0.4), 6) for _ in range(n)]
    for i in missing:
        if i < n:
            b32[i] = None
    for i in nan:
        if i < n:
            l14[i] = float("nan")
    return pa.table({
        "uid": [uid_of(i, salt) for i in range(n)], "url": urls, "text": texts,
        "original_width": pa.array([640] * n, pa.int64()), "original_height": pa.array([480] * n, pa.int64()),
        B32: pa.array(b32, pa.float64()), L14: pa.array(l14, pa.float64()),
        "face_bboxes": pa.array([[] for _ in range(n)], pa.list_(pa.list_(pa.float64()))),
        "sha256": [hashlib.sha256(u.encode()).hexdigest() for u in urls]})


@pytest.fixture(scope="module")
def commonpool(tmp_path_factory, shared_data):
    laion = pq.read_table(LAION_SAMPLE, columns=["URL", "TEXT"]).slice(0, N).to_pydict()
    path = tmp_path_factory.mktemp("commonpool") / "metadata" / "0000.parquet"
    path.parent.mkdir()
    pq.write_table(commonpool_table(laion["URL"], laion["TEXT"]), path, row_group_size=16)
    return path


@pytest.fixture(scope="module")
def scored_run(spark, commonpool, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dc") / "score-caption")
    stats = cat_filter(str(commonpool.parent), out, spark=spark, stages="score,caption", rows_per_part=32, score=SCORE)
    return out, stats


def ledger_of(out) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(out, "ledger")).set_index("key")


def test_commonpool_score_then_caption(scored_run, commonpool):
    out, stats = scored_run
    table = pq.read_table(commonpool).to_pandas().set_index("uid")
    ledger = ledger_of(out)
    assert sorted(ledger.index) == sorted(table.index)          # keyed by uid, one row per input row
    assert stats["n_input"] == N == stats["n_kept"] + stats["n_dropped"] + stats["n_failed"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    rules = manifest["score"]["rules"]
    assert [(r["column"], r["fraction"]) for r in rules] == [(B32, None), (L14, 0.5)]
    q = rules[1]["threshold"]                                   # the pool's median of l14 (exact at this size)
    values = table[L14].dropna().to_numpy()
    assert q in set(values) and abs((values >= q).sum() - 0.5 * len(values)) <= 1
    assert stats["score"]["rules"] == rules
    for uid, row in table.iterrows():
        r = ledger.loc[uid]
        if row[B32] != row[B32] or row[B32] is None:            # null b32: failed by the first rule
            assert (r.status, r.stage, r.reason, r.score_column) == (S.FAILED, S.STAGE_SCORE, S.R_SCORE_MISSING, B32)
        elif row[B32] < 0.2:
            assert (r.status, r.stage, r.reason, r.score_column) == (S.DROPPED, S.STAGE_SCORE, S.R_SCORE_BELOW, B32)
            assert r.score == row[B32] and r.score_threshold == 0.2
        elif np.isnan(row[L14]):
            assert (r.status, r.reason, r.score_column) == (S.FAILED, S.R_SCORE_MISSING, L14)
        elif row[L14] < q:
            assert (r.stage, r.reason, r.score, r.score_threshold) == (S.STAGE_SCORE, S.R_SCORE_BELOW, row[L14], q)
        else:
            assert r.stage == S.STAGE_CAPTION       # passed the score stage: the caption rules decided
    score_rows = ledger[ledger.stage == S.STAGE_SCORE]
    assert len(score_rows) and score_rows.complexity.isna().all()       # never parsed
    assert stats["n_kept"] > 0 and (ledger[ledger.status == S.KEPT].stage == S.STAGE_CAPTION).all()
    assert list(stats["by_stage"])[:2] == [S.STAGE_SCORE, S.STAGE_CAPTION]
    assert stats["by_stage"][S.STAGE_SCORE]["in"] == N
    html = open(os.path.join(out, "report.html")).read()
    assert S.R_SCORE_BELOW in html and B32 in html


def test_subset_file_is_the_kept_uids(scored_run):
    out, stats = scored_run
    ledger = ledger_of(out)
    subset = np.load(os.path.join(out, "datacomp", "subset_uids.npy"))
    assert subset.dtype == np.dtype("u8,u8")
    kept = sorted(ledger[ledger.status == S.KEPT].index)
    expected = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in kept], np.dtype("u8,u8"))
    expected.sort()
    assert np.array_equal(subset, expected) and stats["n_subset_uids"] == len(kept) > 0
    # DataComp's lookup: np.searchsorted finds every kept uid and no dropped one
    for uid, status in ledger.status.items():
        pair = np.array([(int(uid[:16], 16), int(uid[16:32], 16))], np.dtype("u8,u8"))
        i = int(np.searchsorted(subset, pair)[0])
        assert (i < len(subset) and subset[i] == pair[0]) == (status == S.KEPT), uid
    # the external sort with 8 buckets (the merge path) writes the same bytes; so does the module's CLI
    first = open(os.path.join(out, "datacomp", "subset_uids.npy"), "rb").read()
    assert datacomp.main([out, "--bucket-bits", "3"]) == 0
    assert open(os.path.join(out, "datacomp", "subset_uids.npy"), "rb").read() == first


def test_stages_option():
    assert parse_stages("score", SCORE) == StagePlan(score=True, caption=False, images="none")
    assert parse_stages("score,caption,download,textspot", SCORE) == StagePlan(True, True, "all")
    assert parse_stages("score,download,textspot", SCORE) == StagePlan(True, False, "all")   # no caption rules
    assert parse_stages("auto", SCORE).score and not parse_stages("auto", ScoreParams()).score
    for bad in ("caption,score", "score,caption", "caption,download", "download,textspot", "nonsense"):
        with pytest.raises(InputError):
            parse_stages(bad, ScoreParams() if bad == "score,caption" else SCORE)
    with pytest.raises(InputError, match="leaves out the score stage"):
        parse_stages("caption", SCORE)


def test_score_stage_alone_and_redecide_equals_fresh(spark, scored_run, commonpool, tmp_path):
    """--stages score keeps what the score stage passes, unparsed; a redecide with a stricter --min-score
    (and a smaller top fraction) equals a fresh run, subset file included; a looser one is refused."""
    out, _ = scored_run
    alone = str(tmp_path / "alone")
    stats = cat_filter(str(commonpool.parent), alone, spark=spark, stages="score", rows_per_part=32, score=SCORE)
    ledger = ledger_of(alone)
    assert set(ledger.stage) == {S.STAGE_SCORE} and ledger.complexity.isna().all()
    assert stats["n_kept"] == len(ledger[ledger.status == S.KEPT]) > 0
    assert list(stats["by_stage"]) == [S.STAGE_SCORE]
    assert len(np.load(os.path.join(alone, "datacomp", "subset_uids.npy"))) == stats["n_kept"]

    stricter = ScoreParams(min_score=((B32, 0.25),), top_fraction=((L14, 0.3),))
    fresh = str(tmp_path / "fresh")
    cat_filter(str(commonpool.parent), fresh, spark=spark, stages="score,caption", rows_per_part=32, score=stricter)
    cols = ["status", "stage", "reason", "score_column", "score", "score_threshold", "complexity", "caption"]
    fresh_stats = json.load(open(os.path.join(fresh, "stats.json")))
    for engine in ("local", "spark"):
        into = str(tmp_path / f"into-{engine}")
        got = redecide(out, into, engine=engine, spark=spark, min_score=[(B32, 0.25)], score_top_fraction=[(L14, 0.3)])
        pd.testing.assert_frame_equal(ledger_of(fresh)[cols].sort_index(), ledger_of(into)[cols].sort_index())
        assert (ledger_of(into).score_threshold == 0.25).any()
        assert {k: got[k] for k in ("n_kept", "n_dropped", "n_failed", "by_stage", "score", "n_subset_uids")} == \
            {k: fresh_stats[k] for k in ("n_kept", "n_dropped", "n_failed", "by_stage", "score", "n_subset_uids")}
        subset = "datacomp/subset_uids.npy"
        assert open(os.path.join(fresh, subset), "rb").read() == open(os.path.join(into, subset), "rb").read()
        ca = pd.read_parquet(os.path.join(fresh, "captions")).set_index("key").sort_index()
        cb = pd.read_parquet(os.path.join(into, "captions")).set_index("key").sort_index()
        pd.testing.assert_frame_equal(ca[["passed", "reason", "complexity"]], cb[["passed", "reason", "complexity"]])
    with pytest.raises(NotRedecidable, match="min_score"):
        redecide(out, str(tmp_path / "looser"), engine="local", min_score=[(B32, 0.1)])
    # the score stage alone may be re-decided either way: nothing came after it
    redecide(alone, str(tmp_path / "alone-looser"), engine="local", min_score=[(B32, 0.1)])
    assert ledger_of(str(tmp_path / "alone-looser")).status.eq(S.KEPT).sum() >= stats["n_kept"]


def test_datacomp_shards_are_image_input(spark, tmp_path):
    """Shards DataComp's download_upstream.py wrote (img2dataset webdataset: tar members named by
    img2dataset's key, the sidecar Parquet with uid beside it) are image input keyed by uid.
    (The uid through our own download stage: tests/test_retry_downloads.py.)"""
    photos = sorted(os.listdir(COCO_MINI / "images"))[:3]
    captions = ["A man riding a bike past a red building", "A woman holding an umbrella in the rain",
                "Stainless Steel Water Bottle 750ml"]   # no action: the caption rules drop it
    uids = [uid_of(i, "shards") for i in range(3)]
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = ["000000000", "000000001", "000000002"]
    side = pa.table({"key": keys, "uid": uids, "url": [f"http://pool.invalid/{k}.jpg" for k in keys],
                     "caption": captions, "status": ["success"] * 3, "error_message": [None] * 3})
    pq.write_table(side, shards / "00000.parquet")
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for k, u, c, p in zip(keys, uids, captions, photos):
            for name, data in ((f"{k}.jpg", (COCO_MINI / "images" / p).read_bytes()), (f"{k}.txt", c.encode()),
                               (f"{k}.json", json.dumps({"key": k, "uid": u, "caption": c}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "from-shards")
    cat_filter(str(shards), out, spark=spark)
    ledger = ledger_of(out)
    assert sorted(ledger.index) == sorted(uids) and (ledger.loc[uids[:2]].status == S.KEPT).all(), ledger.to_dict()
    assert ledger.loc[uids[2]].reason == S.R_NO_ACTION
    assert sorted(pd.read_parquet(os.path.join(out, "shards")).key) == sorted(uids[:2])
    assert np.array_equal(np.load(os.path.join(out, "datacomp", "subset_uids.npy")), datacomp.uids_to_array(uids[:2]))
    # --stages textspot: no caption rules, every image text-spotted (an order-preserving subset of the stages)
    out2 = str(tmp_path / "textspot-only")
    stats = cat_filter(str(shards), out2, spark=spark, stages="textspot")
    ledger = ledger_of(out2)
    assert (ledger.status == S.KEPT).all() and (ledger.stage == S.STAGE_TEXTSPOT).all(), ledger.to_dict()
    assert S.STAGE_CAPTION not in stats["by_stage"] and stats["by_stage"][S.STAGE_TEXTSPOT]["in"] == 3


def test_subset_leaves_out_text_masked_pairs_and_says_so(tmp_path, capsys):
    """A uid fetches the pool's original image: a pair kept only with its text masked cannot be listed without
    bringing the text back, so it is left out, counted and warned about; --include-masked lists it anyway."""
    uids = [uid_of(i, "mask") for i in range(4)]
    (tmp_path / "ledger" / "textspot").mkdir(parents=True)
    pq.write_table(pa.table({"key": uids, "status": [S.KEPT, S.KEPT, S.DROPPED, S.KEPT],
                             "reason": [None, S.R_TEXT_MASKED, S.R_TEXT_SPOTTED, None]}),
                   tmp_path / "ledger" / "textspot" / "p0.parquet")
    info = datacomp.write_subset(str(tmp_path), 3)
    subset = datacomp.read_subset(str(tmp_path / "datacomp" / "subset_uids.npy"))
    assert np.array_equal(subset, datacomp.uids_to_array([uids[0], uids[3]]))
    assert info["n_subset_uids"] == 2 and info["datacomp"]["n_masked_not_in_subset"] == 1
    assert "1 pairs kept with their text masked are not in the subset file" in capsys.readouterr().out
    info = datacomp.write_subset(str(tmp_path), 3, include_masked=True)
    assert info["n_subset_uids"] == 3 and info["datacomp"]["n_masked_not_in_subset"] == 0
    assert np.array_equal(datacomp.read_subset(str(tmp_path / "datacomp" / "subset_uids.npy")),
                          datacomp.uids_to_array([uids[0], uids[1], uids[3]]))
