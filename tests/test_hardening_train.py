"""Hardening of the trainer, train-eval, distillation and the Makefile (issue 14, items 1, 2, 5, 7).

Run: cd /work/main && PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_hardening_train.py
Training runs use preset catclip-micro on coco-mini shards for a few steps (2-core CPU). The filter
outputs with nothing to label come from real filter runs (caption stage only: all captions dropped,
and --stages caption). Disk full is real: a 1-page write to /dev/full, and a tiny tmpfs mounted in a
user namespace (`unshare -rm`; skipped where the kernel forbids it).
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from model_training.caption_sets import load_coco, write_shards
from model_training.data import is_holdout
from model_training.train import (RunFolderError, TrainConfig, find_checkpoint, list_checkpoints,
                                  save_checkpoint, train)
from pipeline.store.partitions import StorageError
from schemas import SHARD
from tests.conftest import COCO_MINI, ROOT


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """coco-mini, one caption per image (80 pairs) in 4 shard files, images shrunk to 64 px."""
    root = tmp_path_factory.mktemp("coco1")
    write_shards(load_coco(COCO_MINI / "captions.json", COCO_MINI / "images"), root / "shards", n_shards=4,
                 max_side=64, caption_filter=lambda k: k < 1)
    return root / "shards"


def _cfg(shards, run, **kw):
    base = dict(shards=str(shards), run_dir=str(run), model="catclip-micro", batch_size=8, num_workers=1,
                max_steps=4, warmup_steps=1, log_every=1, checkpoint_every=2, shuffle_buffer=16)
    return TrainConfig(**{**base, **kw})


def _log_steps(run):
    with open(Path(run) / "log.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _files(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# ------------------------------------------------------------------ item 1: run-folder identity
def test_another_run_in_the_same_folder_is_refused_with_the_differences_named(shards, tmp_path):
    run = tmp_path / "run"
    train(_cfg(shards, run))
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    identity = json.loads((run / "run.json").read_text())["identity"]
    assert identity["config"]["lr"] == TrainConfig.lr and identity["data"]["n_shards"] == 4

    with pytest.raises(RunFolderError) as refused:
        train(_cfg(shards, run, lr=1e-3, batch_size=4))
    assert "config.lr: 0.0005 -> 0.001" in str(refused.value)
    assert "config.batch_size: 8 -> 4" in str(refused.value) and "--overwrite" in str(refused.value)
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before   # nothing touched

    # other data (one shard less) is another run too
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for p in sorted(shards.glob("*.parquet"))[:3]:
        shutil.copy(p, fewer / p.name)
    with pytest.raises(RunFolderError, match=r"data.n_shards: 4 -> 3"):
        train(_cfg(fewer, run, num_workers=1))

    # --overwrite clears RUN: one run's checkpoints, log and identity, none of the old ones
    summary = train(_cfg(shards, run, lr=1e-3, batch_size=4, overwrite=True))
    assert summary["finished"] and summary["samples_seen"] == 4 * 4
    assert json.loads((run / "run.json").read_text())["identity"]["config"]["lr"] == 1e-3
    assert [s for s, _ in list_checkpoints(run)] == [2, 4] and _log_steps(run) == [1, 2, 3, 4]
    state = torch.load(find_checkpoint(run, "latest"), weights_only=True)
    assert state["config"]["lr"] == 1e-3 and state["samples_seen"] == 16


def test_the_same_command_resumes_and_resume_checks_the_stored_config(shards, tmp_path, capsys):
    run = tmp_path / "run"
    part = train(_cfg(shards, run, stop_after=2))
    assert not part["finished"]
    # the same command (stop_after is not part of the identity) continues the run from its checkpoint
    done = train(_cfg(shards, run))
    assert "holds this same run: resuming" in capsys.readouterr().out
    assert done["finished"] and done["samples_seen"] == 4 * 8 and _log_steps(run) == [1, 2, 3, 4]

    # a folder without run.json (written before identities existed): --resume checks the checkpoint's config
    legacy = tmp_path / "legacy"
    shutil.copytree(run, legacy)
    (legacy / "run.json").unlink()
    with pytest.raises(RunFolderError, match="identity was not recorded"):
        train(_cfg(shards, legacy, max_steps=6))
    with pytest.raises(RunFolderError) as refused:
        train(_cfg(shards, legacy, max_steps=6, resume="latest"))
    assert "step_0000004.pt was written with another configuration" in str(refused.value)
    assert "config.max_steps: 4 -> 6" in str(refused.value)
    # a checkpoint path from another run's folder is checked the same way
    with pytest.raises(RunFolderError, match=r"config.seed: 0 -> 1"):
        train(_cfg(shards, tmp_path / "other", seed=1, resume=str(run / "checkpoints" / "step_0000004.pt")))
    # a matching config resumes (here: nothing left to do) and records the identity
    train(_cfg(shards, legacy, resume="latest"))
    assert (legacy / "run.json").is_file()


def test_checkpoint_rotation_and_latest_order_by_step_not_by_name(tmp_path):
    state = {"w": torch.zeros(4)}
    for step in (9_999_998, 9_999_999, 10_000_000):   # the 8-digit name sorts first by name
        save_checkpoint(tmp_path, {**state, "step": step}, {"step": step}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [9_999_999, 10_000_000]
    assert find_checkpoint(tmp_path, "latest").name == "step_10000000.pt"
    # a meta without a step falls back to the step in the name
    (tmp_path / "checkpoints" / "step_10000000.json").write_text("{}")
    assert find_checkpoint(tmp_path, "latest").name == "step_10000000.pt"


# ------------------------------------------------------------------ item 5: disk full, trainer side
def test_checkpoint_on_a_full_disk_is_one_storage_error_and_leaves_no_temporary(tmp_path):
    """/dev/full answers every write with ENOSPC (a real kernel error, no mock): the checkpoint's
    temporary is pointed at it."""
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / "step_0000002.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(StorageError) as full:
        save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(100_000)}, {"step": 2}, keep=3)
    assert "no space left on device writing" in full.value.strerror and "step_0000002.pt" in full.value.strerror
    assert "needs up to 0.4 MB" in full.value.strerror and "MB free" in full.value.strerror
    assert os.path.exists("/dev/full") and list(ckpt_dir.iterdir()) == []   # the temporary is gone
    assert list_checkpoints(tmp_path) == []


def _userns_tmpfs_works(where) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(where)],
                           capture_output=True)
    return probe.returncode == 0


DISK_FULL_SCRIPT = r'''
set -u
mount -t tmpfs -o size=128m tmpfs "$DISK"   # two ~41 MB checkpoints of catclip-micro + Adam
train() { "$PY" -m model_training.train --shards "$SHARDS" --run "$DISK/run" --model catclip-micro \
  --batch-size 8 --num-workers 1 --max-steps 4 --warmup-steps 1 --log-every 1 --checkpoint-every 2 \
  --shuffle-buffer 16 "$@"; }
train --stop-after 2 > "$LOGS/1.out" 2> "$LOGS/1.err"; echo $? > "$LOGS/1.rc"
# fill the disk, then leave 200 KB: the log still fits, the next checkpoint (~41 MB) does not
dd if=/dev/zero of="$DISK/filler" bs=64k 2>/dev/null; truncate -s -200K "$DISK/filler"
train > "$LOGS/2.out" 2> "$LOGS/2.err"; echo $? > "$LOGS/2.rc"
ls -a "$DISK/run" "$DISK/run/checkpoints" > "$LOGS/2.ls"
rm "$DISK/filler"
train > "$LOGS/3.out" 2> "$LOGS/3.err"; echo $? > "$LOGS/3.rc"
'''


def test_trainer_on_a_full_tmpfs_stops_with_one_line_and_the_rerun_resumes(shards, tmp_path):
    if not _userns_tmpfs_works(tmp_path):
        pytest.skip("no user namespaces here: cannot mount a small tmpfs without root")
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir(), logs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PY": sys.executable,
           "SHARDS": str(shards), "DISK": str(disk), "LOGS": str(logs)}
    subprocess.run(["unshare", "-rm", "bash", "-c", DISK_FULL_SCRIPT], env=env, timeout=600, check=True)
    read = lambda name: (logs / name).read_text()  # noqa: E731
    assert read("1.rc").strip() == "0", read("1.err")[-2000:]
    assert read("2.rc").strip() == "2", read("2.err")[-3000:]
    err = [line for line in read("2.err").splitlines() if "error" in line]
    assert len(err) == 1 and "Traceback" not in read("2.err"), read("2.err")[-3000:]
    assert re.search(r"^train: error: no space left on device writing \S+/run/checkpoints/step_0000004\.pt "
                     r"\(needs up to \d+\.\d MB, 0\.\d MB free", err[0]), err[0]
    listing = read("2.ls")
    assert ".tmp" not in listing and "step_0000002.pt" in listing and "step_0000004" not in listing
    assert read("3.rc").strip() == "0", read("3.err")[-3000:]
    assert "resumed from" in read("3.out") and "at step 2" in read("3.out")
    assert '"finished": true' in read("3.out") and '"samples_seen": 32' in read("3.out")


# ------------------------------------------------------------------ item 7: train-eval rough edges
def test_train_eval_help_prints_the_defaults_it_uses(capsys):
    from model_training.train_eval import DEFAULTS, main
    from model_training.train import parse_args
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    cfg = parse_args(["--shards", "x"], defaults=DEFAULTS)
    for flag, field in (("max-steps", "max_steps"), ("holdout-fraction", "holdout_fraction"),
                        ("checkpoint-every", "checkpoint_every"), ("batch-size", "batch_size"),
                        ("model", "model"), ("lr", "lr")):
        shown = re.search(rf"--{flag} [A-Z_]+ [^\[\]]*?\(default: ([^)]*)\)", text).group(1)   # not the usage line
        assert shown == repr(getattr(cfg, field)), (flag, shown)
    assert (cfg.max_steps, cfg.holdout_fraction, cfg.checkpoint_every) == (150, 0.1, 50)


def test_train_eval_on_tiny_shards_uses_fewer_workers_instead_of_crashing_one(shards, tmp_path, capsys):
    """Two shard files; the second holds only held-out keys: with two DataLoader workers the second
    would have no training rows (before: 'Caught ValueError in DataLoader worker process 1')."""
    rows = [r for p in sorted(shards.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    held = [r for r in rows if is_holdout(r["key"], 0.1)][:2]
    assert len(held) == 2   # coco-mini's keys are fixed: 7 of 80 fall in the 10% held-out split
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    pq.write_table(SHARD.from_rows([r for r in rows if r not in held][:12]), tiny / "00000.parquet")
    pq.write_table(SHARD.from_rows(held), tiny / "00001.parquet")
    from model_training.train_eval import main
    main(["--shards", str(tiny), "--run", str(tmp_path / "run"), "--model", "catclip-micro", "--max-steps", "2",
          "--batch-size", "4", "--num-workers", "2", "--shuffle-buffer", "8"])
    out = capsys.readouterr().out
    assert "1 DataLoader worker(s) instead of 2" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["holdout_retrieval"]["n_pairs"] == 2 and metrics["config"]["num_workers"] == 1


def test_train_eval_with_too_few_held_out_pairs_says_so_before_training(shards, tmp_path, capsys):
    from model_training.train_eval import main
    with pytest.raises(SystemExit) as stopped:
        main(["--shards", str(shards), "--run", str(tmp_path / "run"), "--holdout-fraction", "0.001"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert err.startswith("train-eval: error: 0 held-out pair(s) in 4 shard(s)") and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ item 2: the filter kept nothing
@pytest.fixture(scope="module")
def nothing_kept(tmp_path_factory, coco_parquet, spark):
    """Two real filter OUTPUTs without image-text pairs: every caption dropped (min complexity 99), and
    a --stages caption run (captions and decisions only)."""
    from jobs.cat_filter import cat_filter
    from pipeline.filter.captions import CaptionParams
    root = tmp_path_factory.mktemp("nothing")
    cat_filter(str(coco_parquet), str(root / "dropped"), caption=CaptionParams(min_complexity=99), spark=spark)
    cat_filter(str(coco_parquet), str(root / "captions_only"), stages="caption", spark=spark)
    return root


def test_distill_with_nothing_kept_says_so_writes_nothing_and_exits_cleanly(nothing_kept, tmp_path, capsys):
    from jobs.distill_labels import distill_labels, main
    dropped, captions_only = nothing_kept / "dropped", nothing_kept / "captions_only"
    assert json.loads((dropped / "stats.json").read_text())["n_kept"] == 0
    assert not (dropped / "shards").exists()   # the layout that made distillation read captions/ as shards
    summary = distill_labels(str(dropped), str(tmp_path / "labels"))
    assert summary["nothing_to_label"].startswith("0 kept pairs: nothing to label (the filter kept none of the "
                                                  "80 input rows")
    assert summary["n_rows"] == 0 and not (tmp_path / "labels").exists()

    assert main(["--input", str(captions_only), "--output", str(tmp_path / "labels2")]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("distill_labels: 0 kept pairs with images: nothing to label (") and "--stages caption" in out
    assert "\n" not in out and not (tmp_path / "labels2").exists()


def test_train_eval_after_a_filter_that_kept_nothing_does_not_ask_to_run_the_filter(nothing_kept, tmp_path, capsys):
    from model_training.train_eval import main
    for output, expected in (("dropped", "0 kept pairs: nothing to train on (the filter kept none of the 80"),
                             ("captions_only", "0 kept pairs with images: nothing to train on (")):
        with pytest.raises(SystemExit) as stopped:
            main(["--shards", str(nothing_kept / output / "shards"), "--run", str(tmp_path / output)])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"train-eval: error: {expected}") and "make filter" not in err, err


# ------------------------------------------------------------------ item 7: the funnel
def test_funnel_shows_download_only_when_something_was_downloaded(tmp_path, capsys):
    from jobs.cat_filter import print_funnel
    from pipeline.filter.finalize import build_stats
    from pipeline.filter.report import write_report
    counts = [{"stage": "caption", "status": "dropped", "reason": "low_complexity", "count": 5},
              {"stage": "textspot", "status": "kept", "reason": None, "count": 3}]
    for routes, shown in (({"images"}, False), ({"download"}, True), ({"images", "download"}, True)):
        stats = build_stats(counts, 8, routes)
        print_funnel(stats, str(tmp_path))
        printed = capsys.readouterr().out
        page = write_report(tmp_path / "-".join(sorted(routes)), stats).read_text()
        assert ("  download " in printed) == shown, printed
        assert (">download</text>" in page) == shown and ("<td>download</td>" in page) == shown
        assert ">textspot</text>" in page and "  textspot " in printed


# ------------------------------------------------------------------ item 7: the Makefile
def test_makefile_passes_paths_with_quotes_and_shell_syntax_literally(tmp_path):
    """Paths holding an apostrophe, backquotes and $(...) reach the programs unchanged and nothing in
    them is executed (before: the apostrophe broke the quoting and `touch` ran)."""
    marker = f"pwned-{uuid.uuid4().hex[:8]}"
    weird = tmp_path / f"it's `touch {marker}-bq` $(touch {marker}-dollar)"
    (weird / "out").mkdir(parents=True)
    (weird / "out" / "stats.json").write_text(json.dumps({"n_input": 3, "n_kept": 0, "n_dropped": 3, "n_failed": 0,
                                                           "routes": ["images"], "by_stage": {}}))
    make_value = str(weird)   # taken verbatim: the Makefile reads it unexpanded (tests/test_cli.py)
    proc = subprocess.run(["make", "-s", "-o", ".venv/.installed", "train-eval", f"OUTPUT={make_value}/out",
                           f"LABELS={make_value}/labels", f"RUN={make_value}/run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    created = [p for d in (ROOT, tmp_path, weird) for p in Path(d).glob(f"{marker}*")]
    for p in created:
        p.unlink()
    assert not created, f"the shell ran code from a path: {created}"
    assert proc.returncode != 0
    assert f"train-eval: error: 0 kept pairs: nothing to train on (the filter kept none of the 3 input rows of " \
           f"{weird}/out" in proc.stderr, proc.stderr[-2000:]
