"""Object storage end to end: every path of filter -> distill -> train-eval on s3://, against a real
S3-compatible server on loopback (moto's standalone server, started and stopped here; tests/s3_server.py).

The jobs run as users run them (`make filter|distill|train-eval` with s3:// paths, spark-submit underneath),
with the credentials and AWS_ENDPOINT_URL in the environment, as for any S3-compatible store.
"""
import io
import json
import os
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas as S
from pipeline.store import storage
from tests.conftest import ROOT
from tests.s3_server import S3Server
from tests.test_download import server  # noqa: F401 - the loopback web server fixture

PARTS = ["--rows-per-part", "20"]   # 80 COCO rows: 4 parts


@pytest.fixture(scope="module")
def s3(coco_parquet):
    with S3Server() as store:
        saved = {k: os.environ.get(k) for k in store.env}
        os.environ.update(store.env)
        store.make_bucket("data")
        storage.upload(str(coco_parquet), "s3://data/in/coco.parquet")
        try:
            yield store
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def job_env(s3) -> dict:
    return {**os.environ, **s3.env, "PYTHONPATH": str(ROOT)}


def make(s3, target: str, **variables) -> subprocess.CompletedProcess:
    cmd = ["make", "-s", "-C", str(ROOT), target, *(f"{k}={v}" for k, v in variables.items())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=job_env(s3))
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_table(uri: str) -> pd.DataFrame:
    return storage.read_parquet(uri).to_pandas()


def s3_ledger(out: str) -> pd.DataFrame:
    stages = [storage.join(out, "ledger", d) for d in storage.listdir(storage.join(out, "ledger"))]
    return pd.concat([read_table(d) for d in stages]).sort_values("key").reset_index(drop=True)


def all_objects(prefix: str) -> list[str]:
    fs, path = storage.filesystem(prefix)
    return fs.find(path)


def test_filter_distill_train_eval_all_on_s3(s3):
    out, labels, run = "s3://data/out/filter", "s3://data/out/labels", "s3://data/runs/smoke"
    make(s3, "filter", INPUT="s3://data/in/", OUTPUT=out, FILTER_ARGS=" ".join(PARTS))

    stats = storage.read_json(storage.join(out, "stats.json"))
    assert stats["n_input"] == 80 == stats["n_kept"] + stats["n_dropped"] + stats["n_failed"]
    assert stats["n_kept"] >= 30
    ledger = s3_ledger(out)
    assert len(ledger) == 80 and ledger.key.is_unique, "exactly one ledger row per input row"
    shards = read_table(storage.join(out, "shards"))
    assert set(shards.key) == set(ledger[ledger.status == S.KEPT].key)
    n_parts = len(storage.listdir(storage.join(out, "_done", S.STAGE_CAPTION)))
    assert n_parts >= 4 and len(storage.listdir(storage.join(out, "_done", S.STAGE_TEXTSPOT))) == n_parts, \
        "a marker per part"
    assert storage.exists(storage.join(out, "report.html"))
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    assert manifest["resume_identity"]["input"]["path"] == "s3://data/in"
    assert not [o for o in all_objects("s3://data/out") if "/.tmp-" in o or o.endswith(".lock")], \
        "nothing renamed, no temporaries, the lock released"
    assert not os.path.exists(ROOT / "s3:"), "no local folder named after the URI"

    # re-decided from the stored evidence in the store, into the store (local engine, no Spark)
    from jobs.redecide import redecide
    c2 = redecide(out, "s3://data/out/filter-c2", min_complexity=2, engine="local")
    assert c2["n_input"] == 80 == c2["n_kept"] + c2["n_dropped"] + c2["n_failed"] and c2["n_kept"] <= stats["n_kept"]
    assert len(s3_ledger("s3://data/out/filter-c2")) == 80
    assert set(read_table("s3://data/out/filter-c2/shards").key) <= set(shards.key)

    make(s3, "distill", OUTPUT=out, LABELS=labels, DISTILL_ARGS="--min-count 2 --k 5")
    got = read_table(storage.join(labels, "shards"))
    assert sorted(got.key) == sorted(shards.key), "labels for every kept pair, aligned by key"
    assert storage.exists(storage.join(labels, "vocab.json")) and storage.exists(storage.join(labels, "teacher.json"))

    make(s3, "train-eval", OUTPUT=out, LABELS=labels, RUN=run,
         TRAIN_ARGS="--model catclip-micro --max-steps 6 --batch-size 8 --warmup-steps 2 --checkpoint-every 3 "
                    "--num-workers 1 --holdout-fraction 0.2")
    metrics = storage.read_json(storage.join(run, "metrics.json"))
    assert metrics["train"]["steps"] == 6 and metrics["labels_used"]
    assert {"i2t_r1", "t2i_r1", "rsum"} <= set(metrics["holdout_retrieval"])
    names = set(storage.listdir(storage.join(run, "checkpoints")))
    assert {"step_0000006.pt", "step_0000006.json"} <= names, names
    assert storage.exists(storage.join(run, "export", "open_clip_model.pt"))
    assert storage.exists(storage.join(run, "log.csv")) and storage.exists(storage.join(run, "recall.png"))

    # the same command again: the filter resumes (every part done) and changes nothing
    before = storage.read_json(storage.join(out, "_done", S.STAGE_TEXTSPOT, "f00000-c0000.json"))
    proc = make(s3, "filter", INPUT="s3://data/in/", OUTPUT=out, FILTER_ARGS=" ".join(PARTS))
    assert f"{n_parts} of {n_parts} parts already done" in proc.stdout
    assert storage.read_json(storage.join(out, "_done", S.STAGE_TEXTSPOT, "f00000-c0000.json")) == before
    pd.testing.assert_frame_equal(s3_ledger(out), ledger)

    # other parameters on the same OUTPUT are refused, naming the difference
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), "filter", "INPUT=s3://data/in/", f"OUTPUT={out}",
                           f"FILTER_ARGS={' '.join(PARTS)} --min-chars 6"],
                          capture_output=True, text=True, timeout=600, env=job_env(s3))
    said = proc.stdout + proc.stderr   # spark-submit passes the job's stderr through its stdout
    assert proc.returncode != 0 and "min_chars" in said and "refusing to resume" in said


