"""Hardening, part 2 (issue 25): content identity for resume and re-decide, outputs apart from inputs,
webdataset keys every reader takes, labels from another run, one-line errors, zombie lock holders,
over-long CSV fields. Small real inputs; the Spark session of conftest where a job must run."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cat_filter import cat_filter, main as filter_main
from pipeline.store import partitions as P
from tests.conftest import ROOT

CAPTIONS = ["A dog chasing a red ball on the grass", "Stainless Steel Water Bottle 750ml",
            "A young girl riding a white horse", "A man is throwing a blue frisbee"]


def small_input(folder, name="in.parquet") -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    pq.write_table(pa.table({"URL": [f"http://x/{i}" for i in range(len(CAPTIONS))], "TEXT": CAPTIONS}), path)
    return path


def tree(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


# ---------------------------------------------------------------- 2: outputs apart from inputs

def test_output_equal_to_inside_or_around_the_input_is_refused_naming_both(tmp_path, capsys):
    inp = small_input(tmp_path / "in")
    (tmp_path / "in" / "sub").mkdir()
    os.symlink(tmp_path / "in", tmp_path / "link")
    cases = [(str(tmp_path / "in"), str(tmp_path / "in")),                       # OUTPUT == INPUT folder
             (str(tmp_path / "in"), str(tmp_path / "in" / "out")),               # inside it
             (str(tmp_path / "in"), str(tmp_path / "link" / "sub" / ".." / "out")),  # via a symlink and '..'
             (inp, inp),                                                         # the INPUT file as OUTPUT
             (inp, str(tmp_path)),                                               # OUTPUT containing INPUT
             (str(tmp_path / "in" / "**" / "*.parquet"), str(tmp_path / "in" / "sub" / "o"))]  # recursive glob
    before = tree(tmp_path / "in")
    for given_in, given_out in cases:
        with pytest.raises(P.InputError, match=r"OUTPUT .* (is|is inside|contains) INPUT .*outputs must lie apart"):
            cat_filter(given_in, given_out, stages="caption")
        assert filter_main(["--input", given_in, "--output", given_out, "--stages", "caption"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cat_filter: error: OUTPUT") and "\n" not in err and os.path.abspath(given_out) in err
    assert tree(tmp_path / "in") == before, "nothing written into the input"
    # a glob of one folder level with OUTPUT beside its files is fine (the pattern cannot reach it)
    P.check_apart({"INPUT": str(tmp_path / "in" / "*.parquet")}, {"OUTPUT": str(tmp_path / "in" / "out")})


def test_apart_check_on_stores_and_for_every_job():
    with pytest.raises(P.InputError, match="is inside"):
        P.check_apart({"INPUT": "s3://bucket/laion"}, {"OUTPUT": "s3a://bucket/laion/out/"})
    with pytest.raises(P.InputError, match="contains"):
        P.check_apart({"INPUT": "s3://bucket/laion/a.parquet"}, {"OUTPUT": "s3://bucket/laion"})
    P.check_apart({"INPUT": "s3://bucket/laion"}, {"OUTPUT": "s3://bucket/laion-out"})   # a prefix, not a folder
    P.check_apart({"INPUT": "s3://bucket/laion"}, {"OUTPUT": "s3://other/laion"})


def test_labels_run_and_into_inside_their_inputs_are_refused(tmp_path):
    from jobs.distill_labels import distill_labels
    from jobs.redecide import redecide
    from model_training.config import TrainConfig
    from model_training.train import train
    out = tmp_path / "filter"
    (out / "shards").mkdir(parents=True)
    small_input(out / "shards", "00000.parquet")
    with pytest.raises(P.InputError, match="OUTPUT .* is inside INPUT"):
        distill_labels(str(out), str(out / "labels"))
    with pytest.raises(P.InputError, match="--run .* is inside --shards"):
        train(TrainConfig(shards=str(out / "shards"), run_dir=str(out / "shards" / "run")))
    inp = small_input(tmp_path / "in")
    (out / "manifest.json").write_text(json.dumps({"finished": "x", "resume_identity": {
        "input": {"path": os.path.dirname(inp), "fingerprint": "f"}, "stages": "auto", "rows_per_part": 10,
        "caption": {}}}))
    with pytest.raises(P.InputError, match="INTO .* is inside the source's INPUT"):
        redecide(str(out), str(tmp_path / "in" / "c2"), min_complexity=2)
    with pytest.raises(P.InputError, match="INTO .* is inside SOURCE"):
        redecide(str(out), str(out / "c2"), min_complexity=2)
    assert tree(tmp_path / "in") == ["in.parquet"] and not (out / "labels").exists() and not (out / "c2").exists()


# ---------------------------------------------------------------- 1: content identity for resume and re-decide

def _csv(path, captions):
    with open(path, "w") as fh:
        fh.write("URL,TEXT\n" + "".join(f"http://x/{i},{c}\n" for i, c in enumerate(captions)))
    return str(path)


def _same_length_edit(path, old: bytes, new: bytes):
    """Replace bytes in place, same length, and put the mtime back (touch -r)."""
    assert len(old) == len(new)
    st = os.stat(path)
    data = open(path, "rb").read()
    assert data.count(old) == 1
    open(path, "wb").write(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.path.getsize(path) == st.st_size


def test_a_same_length_csv_edit_with_the_mtime_put_back_is_a_changed_input(spark, tmp_path):
    src = _csv(tmp_path / "in.csv", ["A dog chasing a red ball on the grass", "A young girl riding a white horse"])
    out = tmp_path / "out"
    cat_filter(src, str(out), spark=spark, stages="caption")
    _same_length_edit(src, b"red ball", b"big cats")
    plan = P.plan_input(src, 100, work_dir=str(tmp_path / "work"))     # the conversion is redone, not reused
    assert b"big cats" in b"".join(P.read_chunk(plan.chunks[0], ["TEXT"]).column(0).to_pylist())
    with pytest.raises(P.ParamsChanged, match=r"input file\(s\) changed since .*: in\.csv; refusing to resume"):
        cat_filter(src, str(out), spark=spark, stages="caption")


@pytest.fixture(scope="module")
def image_source(spark, coco_parquet, tmp_path_factory):
    """A finished filter run on 6 COCO pairs, written uncompressed so an image can be swapped in place;
    content tags hash only the first and last KiB of Parquet files (as they do the first and last 64 KiB
    of large files), so the swap leaves the file's tag unchanged."""
    base = tmp_path_factory.mktemp("content")
    inp = str(base / "in" / "coco.parquet")
    os.makedirs(os.path.dirname(inp))
    pq.write_table(pq.read_table(coco_parquet).slice(0, 6), inp, compression="none", use_dictionary=False,
                   write_statistics=False)
    mp = pytest.MonkeyPatch()
    mp.setattr(P, "HEAD_TAIL_BYTES", 1024)
    out = str(base / "source")
    cat_filter(inp, out, spark=spark, rows_per_part=3)
    yield {"input": inp, "source": out, "base": base}
    mp.undo()


