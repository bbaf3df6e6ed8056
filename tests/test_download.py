"""caption -> download (real img2dataset) -> text-spot against a loopback HTTP server on 127.0.0.1.

The server serves real COCO photos, a photo with its caption burnt in, 404s, non-image bytes and a
response slower than the download timeout. Nothing leaves the machine.
"""
import io
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import schemas as S
from jobs.cat_filter import cat_filter
from pipeline.filter.download import DownloadParams
from tests.conftest import COCO_MINI


REQUESTS = []  # paths the loopback server was asked for: proves a blocked URL was never fetched


@pytest.fixture(scope="module")
def server(shared_data):
    files = {}
    photos = sorted(os.listdir(COCO_MINI / "images"))[:6]
    for name in photos:
        files[f"/img/{name}"] = (COCO_MINI / "images" / name).read_bytes()
    from pipeline.filter.sample import render_text
    import random
    banner = render_text(Image.open(COCO_MINI / "images" / photos[0]).convert("RGB"),
                         "Giraffe eating leaves", random.Random(1))
    buf = io.BytesIO()
    banner.save(buf, format="JPEG")
    files["/img/banner.jpg"] = buf.getvalue()
    files["/img/page.jpg"] = b"<html><body>not an image</body></html>"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            REQUESTS.append(self.path)
            if self.path.startswith("/to-metadata"):  # a redirect into the cloud-metadata range
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
                return
            if self.path.startswith("/slow"):
                time.sleep(4)
            body = files.get(self.path.split("?")[0])  # a query marks which test asked
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if self.path.endswith("page.jpg") else "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", photos
    httpd.shutdown()


def test_metadata_input_downloads_only_passed_rows(spark, server, tmp_path):
    base, photos = server
    rows = [(f"{base}/img/{p}", f"A person riding a bike past a {c} building")
            for p, c in zip(photos, ["red", "tall", "old", "small", "white", "brick"])]
    rows += [
        (f"{base}/img/banner.jpg", "A giraffe eating leaves from a tall tree"),     # shows its caption
        (f"{base}/missing.jpg", "A dog chasing a ball on the beach"),               # 404
        (f"{base}/img/page.jpg", "A woman holding an umbrella in the rain"),        # not an image
        (f"{base}/slow/x.jpg", "A cat sleeping on a sofa"),                         # times out
        ("ftp://127.0.0.1/x.jpg", "A boy throwing a frisbee in the park"),          # not http(s)
        (f"{base}/never-fetched.jpg", "Stainless Steel Water Bottle 750ml"),        # dropped by the caption rules
    ]
    inp = tmp_path / "in" / "meta.parquet"
    inp.parent.mkdir()
    pq.write_table(pa.table({"URL": [u for u, _ in rows], "TEXT": [t for _, t in rows]}), inp)
    out = str(tmp_path / "out")
    stats = cat_filter(str(inp.parent), out, spark=spark,
                       download=DownloadParams(timeout=2, processes_count=1, thread_count=4,
                                               allow_private_addresses=True))  # the loopback server
    ledger = pd.read_parquet(os.path.join(out, "ledger")).set_index("url")
    assert len(ledger) == len(rows) == stats["n_input"]
    assert stats["n_input"] == stats["n_kept"] + stats["n_dropped"] + stats["n_failed"]
    for p in photos:
        assert ledger.loc[f"{base}/img/{p}"].status == S.KEPT, ledger.loc[f"{base}/img/{p}"].to_dict()
    assert ledger.loc[f"{base}/img/banner.jpg"].reason == S.R_TEXT_SPOTTED
    for url in (f"{base}/missing.jpg", f"{base}/img/page.jpg", f"{base}/slow/x.jpg"):
        r = ledger.loc[url]
        assert (r.status, r.stage, r.reason) == (S.FAILED, S.STAGE_DOWNLOAD, S.R_DOWNLOAD_FAILED), r.to_dict()
        assert r.error_message, "img2dataset's error message is kept as evidence"
    assert "404" in ledger.loc[f"{base}/missing.jpg"].error_message
    assert ledger.loc["ftp://127.0.0.1/x.jpg"].reason == S.R_BAD_URL
    assert ledger.loc[f"{base}/never-fetched.jpg"].reason == S.R_NO_ACTION
    # only the rows that passed the caption stage with an http(s) URL were given to img2dataset
    fetched = pd.read_parquet(os.path.join(out, "_work", "download_input"))
    assert len(fetched) == len(rows) - 2
    shards = pd.read_parquet(os.path.join(out, "shards"))
    assert len(shards) == len(photos) and shards.width.max() <= 256  # img2dataset's default image_size
    assert os.path.exists(os.path.join(out, "report.html"))


def test_private_addresses_are_refused_before_connecting(spark, server, tmp_path):
    """Loopback only: 127.0.0.x by IP and by the name localhost (resolved through /etc/hosts), and a
    redirect to 169.254.169.254 (refused before any packet is sent, even with the flag)."""
    base, photos = server
    port = base.rsplit(":", 1)[1]
    caption = "A man riding a brown horse on a sandy beach"
    urls = {"ip": f"{base}/img/{photos[0]}?by-ip", "name": f"http://localhost:{port}/img/{photos[1]}?by-name",
            "redirect": f"{base}/to-metadata?x"}
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"URL": list(urls.values()), "TEXT": [f"{caption} {k}" for k in urls]}), inp)
    params = DownloadParams(timeout=2, processes_count=1, thread_count=2)

    REQUESTS.clear()
    cat_filter(str(inp), str(tmp_path / "default"), spark=spark, download=params)
    ledger = pd.read_parquet(tmp_path / "default" / "ledger").set_index("url")
    for url in urls.values():
        r = ledger.loc[url]
        assert (r.status, r.stage, r.reason) == (S.FAILED, S.STAGE_DOWNLOAD, S.R_BLOCKED_ADDRESS), r.to_dict()
        assert "loopback" in r.error_message, r.error_message
    assert not [p for p in REQUESTS if "?" in p], f"blocked URLs reached the server: {REQUESTS}"

    from dataclasses import replace
    cat_filter(str(inp), str(tmp_path / "allowed"), spark=spark, download=replace(params, allow_private_addresses=True))
    ledger = pd.read_parquet(tmp_path / "allowed" / "ledger").set_index("url")
    assert ledger.loc[urls["ip"]].status == S.KEPT and ledger.loc[urls["name"]].status == S.KEPT
    r = ledger.loc[urls["redirect"]]
    assert r.reason == S.R_BLOCKED_ADDRESS and "169.254.169.254" in r.error_message and "link-local" in r.error_message
    assert "/to-metadata?x" in REQUESTS  # the first hop was fetched, the redirect target was not