def test_sigkill_during_filter_on_s3_then_rerun_gives_identical_ledger(s3):
    reference, out = "s3://data/kill/reference", "s3://data/kill/killed"
    cmd = [os.path.join(os.path.dirname(sys.executable), "spark-submit"), "--master", "local[2]",
           "--conf", "spark.ui.enabled=false",
           "--driver-java-options", f"-Dlog4j2.configurationFile={ROOT}/conf/log4j2.properties",
           str(ROOT / "jobs" / "cat_filter.py"), "--input", "s3://data/in/coco.parquet", *PARTS]
    done = subprocess.run(cmd + ["--output", reference], capture_output=True, text=True, timeout=600,
                          env=job_env(s3))
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(cmd + ["--output", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=job_env(s3))
    markers = storage.join(out, "_done", S.STAGE_TEXTSPOT)
    t0 = time.time()
    while len(storage.listdir(markers)) < 1:
        assert proc.poll() is None, "the job ended before the kill"
        assert time.time() - t0 < 400
        time.sleep(0.2)
    from tests.test_reliability import kill_session
    kill_session(proc)   # the driver, its JVM and the Python workers, mid-stage
    finished = storage.listdir(markers)
    n_parts = len(storage.listdir(storage.join(reference, "_done", S.STAGE_TEXTSPOT)))
    assert 1 <= len(finished) < n_parts, "the kill must land inside the text-spot stage"
    assert storage.exists(storage.join(out, ".lock")), "the killed run's lock is left behind"

    rerun = subprocess.run(cmd + ["--output", out], capture_output=True, text=True, timeout=600, env=job_env(s3))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "took over the stale lock" in rerun.stdout
    assert f"{len(finished)} of {n_parts} parts already done" in rerun.stdout
    pd.testing.assert_frame_equal(s3_ledger(out), s3_ledger(reference))
    a, b = (read_table(storage.join(o, "shards")).sort_values("key").reset_index(drop=True)
            for o in (out, reference))
    assert list(a.key) == list(b.key) and (a.jpg == b.jpg).all()


def test_missing_bucket_or_denied_credentials_fail_before_any_work(s3, monkeypatch):
    from jobs.cat_filter import cat_filter
    from jobs.distill_labels import distill_labels

    with pytest.raises(storage.StorageAccessError, match="bucket s3://no-such-bucket does not exist"):
        cat_filter("s3://data/in/", "s3://no-such-bucket/out")      # spark=None: it fails before a session
    with pytest.raises(storage.StorageAccessError, match="bucket s3://no-such-bucket does not exist"):
        cat_filter("s3://no-such-bucket/in/", "s3://data/never")
    assert not all_objects("s3://data/never")
    with pytest.raises(storage.StorageAccessError, match="no-such-bucket"):
        distill_labels("s3://no-such-bucket/filter", "s3://data/labels-never")

    # the CLI: one line, exit status 2, before Spark starts (plain python, no spark-submit needed)
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "cat_filter.py"), "--input", "s3://data/in/",
                          "--output", "s3://no-such-bucket/out"], capture_output=True, text=True, timeout=120,
                         env=job_env(s3))
    assert bad.returncode == 2 and bad.stderr.startswith("cat_filter: error: bucket s3://no-such-bucket does not")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.StorageAccessError, match="denied") as denied:
        cat_filter("s3://data/in/", "s3://data/out/denied")
    assert "AWS_ACCESS_KEY_ID" in str(denied.value), "the message says where credentials come from"


