"""Streaming shards + labels (model_training/data.py): determinism, joins, counted skips, early errors."""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.vocab_util import write_vocab

from model_training.caption_sets import load_coco, write_shards
from model_training.data import ShardStream, check_sharding, is_holdout, list_shards, make_loader
from model_training.models import get_tokenizer
from schemas import LABELS, SHARD

COCO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cs = load_coco(COCO / "captions.json", COCO / "images")
    paths = write_shards(cs, root / "shards", n_shards=2, max_side=64, caption_filter=lambda k: k < 2)
    # a broken row and an empty caption in the first shard: both must be skipped AND counted
    t = pq.read_table(paths[0]).to_pylist()
    t.append({**t[0], "key": "broken_jpg", "jpg": b"not a jpeg"})
    t.append({**t[0], "key": "empty_caption", "caption": "   "})
    pq.write_table(SHARD.from_rows(t), paths[0])
    keys = [r["key"] for p in paths for r in pq.read_table(p, columns=["key"]).to_pylist()]
    labelled = keys[::2]   # every other key has labels
    (root / "labels" / "shards").mkdir(parents=True)
    pq.write_table(LABELS.from_rows([{"key": k, "object_indices": [i % 7, 3], "object_probs": [0.6, 0.2],
                                      "attribute_indices": [1], "attribute_probs": [0.9]}
                                     for i, k in enumerate(labelled)]),
                   root / "labels" / "shards" / "all.parquet")   # not shard-aligned: global index path
    write_vocab(root / "labels", ["o%d" % i for i in range(7)], ["a%d" % i for i in range(4)])
    return root, set(labelled), len(keys)


def _stream(root, **kw):
    args = dict(image_size=48, batch_size=16, seed=0, shuffle_buffer=64)
    args.update(kw)
    return ShardStream(list_shards(root / "shards"), get_tokenizer("catclip-micro"), **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_labels_and_counted_skips(data):
    root, labelled, n_rows = data
    s = _stream(root, labels_dir=root / "labels", infinite=False, shuffle_buffer=0)
    batches = list(s)
    keys = [k for b in batches for k in b["keys"]]
    skipped = {}
    for b in batches:
        for r, n in b["skipped"].items():
            skipped[r] = skipped.get(r, 0) + n
    assert skipped == {"image_decode_error": 1, "empty_caption": 1}
    assert len(keys) == len(set(keys)) == n_rows - 2          # every usable row exactly once
    b = batches[0]
    assert b["images"].shape == (16, 3, 48, 48) and b["texts"].shape == (16, 24)
    c = b["concepts"]
    for i, k in enumerate(b["keys"]):
        assert bool(c["has_labels"][i]) == (k in labelled)
        if k in labelled:   # renormalised top-k, padded with -1 / 0
            assert c["object_indices"][i, 1] == 3 and abs(float(c["object_probs"][i].sum()) - 1) < 1e-6
            assert c["attribute_indices"][i].tolist() == [1]
    assert sum(b["unlabelled"] for b in batches) == sum(k not in labelled for k in keys)


def test_stream_is_seeded_and_resumable(data):
    root, _, _ = data
    a = _take(iter(_stream(root)), 14)                 # > one epoch (~160 rows): crosses the epoch boundary
    b = _take(iter(_stream(root)), 14)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert (a[3]["images"] == b[3]["images"]).all()  # augmentation is seeded per sample too
    assert [x["keys"] for x in _take(iter(_stream(root, seed=1)), 2)] != [x["keys"] for x in a[:2]]
    assert a[-1]["position"][1] >= 1                  # the epoch counter advanced
    # resume from the position of batch 9: the continuation is identical
    _, epoch, rows = a[8]["position"]
    resumed = _take(iter(_stream(root, start_positions={0: (epoch, rows)})), 5)
    assert [x["keys"] for x in resumed] == [x["keys"] for x in a[9:]]
    assert (resumed[0]["images"] == a[9]["images"]).all()


def test_workers_split_files_and_rotate(data):
    root, _, _ = data
    batches = _take(iter(make_loader(_stream(root, shuffle_buffer=0), num_workers=2)), 4)
    assert [b["position"][0] for b in batches] == [0, 1, 0, 1]          # round robin over logical workers
    files = [{k for k in b["keys"]} for b in batches]
    assert not (files[0] | files[2]) & (files[1] | files[3])            # each worker reads its own file
    rotated = _take(iter(make_loader(_stream(root, shuffle_buffer=0, worker_offset=1), num_workers=2)), 2)
    assert [b["position"][0] for b in rotated] == [1, 0]


def test_holdout_split_is_stable_and_disjoint(data):
    root, _, n_rows = data
    train = {k for b in _stream(root, infinite=False, split="train", holdout_fraction=0.2) for k in b["keys"]}
    held = {k for b in _stream(root, infinite=False, split="holdout", holdout_fraction=0.2) for k in b["keys"]}
    assert not train & held and len(train) + len(held) == n_rows - 2
    assert 0.08 < len(held) / (n_rows - 2) < 0.35
    assert all(is_holdout(k, 0.2) for k in held)


def test_early_errors(data, tmp_path):
    root, _, _ = data
    with pytest.raises(ValueError, match="2 shard file\\(s\\) for 2 rank\\(s\\) x 2 DataLoader"):
        check_sharding(2, num_workers=2, world_size=2)
    check_sharding(4, num_workers=2, world_size=2)
    pq.write_table(pa.table({"key": ["a"], "caption": ["a cat"]}), tmp_path / "nojpg.parquet")
    with pytest.raises(ValueError, match="lacks column"):
        ShardStream([tmp_path / "nojpg.parquet"], None, 48, 4)
    with pytest.raises(FileNotFoundError, match="no Parquet shards"):
        list_shards(tmp_path / "missing")


def test_cached_tokenizer_matches_open_clip_and_stays_bounded():
    import pickle

    import open_clip
    import torch

    from model_training.models import CachedTokenizer
    plain = open_clip.get_tokenizer("catclip-micro")
    tok = CachedTokenizer(plain, max_entries=3)
    captions = ["A dog runs.", "two people on a BEACH!", "A dog runs.", "café &amp; bar", "a b c", "d"]
    for _ in range(2):    # misses, then hits: the same rows either way
        assert torch.equal(tok(captions), plain(captions))
        assert len(tok._rows) <= 3
    assert torch.equal(tok("a cat"), plain("a cat"))
    assert tok.encode("a cat") == plain.encode("a cat")        # the rest is the wrapped tokenizer's
    assert torch.equal(pickle.loads(pickle.dumps(tok))(captions), plain(captions))   # loader workers
