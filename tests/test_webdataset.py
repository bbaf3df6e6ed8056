"""Webdataset output of the filter (pipeline/store/webdataset.py) and the trainer reading tars and URIs
(model_training/data.py): layout, resume, open_clip's own trainer and ours on the same tars.

    pytest tests/test_webdataset.py

The filter runs for real on coco-mini (80 photos, one caption each) with small shards, so there are
several tars; open_clip_train trains catclip-micro on them in a subprocess; the reader tests write and
read tars through URIs only, in fsspec's memory:// filesystem and on a real S3 server on loopback (moto).
"""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.vocab_util import write_vocab

from jobs.cat_filter import cat_filter
from model_training.caption_sets import load_coco, write_shards
from model_training.data import ShardStream, list_shards, shard_keys
from model_training.models import get_tokenizer
from pipeline.store import storage
from pipeline.store import webdataset as W
from pipeline.filter.image_stage import ImageStageParams
from pipeline.store.partitions import ParamsChanged
from pipeline.filter.textspot import TextSpotParams
from schemas import LABELS, SHARD
from tests.s3_server import S3Server

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco-mini"
SHARD_ROWS = 16   # small shards: several tars from 80 photos, so tars x workers splits are exercised
# the text spotter's detector at 160 px instead of 320 (4x cheaper): these tests are about the tars, not OCR
IMAGE = ImageStageParams(shard_rows=SHARD_ROWS, textspot=TextSpotParams(canvas_size=160))


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, spark, coco_parquet):
    out = tmp_path_factory.mktemp("wds") / "filter"
    stats = cat_filter(str(coco_parquet), str(out), rows_per_part=40, image=IMAGE,
                       output_format="webdataset", spark=spark)
    return out, stats


def _members(tar_path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf]


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_filter_writes_tars_beside_the_parquet_shards(filtered):
    out, stats = filtered
    shards = sorted((out / "shards").glob("*.parquet"))
    assert len(shards) >= 3 and stats["n_kept"] >= 30
    assert stats["n_webdataset_shards"] == len(shards)
    assert json.loads((out / "stats.json").read_text())["n_webdataset_shards"] == len(shards)
    wds = out / "webdataset"
    sizes = json.loads((wds / "sizes.json").read_text())
    assert sorted(sizes) == [f"{i:05d}.tar" for i in range(len(shards))]   # brace patterns {00000..0000N}
    assert sum(sizes.values()) == stats["n_kept"]
    for i, shard in enumerate(shards):   # numbered in sorted shard order
        n = f"{i:05d}"
        rows = pq.read_table(shard).to_pylist()
        assert 0 < len(rows) <= SHARD_ROWS
        members = _members(wds / f"{n}.tar")
        # img2dataset's layout: KEY.jpg, KEY.txt, KEY.json per sample, in the shard's row order
        assert [name for name, _ in members] == [f"{r['key']}.{ext}" for r in rows for ext in ("jpg", "txt", "json")]
        for r, (jpg, txt, meta) in zip(rows, zip(*[iter(members)] * 3)):
            assert jpg[1] == r["jpg"] and txt[1].decode() == r["caption"]
            doc = json.loads(meta[1])
            assert doc == {k: r[k] for k in ("key", "url", "caption", "width", "height", "objects", "attributes",
                                             "actions", "complexity", "has_action")}
            assert doc["has_action"] and doc["complexity"] >= 1   # the parse of a kept caption
        sidecar = pq.read_table(wds / f"{n}.parquet").to_pylist()
        assert [(s["key"], s["caption"], s["url"], s["width"], s["height"], s["status"]) for s in sidecar] == \
               [(r["key"], r["caption"], r["url"], r["width"], r["height"], "success") for r in rows]
        st = json.loads((wds / f"{n}_stats.json").read_text())
        assert (st["count"], st["successes"], st["source_shard"], st["bytes"]) == \
               (len(rows), len(rows), shard.name, (wds / f"{n}.tar").stat().st_size)
        marker = json.loads((out / "_done" / "webdataset" / f"{n}.json").read_text())
        assert (marker["tar"], marker["count"], marker["source_shard"]) == (f"{n}.tar", len(rows), shard.name)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resume_identity"]["output_format"] == "webdataset"


def test_member_names_keep_samples_whole_for_any_key():
    assert W.member_stem("0123_4~2") == "0123_4~2"        # hash keys, img2dataset keys, dedupe suffixes
    odd = ["laion/1.jpg", "a.b", "a%2Eb", "caf\u00e9 1"]
    stems = [W.member_stem(k) for k in odd]
    assert len(set(stems)) == len(odd) and not any("." in s or "/" in s for s in stems)
    assert W.split_member(f"{stems[0]}.labels.json") == (stems[0], "labels.json")


