"""Retrying only the transient download failures equals a fresh run in which they succeeded.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_retry_downloads.py

A loopback HTTP server (127.0.0.1, real img2dataset) serves COCO photos; some URLs fail on their first
request only (HTTP 503, a response slower than the timeout) and one is a 404. CommonPool-shaped rows
(uids as keys), so the same test shows the uid going through img2dataset and into the subset file.
"""
import glob
import os
import time
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import schemas as S
from jobs.cat_filter import cat_filter
from jobs.retry_downloads import retry_failed_downloads
from pipeline.filter import datacomp
from pipeline.filter.download import DownloadParams
from pipeline.filter.retry import transient
from tests.conftest import COCO_MINI
from tests.loopback import loopback_server
from tests.test_datacomp import commonpool_table

REQUESTS = Counter()


@pytest.fixture(scope="module")
def flaky_server(shared_data):
    photos = sorted(os.listdir(COCO_MINI / "images"))[10:14]
    files = {p: (COCO_MINI / "images" / p).read_bytes() for p in photos}

    def respond(path):
        REQUESTS[path] += 1
        kind, _, name = path.strip("/").partition("/")
        first = REQUESTS[path] == 1
        if kind == "slow-once" and first:
            time.sleep(3)               # past the 2 s download timeout, the first time only
        if kind == "flaky" and first:
            return 503, None
        return (200, files[name]) if name in files else (404, None)

    with loopback_server(respond) as base:
        yield base, photos


def test_transient_classification():
    for msg in ("HTTP Error 503: Service Unavailable", "timed out", "The read operation timed out",
                "<urlopen error [Errno -3] Temporary failure in name resolution>",
                "<urlopen error [Errno 111] Connection refused>", "HTTP Error 429: Too Many Requests",
                "Remote end closed connection without response"):
        assert transient(msg), msg
    for msg in ("HTTP Error 404: Not Found", "HTTP Error 403: Forbidden", None, "cannot identify image file",
                f"{S.R_BLOCKED_ADDRESS}: 10.0.0.1 is a private address; not connected"):
        assert not transient(msg), msg


def _table(out, folder, cols=None):
    files = glob.glob(os.path.join(out, folder, "**", "*.parquet"), recursive=True)
    return pd.concat([pd.read_parquet(f, columns=cols) for f in files]).set_index("key").sort_index()


def test_retry_equals_a_fresh_run_where_the_downloads_succeeded(spark, flaky_server, tmp_path):
    base, photos = flaky_server
    captions = ["A man riding a bike past a red building", "A woman holding an umbrella in the rain",
                "A dog chasing a ball on the beach", "A boy throwing a frisbee in the park",
                "A cat sleeping on a red sofa"]
    urls = [f"{base}/img/{photos[0]}", f"{base}/flaky/{photos[1]}", f"{base}/flaky/{photos[2]}",
            f"{base}/slow-once/{photos[3]}", f"{base}/img/gone.jpg"]
    table = commonpool_table(urls, captions, salt="retry", missing=(), nan=())
    inp = tmp_path / "pool" / "0000.parquet"
    inp.parent.mkdir()
    pq.write_table(table, inp)
    uids = table.column("uid").to_pylist()
    params = DownloadParams(timeout=2, processes_count=1, thread_count=4, allow_private_addresses=True)
    out = str(tmp_path / "out")
    cat_filter(str(inp.parent), out, spark=spark, download=params)
    first = _table(out, "ledger")
    assert (first.loc[uids[1:], "reason"] == S.R_DOWNLOAD_FAILED).all(), first.to_dict()
    assert first.loc[uids[0]].status == S.KEPT
    # img2dataset carried the uid (save_additional_columns) and the key is the uid
    fetched = pd.concat(pd.read_parquet(f) for f in glob.glob(os.path.join(out, "_work", "images", "*.parquet")))
    assert set(fetched.uid) == set(uids) and (fetched.uid == fetched.cat_key).all()

    stats = retry_failed_downloads(out, spark=spark)
    assert stats["retries"][-1] == {**stats["retries"][-1], "attempt": 1, "selected": 3, "recovered": 3,
                                    "still_failed": 0}
    assert REQUESTS["/img/gone.jpg"] == 1                 # a 404 is not tried again
    assert REQUESTS["/img/" + photos[0]] == 1             # nor a row already decided

    fresh = str(tmp_path / "fresh")                       # the server now serves every URL but the 404
    fresh_stats = cat_filter(str(inp.parent), fresh, spark=spark, download=params)
    a, b = _table(out, "ledger"), _table(fresh, "ledger")
    pd.testing.assert_frame_equal(a, b)
    assert sorted(a[a.status == S.KEPT].index) == sorted(uids[:4])
    pd.testing.assert_frame_equal(_table(out, "shards"), _table(fresh, "shards"))
    for k in ("n_input", "n_kept", "n_dropped", "n_failed", "by_stage", "n_subset_uids"):
        assert stats[k] == fresh_stats[k], k
    subset = open(os.path.join(out, "datacomp", "subset_uids.npy"), "rb").read()
    assert subset == open(os.path.join(fresh, "datacomp", "subset_uids.npy"), "rb").read()
    assert np.array_equal(np.load(os.path.join(out, "datacomp", "subset_uids.npy")), datacomp.uids_to_array(uids[:4]))

    again = retry_failed_downloads(out, spark=spark)      # nothing transient left: an empty attempt
    assert again["retries"][-1]["selected"] == 0 and again["n_kept"] == stats["n_kept"]
    assert REQUESTS["/img/gone.jpg"] == 2                 # fetched once more by the fresh run only
