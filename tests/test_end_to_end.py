"""The product chain on real COCO photos: CAT filter -> concept distillation -> trainer's data reader."""
import json
import os

import numpy as np
import pandas as pd

import schemas as S
from jobs.cat_filter import cat_filter
from jobs.distill_labels import distill_labels


def test_coco_through_filter_distill_and_trainer_reader(spark, coco_parquet, tmp_path):
    out, labels = tmp_path / "filter", tmp_path / "labels"
    stats = cat_filter(str(coco_parquet), str(out), spark=spark, rows_per_part=40)
    assert stats["n_input"] == 80 == stats["n_kept"] + stats["n_dropped"] + stats["n_failed"]
    assert stats["n_kept"] >= 30, "most COCO captions describe actions and the photos carry no caption text"
    shards = pd.read_parquet(out / "shards")

    distill_labels(str(out), str(labels), spark=spark, min_count=2, k=5)
    got = pd.read_parquet(labels / "shards")
    assert sorted(got.key) == sorted(shards.key), "labels for every kept image, aligned by key"
    for idx, probs in zip(got.object_indices, got.object_probs):
        assert len(idx) == len(probs) == 5
        assert abs(float(np.sum(probs)) - 1) < 1e-3 and list(probs) == sorted(probs, reverse=True)
    assert json.load(open(labels / "teacher.json")), "the teacher spec is recorded"

    from model_training.data import ShardStream, read_vocab
    from model_training.models import get_tokenizer
    n_obj, n_att = read_vocab(labels)
    assert n_obj >= 2 and n_att >= 2
    stream = ShardStream(sorted((out / "shards").glob("*.parquet")), get_tokenizer("catclip-micro"), image_size=32,
                         batch_size=8, train=False, labels_dir=labels, infinite=False)
    batch = next(iter(stream))
    assert batch["unlabelled"] == 0 and "concepts" in batch
    ledger = pd.read_parquet(out / "ledger")
    assert set(ledger[ledger.status == S.KEPT].key) == set(shards.key)
    assert os.path.exists(out / "report.html")