def _copy_source(image_source, tmp_path) -> str:
    import shutil
    dst = str(tmp_path / "source")
    shutil.copytree(image_source["source"], dst)
    return dst


def test_redecide_refuses_to_copy_an_image_that_is_not_the_one_spotted(image_source, tmp_path):
    import io

    from PIL import Image

    from jobs.redecide import main as redecide_main, redecide
    from pipeline.filter.image_stage import ChangedImage
    src = image_source["source"]
    kept = pq.read_table(os.path.join(src, "shards")).column("key").to_pylist()
    assert kept, "some pairs kept"
    row = next(r for r in pq.read_table(image_source["input"]).to_pylist() if r["key"] == kept[0])
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="JPEG")
    swapped = buf.getvalue() + b"\0" * (len(row["jpg"]) - len(buf.getvalue()))
    inp = str(tmp_path / "in" / "coco.parquet")   # the source's input, moved and edited
    os.makedirs(os.path.dirname(inp))
    import shutil
    shutil.copy2(image_source["input"], inp)
    _same_length_edit(inp, row["jpg"], swapped)
    manifest_path = os.path.join(_copy_source(image_source, tmp_path), "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["resume_identity"]["input"]["path"] = os.path.dirname(inp) if False else inp
    json.dump(manifest, open(manifest_path, "w"))
    source = os.path.dirname(manifest_path)
    assert P.changed_files(manifest["resume_identity"]["input"]["content"], P.input_content(inp)) == []
    with pytest.raises(ChangedImage, match=rf"key {kept[0]!r}.*input changed since.*coco\.parquet"):
        redecide(source, str(tmp_path / "into"), min_conf=0.7, engine="local")
    assert redecide_main(["--source", source, "--into", str(tmp_path / "into2"), "--min-conf", "0.7"]) == 2
    assert not os.path.exists(os.path.join(tmp_path, "into", "stats.json"))


# ---------------------------------------------------------------- 3: webdataset keys every reader takes

def test_every_key_gives_a_sample_the_webdataset_library_reads(tmp_path):
    import io

    import webdataset
    from PIL import Image

    import schemas as S
    from model_training.data import _tar_rows
    from pipeline.store import webdataset as W
    keys = ["", "a.b", "x/y", ".hidden", "__meta__", "%empty", "%2E", "caf\u00e9 1", "0123_4~2", "-"]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="JPEG")
    rows = [{"key": k, "caption": f"caption {i}", "url": f"http://x/{i}", "jpg": buf.getvalue(), "width": 8,
             "height": 8, "objects": [], "attributes": [], "actions": [], "complexity": 1, "has_action": True}
            for i, k in enumerate(keys)]
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    pq.write_table(S.SHARD.from_rows(rows), out / "shards" / "00000.parquet")
    assert W.convert(str(out)) == 1
    sizes = json.loads((out / "webdataset" / "sizes.json").read_text())
    samples = list(webdataset.WebDataset(str(out / "webdataset" / "00000.tar"), shardshuffle=False))
    assert len(samples) == sizes["00000.tar"] == len(keys)
    assert all({"jpg", "txt", "json"} <= set(s) for s in samples)
    assert [json.loads(s["json"])["key"] for s in samples] == keys
    assert len({s["__key__"] for s in samples}) == len(keys)
    assert [r[0] for r in _tar_rows(str(out / "webdataset" / "00000.tar"))] == keys   # our reader: the keys themselves