def test_storage_reads_back_what_it_writes_and_lists_without_stale_cache(s3):
    table = pq.read_table(io.BytesIO(storage.read_bytes("s3://data/in/coco.parquet")))
    storage.write_parquet(table.slice(0, 3), "s3://data/unit/a/x.parquet")
    assert storage.files("s3://data/unit/a", ".parquet") == ["s3://data/unit/a/x.parquet"]
    storage.write_parquet(table.slice(3, 2), "s3://data/unit/a/y.parquet")   # listed at once: no cache
    assert storage.read_parquet("s3://data/unit/a").num_rows == 5
    storage.write_json("s3://data/unit/m.json", {"n": 1})
    assert json.loads(storage.read_bytes("s3://data/unit/m.json")) == {"n": 1}
    assert storage.listdir("s3://data/unit") == ["a", "m.json"]
    assert storage.listdir("s3://data/unit/none") == []
    from pipeline.store.partitions import InputError, list_input_files
    assert list_input_files("s3://data/unit/a/*.parquet") == [("s3://data/unit/a/x.parquet", "parquet"),
                                                              ("s3://data/unit/a/y.parquet", "parquet")]
    assert list_input_files("s3://data/unit/a/") == list_input_files("s3://data/unit/a/*.parquet")
    with pytest.raises(InputError, match="no file matches"):
        list_input_files("s3://data/unit/a/*.csv")
    from pipeline.store.partitions import plan_input
    plan = plan_input("s3://data/unit/a/*.parquet", 100)
    assert plan.n_rows == 5 and [c.path for c in plan.chunks] == ["s3://data/unit/a/x.parquet", "s3://data/unit/a/y.parquet"]
    assert plan.fingerprint == plan_input("s3://data/unit/a/", 100).fingerprint, "the same files, the same input"