def test_rerun_skips_finished_tars_and_rewrites_an_unmarked_one_identically(filtered, spark, coco_parquet):
    out, stats = filtered
    wds = out / "webdataset"
    before = _files(wds)
    marker = out / "_done" / "webdataset" / "00001.json"
    # an interrupted conversion: half a tar and no marker -> readers leave it out, a rerun writes it again
    marker.unlink()
    original = (wds / "00001.tar").read_bytes()
    (wds / "00001.tar").write_bytes(original[: len(original) // 2])
    assert str(wds / "00001.tar") not in list_shards(str(wds))
    assert len(list_shards(str(wds))) == stats["n_webdataset_shards"] - 1
    again = cat_filter(str(coco_parquet), str(out), rows_per_part=40, image=IMAGE,
                       output_format="webdataset", spark=spark)
    assert again["n_webdataset_shards"] == stats["n_webdataset_shards"] and marker.is_file()
    after = _files(wds)
    assert sorted(after) == sorted(before)
    for name, (mtime, data) in after.items():
        assert data == before[name][1], name                       # byte for byte the same output
        if not name.startswith("00001"):
            assert mtime == before[name][0], f"{name} was rewritten"  # finished tars (and sizes.json) untouched
    # the output format is part of the run's identity: the same OUTPUT as Parquet only is refused
    with pytest.raises(ParamsChanged, match="output_format"):
        cat_filter(str(coco_parquet), str(out), rows_per_part=40, image=IMAGE,
                   spark=spark)


def test_converter_cli_needs_a_finished_output(tmp_path, capsys):
    cs = load_coco(COCO / "captions.json", COCO / "images")
    out = tmp_path / "out"
    write_shards(cs, out / "shards", n_shards=2, max_side=32, caption_filter=lambda k: k < 1)
    assert W.main([str(out)]) == 2 and "not a finished filter OUTPUT" in capsys.readouterr().err
    assert not (out / "webdataset").exists()
    (out / "stats.json").write_text("{}")   # the filter writes it last
    assert W.main([str(out)]) == 0
    assert sorted(p.name for p in (out / "webdataset").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert sorted(p.name for p in (out / "_done" / "webdataset").iterdir()) == ["00000.json", "00001.json"]


def test_open_clip_train_trains_on_the_tars(filtered, tmp_path):
    from open_clip_train.data import get_dataset_size

    from experiments.anchor import OPEN_CLIP_TRAIN
    from model_training.models import CONFIG_DIR
    out, stats = filtered
    pattern = f"{out}/webdataset/{{00000..{stats['n_webdataset_shards'] - 1:05d}}}.tar"
    assert get_dataset_size(pattern) == (stats["n_kept"], stats["n_webdataset_shards"])   # reads our sizes.json
    batch = 8
    cmd = [sys.executable, "-c", OPEN_CLIP_TRAIN, str(CONFIG_DIR), "--train-data", pattern,
           "--dataset-type", "webdataset", "--train-num-samples", str(stats["n_kept"]), "--model", "catclip-micro",
           "--batch-size", str(batch), "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--workers", "1",
           "--device", "cpu", "--precision", "fp32", "--logs", str(tmp_path), "--name", "wds", "--seed", "0",
           "--save-frequency", "1", "--report-to", "", "--log-every-n-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # conftest put this checkout on PYTHONPATH, HF_HUB_OFFLINE=1
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "wds" / "out.log").read_text()
    steps = -(-stats["n_kept"] // batch)
    assert f"/{steps * batch} (100%)]" in log, log[-2000:]   # every step of the epoch ran
    ckpt = torch.load(tmp_path / "wds" / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and any(k.endswith("logit_scale") for k in ckpt["state_dict"])


def test_our_trainer_reads_the_same_tars_by_uri_with_labels(filtered, tmp_path):
    from model_training.train import TrainConfig, train
    out, stats = filtered
    labels = tmp_path / "labels"
    _write_labels(labels, sorted((out / "shards").glob("*.parquet")))
    pattern = f"file://{out}/webdataset/{{00000..{stats['n_webdataset_shards'] - 1:05d}}}.tar"
    cfg = TrainConfig(shards=pattern, labels=f"file://{labels}", run_dir=str(tmp_path / "run"), model="catclip-micro",
                      batch_size=8, num_workers=2, max_steps=3, warmup_steps=1, log_every=1, checkpoint_every=100,
                      shuffle_buffer=16)
    cfg.loss.concept_weight = 1.0
    summary = train(cfg)
    assert summary["finished"] and summary["samples_seen"] == 3 * 8 and Path(summary["export"]).is_file()
    log = (tmp_path / "run" / "log.csv").read_text()
    assert "concept_objects" in log.splitlines()[0]   # the labels were joined to the tar samples


def _write_labels(labels: Path, shards, skip: set = frozenset()) -> dict:
    """Synthetic LABELS/shards/<shard name>.parquet key-aligned with the Parquet shards (as distillation
    writes them), for the shards not in `skip`; returns key -> object indices."""
    (labels / "shards").mkdir(parents=True)
    expected = {}
    for j, shard in enumerate(shards):
        if Path(shard).name in skip:
            continue
        keys = pq.read_table(shard, columns=["key"]).column("key").to_pylist()
        rows = [{"key": k, "object_indices": [i % 5, j], "object_probs": [0.5, 0.5], "attribute_indices": [1],
                 "attribute_probs": [1.0]} for i, k in enumerate(keys)]
        pq.write_table(LABELS.from_rows(rows), labels / "shards" / Path(shard).name)
        expected.update((r["key"], r["object_indices"]) for r in rows)
    write_vocab(labels, list("abcde"), list("xy"))
    return expected


@pytest.fixture(scope="module")
def s3_bucket():
    """A real S3-compatible server on loopback (moto, tests/s3_server.py) with an empty bucket."""
    with S3Server() as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server.make_bucket("wds")
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(params=["memory", "s3"])
def store(request, tmp_path):
    """A URI root in fsspec's in-memory filesystem (its canonical form is memory:///...) or in S3."""
    if request.param == "s3":
        yield f"{request.getfixturevalue('s3_bucket')}/{tmp_path.name}"
        return
    root = f"memory:///wds-{os.getpid()}-{tmp_path.name}"
    yield root
    storage.remove_tree(root)


def _upload(local: Path, uri: str):
    for f in sorted(local.rglob("*")):
        if f.is_file():
            storage.upload(str(f), storage.join(uri, str(f.relative_to(local))))


def test_reader_streams_tars_from_uris_joins_labels_and_counts_skips(tmp_path, store):
    """Tars written and read through URIs only (pipeline.store.storage: memory:// and a real S3 server): odd keys, a
    broken image, an empty caption, one shard without a label file, resume positions, a truncated foreign tar."""
    cs = load_coco(COCO / "captions.json", COCO / "images")
    local = tmp_path / "out"
    shards = write_shards(cs, local / "shards", n_shards=3, max_side=48, caption_filter=lambda k: k < 1)
    rows = pq.read_table(shards[0]).to_pylist()
    rows += [{**rows[0], "key": "laion/odd.key 1"}, {**rows[1], "key": "broken_jpg", "jpg": b"not a jpeg"},
             {**rows[2], "key": "empty_caption", "caption": " "}]
    pq.write_table(SHARD.from_rows(rows), shards[0])
    expected = _write_labels(tmp_path / "labels", shards, skip={shards[2].name})
    root = store
    _upload(local, f"{root}/out")
    _upload(tmp_path / "labels", f"{root}/labels")
    assert W.convert(f"{root}/out") == 3
    assert W.convert(f"{root}/out") == 3   # nothing left to do
    tars = list_shards(f"{root}/out/webdataset/{{00000..00002}}.tar")
    assert tars == [f"{root}/out/webdataset/{i:05d}.tar" for i in range(3)]   # URIs stay URIs
    assert list_shards(f"{root}/out/webdataset") == tars   # a folder: its tars, not their sidecar Parquet
    n_rows = sum(len(shard_keys(t)) for t in tars)
    assert n_rows == 80 + 3 and "laion/odd.key 1" in shard_keys(tars[0])
    tok = get_tokenizer("catclip-micro")

    def stream(**kw):
        args = dict(image_size=48, batch_size=8, seed=0, shuffle_buffer=16, labels_dir=f"{root}/labels")
        return ShardStream(tars, tok, **{**args, **kw})

    batches = list(stream(infinite=False, shuffle_buffer=0))
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) == n_rows - 2 and "laion/odd.key 1" in keys   # the real key, from KEY.json
    skipped = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"image_decode_error": 1, "empty_caption": 1}
    # labels joined by key through each tar's source shard; the shard without a label file is unlabelled
    for b in batches:
        c = b["concepts"]
        for i, k in enumerate(b["keys"]):
            assert bool(c["has_labels"][i]) == (k in expected)
            if k in expected:
                assert c["object_indices"][i].tolist() == expected[k]
    assert sum(b["unlabelled"] for b in batches) == sum(k not in expected for k in keys) > 0

    # resume: the continuation from a saved position is the same batches (file order + shuffle seeded)
    it = iter(stream())
    first = [next(it) for _ in range(8)]
    _, epoch, done = first[4]["position"]
    resumed = iter(stream(start_positions={0: (epoch, done)}))
    assert [next(resumed)["keys"] for _ in range(3)] == [b["keys"] for b in first[5:8]]

    # a truncated tar of other origin (no markers beside it): the complete samples, then one counted skip
    data = storage.read_bytes(f"{root}/out/webdataset/00001.tar")
    cut = len(data) // 2 + 700
    storage.write_bytes(f"{root}/img2dataset/00000.tar", data[:cut])
    got = list(ShardStream(list_shards(f"{root}/img2dataset"), tok, 48, 4, infinite=False, shuffle_buffer=0))
    assert sum(b["skipped"].get("tar_read_error", 0) for b in got) == 1
    read = [k for b in got for k in b["keys"]]
    assert 0 < len(read) < len(shard_keys(tars[1])) and read == shard_keys(tars[1])[:len(read)]

    # a tar whose marker is missing is not read (its conversion may have been cut off)
    storage.remove(f"{root}/out/_done/webdataset/00002.json")
    assert list_shards(f"{root}/out/webdataset") == tars[:2]
