"""The download stage on a real standalone cluster: img2dataset's pyspark distributor fetches in the
executors, each of which installs the address guard, the total deadline and the size cap
(pipeline/filter/download.py GuardedDownloader); and the whole filter with OUTPUT in an S3-compatible store.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_cluster_download.py     # ~3 min on 2 cores

The cluster (a master and one worker on 127.0.0.1, tests/test_gpu_executors.standalone_cluster) and the
S3 server (moto, tests/s3_server.py) are real; the web is a loopback HTTP server. The filter runs as users
run it: `catcurate filter --master spark://...` (spark-submit underneath), in a subprocess.
"""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas as S
from pipeline.store import storage
from scripts import cluster_check
from tests.conftest import COCO_MINI, ROOT
from tests.s3_server import S3Server
from tests.test_gpu_executors import standalone_cluster

CAPTION = "A man riding a brown horse on a sandy beach"
REQUESTS: list[str] = []   # paths the web server was asked for: a blocked URL never shows up here


@pytest.fixture(scope="module")
def web(shared_data):
    photos = sorted(os.listdir(COCO_MINI / "images"))[:3]
    files = {f"/img/{n}": (COCO_MINI / "images" / n).read_bytes() for n in photos}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            REQUESTS.append(self.path)
            path = self.path.split("?")[0]
            if path == "/to-metadata":   # a redirect into the cloud-metadata range
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/iam/")
                self.end_headers()
                return
            if path in ("/trickle", "/endless"):
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.end_headers()
                try:
                    for _ in range(10_000):
                        self.wfile.write(b"x" if path == "/trickle" else b"x" * (1 << 16))
                        self.wfile.flush()
                        if path == "/trickle":
                            time.sleep(0.5)
                except OSError:
                    pass
                return
            body = files.get(path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", photos
    server.shutdown()


def input_file(path, urls: dict[str, str]) -> str:
    pq.write_table(pa.table({"URL": list(urls.values()), "TEXT": [f"{CAPTION} {k}" for k in urls]}), path)
    return str(path)


def filter_on(master: str, inp: str, out: str, *args: str, env: dict) -> None:
    cmd = [str(ROOT / ".venv" / "bin" / "catcurate") if (ROOT / ".venv" / "bin" / "catcurate").exists()
           else os.path.join(os.path.dirname(sys.executable), "catcurate"),
           "filter", "--master", master, "--input", inp, "--output", out, "--rows-per-part", "8",
           "--timeout", "2", "--processes", "1", "--threads", "4", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"


def test_executors_fetch_through_the_guard_and_limits_and_write_to_s3(web, tmp_path, monkeypatch):
    base, photos = web
    refused = {"ip": f"{base}/img/{photos[0]}?a-ip", "name": f"http://localhost:{base.rsplit(':', 1)[1]}"
               f"/img/{photos[1]}?a-name", "metadata": "http://169.254.169.254/latest/meta-data/?a-direct"}
    with S3Server() as s3:
        for k, v in s3.env.items():   # this process reads the store too
            monkeypatch.setenv(k, v)
        s3.make_bucket("data")
        env = {**cluster_check.ENV, **s3.env}
        # the executors' own environment (credentials are never put in the Spark conf): the worker's
        with standalone_cluster(tmp_path / "cluster", [], cores=2, env=s3.env) as master:
            # 1. default policy: every loopback and link-local target is refused in the executors
            REQUESTS.clear()
            out = str(tmp_path / "refused")
            filter_on(master, input_file(tmp_path / "refused.parquet", refused), out, env=env)
            ledger = pd.read_parquet(os.path.join(out, "ledger")).set_index("url")
            for url in refused.values():
                r = ledger.loc[url]
                assert (r.status, r.stage, r.reason) == (S.FAILED, S.STAGE_DOWNLOAD, S.R_BLOCKED_ADDRESS), r.to_dict()
            assert "loopback" in ledger.loc[refused["ip"]].error_message
            assert "link-local" in ledger.loc[refused["metadata"]].error_message
            assert not [p for p in REQUESTS if "?a-" in p], f"refused URLs reached the server: {REQUESTS}"

            # 2. in-house mirror (loopback allowed), OUTPUT in S3: photos fetched and kept, the metadata
            # redirect refused after its first hop, a trickle ends at the deadline, an endless body at the cap
            urls = {"photo0": f"{base}/img/{photos[0]}?b", "photo1": f"{base}/img/{photos[1]}?b",
                    "photo2": f"{base}/img/{photos[2]}?b", "redirect": f"{base}/to-metadata?b",
                    "trickle": f"{base}/trickle?b", "endless": f"{base}/endless?b", "missing": f"{base}/nothing?b"}
            storage.upload(input_file(tmp_path / "mirror.parquet", urls), "s3://data/in/mirror.parquet")
            REQUESTS.clear()
            t0 = time.monotonic()
            filter_on(master, "s3://data/in/", "s3://data/out/mirror", "--allow-private-addresses",
                      "--max-seconds", "4", "--max-image-bytes", str(2 << 20), env=env)
            elapsed = time.monotonic() - t0

            stats = storage.read_json("s3://data/out/mirror/stats.json")
            assert stats["n_input"] == len(urls) == stats["n_kept"] + stats["n_dropped"] + stats["n_failed"]
            ledger_root = "s3://data/out/mirror/ledger"
            ledger = pd.concat([storage.read_parquet(storage.join(ledger_root, d)).to_pandas()
                                for d in storage.listdir(ledger_root)]).set_index("url")
            assert len(ledger) == len(urls) and ledger.index.is_unique
            reason = {k: ledger.loc[u].reason for k, u in urls.items()}
            status = {k: ledger.loc[u].status for k, u in urls.items()}
            assert all(status[f"photo{i}"] == S.KEPT for i in range(3)), status
            assert reason["redirect"] == S.R_BLOCKED_ADDRESS and "169.254.169.254" in ledger.loc[urls["redirect"]].error_message
            assert reason["trickle"] == S.R_DOWNLOAD_TIMEOUT, ledger.loc[urls["trickle"]].to_dict()
            assert reason["endless"] == S.R_TOO_LARGE, ledger.loc[urls["endless"]].to_dict()
            assert reason["missing"] == S.R_DOWNLOAD_FAILED
            assert "/to-metadata?b" in REQUESTS   # the first hop was fetched, its target was not
            shards = storage.read_parquet("s3://data/out/mirror/shards").to_pandas()
            assert sorted(shards.url) == sorted(urls[f"photo{i}"] for i in range(3))
            assert elapsed < 600
