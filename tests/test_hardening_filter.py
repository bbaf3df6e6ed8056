"""Hardening of the filter (issue 14): folder locks, URL-list formats and globs, disk full, safe
fetching's address classifier, and --help. Real processes, real files, a real small filesystem."""
import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas as S
from jobs.cat_filter import build_parser, cat_filter, main
from pipeline.store import partitions as P
from pipeline.filter.download import blocked_category
from pipeline.store.locks import LOCK_NAME, FolderLock, LockHeld, LockParams
from tests.conftest import LAION_SAMPLE, ROOT

CAPTIONS = ["A dog chasing a red ball on the grass", "Stainless Steel Water Bottle 750ml",
            "A young girl riding a white horse", None, "A man is throwing a blue frisbee"]


def small_input(folder) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "in.parquet")
    pq.write_table(pa.table({"URL": [f"http://x/{i}" for i in range(len(CAPTIONS))], "TEXT": CAPTIONS}), path)
    return path


def hold_lock(folder) -> subprocess.Popen:
    """Another run: a separate process that takes the folder's lock and keeps it."""
    code = ("import sys, time; from pipeline.store.locks import folder_lock\n"
            f"lock = folder_lock({str(folder)!r}, 'cat_filter').acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---------------------------------------------------------------- locks

def test_second_run_is_refused_naming_the_holder_and_keeps_its_temporaries(tmp_path, capsys):
    inp, out = small_input(tmp_path / "in"), tmp_path / "out"
    holder = hold_lock(out)
    try:
        in_flight = out / "captions" / ".tmp-inflight-part.parquet"  # the holder's half-written part
        in_flight.parent.mkdir(parents=True)
        in_flight.write_bytes(b"partial")
        with pytest.raises(LockHeld, match=rf"in use by cat_filter \(pid {holder.pid} on host "):
            cat_filter(inp, str(out), stages="caption")
        assert main(["--input", inp, "--output", str(out), "--stages", "caption"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cat_filter: error:") and f"pid {holder.pid}" in err and "\n" not in err
        assert in_flight.exists(), "start-up cleanup ran without the lock and deleted the other run's file"
        assert not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_killed_run_is_taken_over(spark, tmp_path):
    inp, out = small_input(tmp_path / "in"), tmp_path / "out"
    holder = hold_lock(out)
    os.kill(holder.pid, signal.SIGKILL)  # dies holding it: the lock file stays behind
    holder.wait()
    assert (out / LOCK_NAME).exists()
    (out / "ledger").mkdir()
    (out / "ledger" / ".tmp-dead-run.parquet").write_bytes(b"x")  # the dead run's temporary
    stats = cat_filter(inp, str(out), spark=spark, stages="caption")
    assert stats["n_input"] == len(CAPTIONS)
    assert not (out / LOCK_NAME).exists(), "released at the end"
    assert not (out / "ledger" / ".tmp-dead-run.parquet").exists()


def test_lock_of_another_host_is_stale_only_after_the_heartbeat_timeout(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    other = {"job": "train", "host": "node-7", "pid": 1, "started": "2026-01-01T00:00:00",
             "machine": "node-7|boot|ns", "proc_start": None, "token": "t"}
    (folder / LOCK_NAME).write_text(json.dumps(other))  # pid 1 is alive here, but it is not this machine's
    params = LockParams(heartbeat_s=0.2, stale_after_s=30)
    with pytest.raises(LockHeld, match="train .pid 1 on host node-7"):
        FolderLock(str(folder), "cat_filter", params).acquire()
    old = time.time() - 60
    os.utime(folder / LOCK_NAME, (old, old))  # no heartbeat for a minute
    lock = FolderLock(str(folder), "cat_filter", params).acquire()
    mine = json.loads((folder / LOCK_NAME).read_text())
    assert mine["pid"] == os.getpid() and mine["job"] == "cat_filter"
    before = os.stat(folder / LOCK_NAME).st_mtime
    time.sleep(0.7)
    assert os.stat(folder / LOCK_NAME).st_mtime > before, "the holder refreshes its heartbeat"
    lock.release()
    assert not (folder / LOCK_NAME).exists()


# ---------------------------------------------------------------- input formats

def _laion_rows(n=40):
    t = pq.read_table(LAION_SAMPLE, columns=["URL", "TEXT"]).slice(0, n).to_pandas()
    return t.rename(columns={"URL": "link", "TEXT": "alt"})  # other names: --url-col / --caption-col


def test_csv_tsv_json_jsonl_and_globs_give_the_parquet_result(spark, tmp_path):
    rows = _laion_rows()
    ref_in = tmp_path / "ref.parquet"
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), ref_in)
    cols = {"url_col": "link", "caption_col": "alt"}
    reference = cat_filter(str(ref_in), str(tmp_path / "ref"), spark=spark, stages="caption", **cols)
    ref_ledger = pd.read_parquet(tmp_path / "ref" / "ledger").set_index("url").sort_index()

    src = tmp_path / "lists"
    src.mkdir()
    rows.iloc[:10].to_csv(src / "a.csv", index=False)
    rows.iloc[10:20].to_csv(src / "b.tsv", sep="\t", index=False)
    rows.iloc[20:30].to_json(src / "c.json", orient="records")
    with gzip.open(src / "d.jsonl.gz", "wt") as fh:
        rows.iloc[30:].to_json(fh, orient="records", lines=True)
    (src / "00000_stats.json").write_text("{}")  # an img2dataset sidecar: not input, once a glob excludes it
    out = tmp_path / "out"
    stats = cat_filter(str(src / "[abcd].*"), str(out), spark=spark, stages="caption", rows_per_part=4, **cols)
    assert stats["n_input"] == reference["n_input"] == len(rows)
    assert {k: stats["by_stage"][k] for k in stats["by_stage"]} == reference["by_stage"]
    ledger = pd.read_parquet(out / "ledger").set_index("url").sort_index()
    pd.testing.assert_frame_equal(ledger[["status", "reason", "complexity"]], ref_ledger[["status", "reason", "complexity"]])
    assert {os.path.basename(f) for f in ledger.source_file} == {"a.csv", "b.tsv", "c.json", "d.jsonl.gz"}
    first_csv = ledger[ledger.source_file.str.endswith("a.csv")].source_row
    assert sorted(first_csv) == list(range(10)), "source_row is the row in the CSV"

    converted = {f: os.path.getmtime(out / "_work" / "input" / f) for f in os.listdir(out / "_work" / "input")}
    assert len(converted) == 4
    again = cat_filter(str(src / "[abcd].*"), str(out), spark=spark, stages="caption", rows_per_part=4, **cols)
    assert again["n_input"] == stats["n_input"]
    assert converted == {f: os.path.getmtime(out / "_work" / "input" / f) for f in converted}, "converted once"


def test_unreadable_text_files_are_named_by_format_and_nothing_readable_is_said(spark, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jsonl").write_text('{"url": "http://x/1", "caption": "A dog running"}\n{not json\n')
    (inp / "b.json").write_text("[1, 2")
    with pytest.raises(P.InputError, match=r"cannot read .*a.jsonl as JSON lines: .*line 2") as e:
        cat_filter(str(inp), str(tmp_path / "out"))
    assert "Parquet" not in str(e.value)
    with pytest.raises(P.InputError, match=r"nothing readable .* all 2 input file\(s\) failed to read"):
        cat_filter(str(inp), str(tmp_path / "out"), spark=spark, skip_bad_files=True)
    assert not (tmp_path / "out").exists(), "a refused run leaves no OUTPUT behind"
    (inp / "c.csv").write_text("url,caption\nhttp://x/3,A cat chasing a mouse\n")
    stats = cat_filter(str(inp), str(tmp_path / "out"), spark=spark, skip_bad_files=True, stages="caption")
    assert stats["n_input"] == 1 and {os.path.basename(b["file"]) for b in stats["bad_files"]} == {"a.jsonl", "b.json"}


def test_bad_bytes_in_a_csv_caption_fail_that_row_only(spark, tmp_path):
    inp = tmp_path / "in.csv"
    inp.write_bytes(b"URL,TEXT\nhttp://x/1,A dog chasing a cat\nhttp://x/2,caf\xe9 \xff bad\nhttp://x/3,\n")
    cat_filter(str(inp), str(tmp_path / "out"), spark=spark, stages="caption")
    ledger = pd.read_parquet(tmp_path / "out" / "ledger").set_index("url")
    assert ledger.loc["http://x/2"].reason == S.R_INVALID_UTF8
    assert ledger.loc["http://x/3"].reason == S.R_EMPTY_CAPTION
    assert ledger.loc["http://x/1"].status == S.KEPT


# ---------------------------------------------------------------- disk full

@contextlib.contextmanager
def small_filesystem(path, size):
    """A real tmpfs of `size` (needs root / CAP_SYS_ADMIN; skipped where mounting is not allowed)."""
    os.makedirs(path)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def test_disk_full_gives_one_line_no_temporaries_and_the_rerun_resumes(spark, tmp_path, capsys):
    inp = tmp_path / "in.parquet"  # 2,000 captions that do not compress away
    pq.write_table(pq.read_table(LAION_SAMPLE, columns=["URL", "TEXT"]).slice(0, 1000), inp)
    t = pq.read_table(inp)
    pq.write_table(pa.concat_tables([t, t.set_column(0, "URL", pa.array([u + "#2" for u in t.column(0).to_pylist()]))]), inp)
    with small_filesystem(tmp_path / "disk", "256k") as disk:
        out = disk / "out"
        args = ["--input", str(inp), "--output", str(out), "--stages", "caption", "--rows-per-part", "200"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "no space left on device writing " + str(out) in err, err
        assert "MB free" in err and "rerun the same command to resume" in err
        assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")], "temporaries removed"
        assert not (out / LOCK_NAME).exists()
        done = set(P.done_parts(str(out), S.STAGE_CAPTION))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        stats = cat_filter(str(inp), str(out), spark=spark, stages="caption", rows_per_part=200)
        assert stats["n_input"] == 2000 == stats["n_kept"] + stats["n_dropped"] + stats["n_failed"]
        assert set(P.done_parts(str(out), S.STAGE_CAPTION)) >= done
        assert len(pd.read_parquet(out / "ledger")) == 2000


# ---------------------------------------------------------------- safe fetching, help

@pytest.mark.parametrize("address,category", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local (cloud metadata)"), ("fe80::1%eth0", "link-local (cloud metadata)"),
    ("10.1.2.3", "private"), ("172.31.255.255", "private"), ("192.168.0.1", "private"), ("fd00::1", "private"),
    ("100.64.0.1", "private"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("233.252.0.1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("192.0.2.1", "reserved"), ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local (cloud metadata)"),
    ("2002:7f00:1::", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"),
    ("93.184.216.34", None), ("2606:4700::1111", None), ("8.8.8.8", None),
])
def test_address_classifier(address, category):
    assert blocked_category(address) == category
    opened = {"loopback", "private"}
    assert blocked_category(address, allow_private=True) == (None if category in opened else category)


def test_help_gives_help_and_default_for_every_flag():
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help" or action.required:
            continue
        assert action.help, f"{action.option_strings} has no help"
        assert "default" in formatter._get_help_string(action).lower(), f"{action.option_strings} shows no default"
    text = " ".join(parser.format_help().split())
    assert "(default: 20000)" in text and "(default: 0.8)" in text and "--allow-private-addresses" in text