def test_download_route_with_output_in_the_store(s3, server, tmp_path):  # noqa: F811 - the imported fixture
    """URL list in, OUTPUT on s3://: img2dataset fetches from the loopback web server into a local stage
    (the fetch guard's process never talks to the store) and the shards land in the store."""
    base, photos = server
    rows = [(f"{base}/img/{p}?s3", f"A person riding a bike past a {c} building")
            for p, c in zip(photos[:4], ["red", "tall", "old", "small"])]
    rows += [(f"{base}/img/banner.jpg?s3", "A giraffe eating leaves from a tall tree"),
             (f"{base}/missing.jpg?s3", "A dog chasing a ball on the beach"),
             (f"{base}/never-fetched.jpg?s3", "Stainless Steel Water Bottle 750ml")]
    table = pa.table({"URL": [u for u, _ in rows], "TEXT": [t for _, t in rows]})
    storage.write_parquet(table, "s3://data/urls/meta.parquet")
    out = "s3://data/dl/out"
    make(s3, "filter", INPUT="s3://data/urls/", OUTPUT=out,
         FILTER_ARGS="--allow-private-addresses --timeout 2 --processes 1 --threads 4")
    ledger = s3_ledger(out).set_index("url")
    assert len(ledger) == len(rows)
    for p in photos[:4]:
        assert ledger.loc[f"{base}/img/{p}?s3"].status == S.KEPT
    assert ledger.loc[f"{base}/img/banner.jpg?s3"].reason == S.R_TEXT_SPOTTED
    assert ledger.loc[f"{base}/missing.jpg?s3"].reason == S.R_DOWNLOAD_FAILED
    assert ledger.loc[f"{base}/never-fetched.jpg?s3"].reason == S.R_NO_ACTION
    shards = read_table(storage.join(out, "shards"))
    assert len(shards) == 4 and shards.width.max() <= 256
    assert storage.files(storage.join(out, "_work", "images"), ".parquet"), "img2dataset's shards are in the store"


def test_file_uris_are_plain_local_paths(tmp_path):
    uri = f"file://{tmp_path}/out"
    storage.write_json(storage.join(uri, "_done", "caption", "p1.json"), {"n": 1})
    storage.write_parquet(pa.table({"a": [1, 2]}), storage.join(uri, "captions", "p1.parquet"))
    assert (tmp_path / "out" / "_done" / "caption" / "p1.json").is_file(), "written where the path says"
    assert storage.normalize(uri) == str(tmp_path / "out") and not storage.is_remote(uri)
    assert storage.listdir(uri) == ["_done", "captions"]
    assert storage.files(f"{uri}/captions", ".parquet") == [str(tmp_path / "out" / "captions" / "p1.parquet")]
    assert storage.read_parquet(f"{uri}/captions").num_rows == 2
    assert not list((tmp_path / "out").rglob(".tmp-*")), "local writes go through a temporary and a rename"


def test_the_store_going_away_mid_run_is_one_line_and_a_rerun_resumes(s3):
    """The object store stops answering (every connection cut, nothing listening) while the filter runs:
    one line, no traceback, exit 2; once it is back the same command takes over the lock and finishes."""
    from tests.s3_server import StoreProxy
    out = "s3://data/outage/out"
    with StoreProxy(s3.port) as proxy:
        env = {**job_env(s3), "AWS_ENDPOINT_URL": proxy.endpoint}
        cmd = [os.path.join(os.path.dirname(sys.executable), "catcurate"), "filter", "--input",
               "s3://data/in/coco.parquet", "--output", out, *PARTS]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=env)
        markers = storage.join(out, "_done", S.STAGE_CAPTION)   # read straight from the server, not the relay
        t0 = time.time()
        while not (storage.exists(markers) and storage.listdir(markers)):
            assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proxy.down()
        t_down = time.time()
        stdout, err = proc.communicate(timeout=600)
        waited = time.time() - t_down
        lines = [line.strip() for line in err.replace("\r", "\n").splitlines()
                 if line.strip() and not line.lstrip().startswith("[Stage") and "WARN" not in line]
        print(f"exit {proc.returncode} after {waited:.0f} s; stderr tail:\n" + "\n".join(lines[-8:]))
        assert proc.returncode == 2, err[-4000:]
        assert "Traceback" not in err and "Py4J" not in err, err[-4000:]
        assert lines[-1].startswith("cat_filter: error: ") and proxy.endpoint in lines[-1], lines[-3:]

        proxy.up()
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert again.returncode == 0, again.stderr[-4000:]
    stats = storage.read_json(storage.join(out, "stats.json"))
    assert stats["n_input"] == 80 == stats["n_kept"] + stats["n_dropped"] + stats["n_failed"]
    assert len(s3_ledger(out)) == 80 and s3_ledger(out).key.is_unique
    assert not [o for o in all_objects("s3://data/outage") if o.endswith(".lock")], "the lock released"