# ---------------------------------------------------------------- 9: a rerun right after a crash

def test_a_lock_left_by_a_killed_run_not_yet_reaped_is_taken_over(tmp_path):
    import signal
    import time

    from pipeline.store.locks import FolderLock, LockHeld, pid_alive, process_start
    out = tmp_path / "out"
    code = ("import time; from pipeline.store.locks import folder_lock\n"
            f"folder_lock({str(out)!r}, 'cat_filter').acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        start = process_start(holder.pid)
        with pytest.raises(LockHeld):
            FolderLock(str(out), "cat_filter").acquire()
        os.kill(holder.pid, signal.SIGKILL)   # killed, and not reaped: a zombie, as a killed driver whose
        deadline = time.time() + 10           # parent is slow to reap it stays
        while open(f"/proc/{holder.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.time() < deadline
            time.sleep(0.05)
        assert not pid_alive(holder.pid, start)
        lock = FolderLock(str(out), "cat_filter").acquire()   # the rerun takes it over at once
        lock.release()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- 4: labels from another filter run

from tests.test_hardening_train import shards as coco_shards  # noqa: E402,F401 - coco-mini, 4 shard files, 80 pairs


def _labels_for(labels, shards, rename=lambda k: k):
    import schemas as S
    from tests.vocab_util import write_vocab
    (labels / "shards").mkdir(parents=True)
    for shard in sorted(shards.glob("*.parquet")):
        keys = pq.read_table(shard, columns=["key"]).column("key").to_pylist()
        pq.write_table(S.LABELS.from_rows([{"key": rename(k), "object_indices": [0], "object_probs": [1.0],
                                            "attribute_indices": [1], "attribute_probs": [1.0]} for k in keys]),
                       labels / "shards" / shard.name)
    write_vocab(labels, list("abcde"), list("xy"))
    return labels


def test_labels_that_match_no_key_are_refused_with_the_counts(coco_shards, tmp_path, capsys):
    from model_training.config import TrainConfig
    from model_training.train import main as train_main, train
    other = _labels_for(tmp_path / "other-labels", coco_shards, rename=lambda k: "other-run-" + k)
    base = dict(shards=str(coco_shards), labels=str(other), model="catclip-micro", batch_size=8, num_workers=1,
                max_steps=1, warmup_steps=1, log_every=1, shuffle_buffer=8)
    with pytest.raises(ValueError, match=r"no label for any row of 4 of 4 shard file\(s\).*0 of 80 keys labelled"):
        train(TrainConfig(**base, run_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists(), "refused before anything was written"
    with pytest.raises(SystemExit) as e:
        train_main(["--shards", str(coco_shards), "--labels", str(other), "--run", str(tmp_path / "run"),
                    "--model", "catclip-micro", "--max-steps", "1", "--num-workers", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("train: error: --labels") and "\n" not in err
    summary = train(TrainConfig(**base, run_dir=str(tmp_path / "run2"), allow_missing_labels=True))
    assert summary["labels"]["match_rate"] == 0.0 and summary["labels"]["n_keys"] == 80
    matching = _labels_for(tmp_path / "labels", coco_shards)
    summary = train(TrainConfig(**{**base, "labels": str(matching)}, run_dir=str(tmp_path / "run3")))
    assert summary["labels"]["match_rate"] == 1.0 and summary["labels"]["n_shards_unlabelled"] == 0


# ---------------------------------------------------------------- 7: one-line errors (trainer checkpoints)

def test_a_corrupt_newest_checkpoint_falls_back_and_a_crafted_pickle_is_one_line(coco_shards, tmp_path, capsys):
    import pickle

    from model_training.config import TrainConfig
    from model_training.run_dir import list_checkpoints
    from model_training.train import main as train_main, train
    run = tmp_path / "run"
    cfg = dict(shards=str(coco_shards), run_dir=str(run), model="catclip-micro", batch_size=8, num_workers=1,
               max_steps=3, warmup_steps=1, log_every=1, checkpoint_every=1, shuffle_buffer=8)
    train(TrainConfig(**cfg, stop_after=2))
    (step1, _), (step2, newest) = list_checkpoints(run)
    assert (step1, step2) == (1, 2)
    newest.write_bytes(newest.read_bytes()[:1000])        # truncated by a crash
    capsys.readouterr()
    summary = train(TrainConfig(**cfg))
    out = capsys.readouterr().out
    assert f"{newest} is not a checkpoint of this trainer (unreadable" in out and "falling back" in out
    assert "resumed from" in out and "step_0000001" in out.split("resumed from")[1].split("\n")[0]
    assert summary["steps"] == 3 and summary["finished"]

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "PWNED"),))
    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps({"trainee": Evil()}))
    with pytest.raises(SystemExit) as e:
        train_main(["--shards", str(coco_shards), "--run", str(tmp_path / "run2"), "--model", "catclip-micro",
                    "--max-steps", "1", "--num-workers", "1", "--resume", str(crafted)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and not (tmp_path / "PWNED").exists()
    assert err == f"train: error: {crafted} is not a checkpoint of this trainer (holds more than tensors: UnpicklingError)"


# ---------------------------------------------------------------- 7: an interrupted filter run

@pytest.mark.parametrize("how", ["ctrl-c under spark-submit", "sigterm to python jobs/cat_filter.py"])
def test_an_interrupted_filter_run_says_so_in_one_line_and_releases_the_lock(tmp_path, how):
    import signal
    import time

    from pipeline.store.locks import LOCK_NAME
    from tests.conftest import LAION_SAMPLE
    from tests.test_reliability import submit_cmd
    inp, out = tmp_path / "in.parquet", tmp_path / "out"
    pq.write_table(pq.read_table(LAION_SAMPLE).slice(0, 48), inp, row_group_size=8)
    args = ["--stages", "caption", "--rows-per-part", "8"]
    cmd = submit_cmd(inp, out, *args) if how.startswith("ctrl-c") else \
        [sys.executable, str(ROOT / "jobs" / "cat_filter.py"), "--input", str(inp), "--output", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 240
    while not (out / "_done" / "caption").is_dir() or not os.listdir(out / "_done" / "caption"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    if how.startswith("ctrl-c"):
        os.killpg(proc.pid, signal.SIGINT)   # what a terminal sends to the whole foreground job
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not line.lstrip().startswith("[Stage") and "WARN" not in line]
    assert proc.returncode == 130, err[-3000:]
    assert (f"cat_filter: interrupted; finished parts are kept and {out} is unlocked - rerun the same command to "
            f"resume") in lines, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------- 7: one-line errors (re-decide)

@pytest.mark.parametrize("damage,message", [
    ("ocr", r"1 evidence file\(s\) of .* are missing: .*ocr/f00000-c0001\.parquet"),
    ("captions", r"1 evidence file\(s\) of .* are missing: .*captions/f00000-c0000\.parquet"),
    ("garbage", r"manifest\.json is not a manifest this product wrote \(not JSON"),
    ("edited", r"manifest\.json is not a manifest this product wrote \(no rows_per_part"),
])
def test_damaged_evidence_or_manifest_is_one_line_before_anything_is_written(image_source, tmp_path, capsys,
                                                                             damage, message):
    from jobs.redecide import main as redecide_main
    source = _copy_source(image_source, tmp_path)
    if damage in ("ocr", "captions"):
        os.remove(os.path.join(source, damage, f"f00000-c000{1 if damage == 'ocr' else 0}.parquet"))
    elif damage == "garbage":
        open(os.path.join(source, "manifest.json"), "w").write("{not json")
    else:
        m = json.load(open(os.path.join(source, "manifest.json")))
        del m["resume_identity"]["rows_per_part"]
        json.dump(m, open(os.path.join(source, "manifest.json"), "w"))
    into = tmp_path / "into"
    assert redecide_main(["--source", source, "--into", str(into), "--min-conf", "0.7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("redecide: error: ") and "\n" not in err
    import re
    assert re.search(message, err), err
    assert not into.exists(), "nothing written into INTO"
    if damage == "garbage":   # a resumed filter says the same, in one line
        assert filter_main(["--input", image_source["input"], "--output", source]) == 2
        assert "is not a manifest this product wrote" in capsys.readouterr().err


# ---------------------------------------------------------------- 8: one over-long field

def test_a_csv_row_longer_than_the_read_block_fails_alone(spark, tmp_path, monkeypatch):
    import gzip

    import pandas as pd

    import schemas as S
    rows = [f"http://x/{i},A dog chasing a red ball number {i}\n" for i in range(10)]
    rows.insert(5, 'http://x/long,"' + "a black cat chasing a bird " * 330_000 + '"\n')   # ~8.9 MB: spans two 4 MiB blocks
    src = tmp_path / "in.csv.gz"
    with gzip.open(src, "wt") as fh:
        fh.write("URL,TEXT\n" + "".join(rows))
    with monkeypatch.context() as m:   # the reader as it was: one fixed 4 MiB block
        m.setattr(P, "CSV_MAX_BLOCK_BYTES", P.CSV_BLOCK_BYTES)
        with pytest.raises(P.InputError, match="straddl"):
            P.plan_input(str(src), 100, work_dir=str(tmp_path / "work"))
    out = tmp_path / "out"
    stats = cat_filter(str(src), str(out), spark=spark, stages="caption")
    assert stats["n_input"] == 11
    ledger = pd.read_parquet(out / "ledger", columns=["url", "status", "reason"])
    long = ledger[ledger.url == "http://x/long"].iloc[0]
    assert long.reason == S.R_TOO_LONG and len(ledger) == 11
    assert (ledger[ledger.url != "http://x/long"].reason != S.R_TOO_LONG).all()


# ---------------------------------------------------------------- 6: downloads that never end

def test_a_trickling_or_endless_response_ends_at_the_deadline_or_the_size_cap():
    import http.server
    import threading
    import time

    import schemas as S
    from pipeline.filter.download import failure_reason, limited_download_image

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if self.path == "/declared-huge":
                self.send_header("Content-Length", str(10 << 30))
            self.end_headers()
            try:
                if self.path == "/ok":
                    self.wfile.write(b"\xff\xd8" + b"x" * 1000)
                    return
                for _ in range(100_000):
                    self.wfile.write(b"x" if self.path == "/trickle" else b"x" * (1 << 16))
                    self.wfile.flush()
                    if self.path == "/trickle":
                        time.sleep(0.5)   # every read gets a byte well within the per-read timeout
            except OSError:
                pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        def fetch(path):
            t = time.monotonic()
            key, body, err = limited_download_image((0, base + path), 2, "catcurate", [], max_seconds=3,
                                                    max_bytes=1 << 20)
            return body, err, time.monotonic() - t

        body, err, _ = fetch("/ok")
        assert err is None and body.read() == b"\xff\xd8" + b"x" * 1000
        body, err, seconds = fetch("/trickle")
        assert body is None and failure_reason(err) == S.R_DOWNLOAD_TIMEOUT and seconds < 5, (err, seconds)
        body, err, seconds = fetch("/endless")
        assert body is None and failure_reason(err) == S.R_TOO_LARGE and seconds < 5, (err, seconds)
        body, err, _ = fetch("/declared-huge")
        assert body is None and failure_reason(err) == S.R_TOO_LARGE and "not read" in err
    finally:
        server.shutdown()


def test_the_download_child_fetches_through_the_limits():
    from pipeline.filter.download import LIMITS_ENV
    code = ("import pipeline.filter.download; from img2dataset import downloader; d = downloader.download_image; "
            "print(d.func.__name__, d.keywords['max_seconds'], d.keywords['max_bytes'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), LIMITS_ENV: "7.5,1000", "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert out.stdout.split() == ["limited_download_image", "7.5", "1000"], out.stderr[-2000:]


# ---------------------------------------------------------------- 7: an interrupted distillation

def test_an_interrupted_distillation_says_so_in_one_line_and_releases_the_lock(coco_shards, tmp_path):
    import signal
    import time

    from pipeline.store.locks import LOCK_NAME
    from tests.test_reliability import submit_cmd
    labels = tmp_path / "labels"
    proc = subprocess.Popen(submit_cmd(coco_shards, labels, job="distill_labels.py"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 240
    while not (labels / LOCK_NAME).exists():   # inside the job's lock: the session and the teacher come next
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGINT)   # what a terminal sends to the whole foreground job
    out, err = proc.communicate(timeout=120)
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not line.lstrip().startswith("[Stage") and "WARN" not in line]
    assert proc.returncode == 130, err[-3000:]
    assert lines[-1] == (f"distill_labels: interrupted; finished shards are kept and {labels} is unlocked - rerun "
                         f"the same command to resume"), err[-3000:]
    assert "Traceback" not in err and "== concept distillation ==" not in out, err[-3000:]
    assert not (labels / LOCK_NAME).exists()


def test_an_interrupted_redecide_says_so_in_one_line(image_source, tmp_path, capfd, monkeypatch):
    """Ctrl-C arriving while a part is re-decided (raised there, as the signal handler raises it): one line,
    exit 130, the finished parts kept; the same command then finishes."""
    import signal

    from jobs import spark as js
    from jobs.redecide import main as redecide_main
    from pipeline.filter import redecide as R
    real, calls = R.redecide_caption_part, []

    def interrupted_on_the_second_part(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    into = tmp_path / "into"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with monkeypatch.context() as m:
            m.setattr(R, "redecide_caption_part", interrupted_on_the_second_part)
            code = redecide_main(["--source", image_source["source"], "--into", str(into), "--min-conf", "0.7",
                                  "--engine", "local"])
        err = capfd.readouterr().err.strip()   # the line goes to the process's stderr
        assert code == 130 and "\n" not in err and "Traceback" not in err, err
        assert err == f"redecide: interrupted; finished parts are kept in {into} - rerun the same command to resume"
        assert len(os.listdir(into / "_done" / "caption")) == 1, "the finished part is kept"
        assert redecide_main(["--source", image_source["source"], "--into", str(into), "--min-conf", "0.7",
                              "--engine", "local"]) == 0
        assert json.load(open(into / "stats.json"))["n_input"] == 6
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        js.interrupted, js._quiet_interrupts = False, False
