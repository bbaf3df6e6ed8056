"""A locked image tower (LiT, Zhai et al. 2022): frozen teacher features cached once per image.

    .venv/bin/python -m model_training.features --shards out/filter/shards --out feats/   # embed every distinct image once
    .venv/bin/catcurate train --shards out/filter/shards --image-features feats/ --model catclip-tiny ...

Why: on a CPU the image tower is nearly all of a step's cost. LiT shows that a frozen, pretrained
image tower with a trained text tower learns retrieval from little data; caching the frozen
features makes a training step cost only the text tower and a small head, so controlled
experiments with several arms and seeds fit on a laptop (experiments/flickr8k.py).

The cache is content-addressed: FEATS/features-NNNNN.parquet rows are (digest, embedding) with
digest = blake2b-128 of the encoded image bytes, so one cache serves every shard set built from the
same images (a photo under five captions is embedded once; filtered subsets need nothing new) and
a changed image can never be served a stale vector. FEATS/meta.json records the teacher. Adding
shards embeds only images not seen before. Images that cannot be decoded are not cached: the
training stream counts their rows as skipped (reason missing_image_features).

The trainable image side is FeatureHead (LayerNorm, two-layer MLP, to the joint embedding), so the
student still learns its own projection of the locked features; the text tower is the model
config's. The export holds the open_clip text tower plus feature_head.pt: it embeds images only
from the same teacher's features (say so when sharing it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from pipeline.store import storage
from pipeline.media.images import image_digest

FEATURES_SCHEMA = pa.schema([("digest", pa.binary(16)), ("embedding", pa.list_(pa.float16()))])


class FeatureCache:
    """digest -> float32 vector for every cached image; loaded whole (a 1280-d float16 vector is
    2.5 kB: a million images is 2.5 GB, beyond which one would memory-map instead)."""

    def __init__(self, folder: str | Path):
        self.folder = storage.normalize(str(folder))   # a local path or a URI (s3://...)
        meta = storage.join(self.folder, "meta.json")
        if not storage.isfile(meta):
            raise FileNotFoundError(f"{meta} not found: build the cache with `python -m model_training.features "
                                    f"--shards ... --out {self.folder}`")
        self.meta = storage.read_json(meta)
        self.dim = int(self.meta["embed_dim"])
        self.vectors: dict[bytes, np.ndarray] = {}
        for path in feature_files(self.folder):
            t = storage.read_parquet(path)
            emb = np.asarray(t.column("embedding").combine_chunks().flatten(), dtype=np.float16).reshape(-1, self.dim)
            self.vectors.update(zip(t.column("digest").to_pylist(), emb))

    def __len__(self) -> int:
        return len(self.vectors)

    def get(self, jpg: bytes | None) -> np.ndarray | None:
        return None if jpg is None else self.vectors.get(image_digest(jpg))

    def lookup(self, blobs: list) -> torch.Tensor:
        """Encoded images -> [n, dim] float32; raises naming how many are not cached."""
        vecs = [self.get(b) for b in blobs]
        missing = sum(v is None for v in vecs)
        if missing:
            raise KeyError(f"{missing} of {len(blobs)} images have no cached features in {self.folder}")
        return torch.from_numpy(np.stack(vecs).astype(np.float32))


def feature_files(folder: str) -> list[str]:
    return [f for f in storage.files(folder, ".parquet") if storage.basename(f).startswith("features-")]


def _iter_images(paths: list[str], column: str):
    for path in paths:
        pf = storage.parquet_file(path)
        if column not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no {column!r} column (columns: {pf.schema_arrow.names})")
        for rb in pf.iter_batches(batch_size=256, columns=[column]):
            yield from rb.column(0).to_pylist()


def cache_features(parquet: str | list[str], out: str | Path, teacher: str = "efficientnet-lite0",
                   column: str = "jpg", batch_size: int = 64, device: str | None = None) -> dict:
    """Embed every distinct image of the Parquet file(s) not yet in OUT with the frozen teacher."""
    from tqdm import tqdm

    from model_training.data import list_shards
    from pipeline.distill.teacher import load_teacher

    out = storage.normalize(str(out))
    paths = [p for p in list_shards(parquet) if p.endswith(".parquet")]
    if not paths:
        raise FileNotFoundError(f"no Parquet files at {parquet}")
    meta_path = storage.join(out, "meta.json")
    if storage.isfile(meta_path):
        meta = storage.read_json(meta_path)
        if meta["teacher"]["spec"] != teacher:
            raise ValueError(f"{out} caches features of teacher {meta['teacher']['spec']!r}, not {teacher!r}: "
                             "use another folder")
        known = set(FeatureCache(out).vectors)
    else:
        meta, known = None, set()
    todo: dict[bytes, bytes] = {}
    n_rows = n_bad = 0
    for jpg in _iter_images(paths, column):
        n_rows += 1
        if jpg is None:
            n_bad += 1
            continue
        d = image_digest(jpg)
        if d not in known and d not in todo:
            todo[d] = jpg
    model = load_teacher(teacher, device)
    if meta is None:
        meta = {"teacher": model.describe(), "embed_dim": model.embed_dim}
    digests, blobs = list(todo), list(todo.values())
    part = len(feature_files(out))
    chunk = 4096   # one output file per chunk: an interrupted run keeps what it finished
    for start in tqdm(range(0, len(blobs), chunk), desc="image features", unit="chunk", disable=not blobs):
        emb, errors = model.embed_bytes(blobs[start:start + chunk], batch_size)
        ok = [d for i, d in enumerate(digests[start:start + chunk]) if i not in errors]
        n_bad += len(errors)
        table = pa.table({"digest": pa.array(ok, pa.binary(16)),
                          "embedding": pa.array(list(emb.astype(np.float16)), pa.list_(pa.float16()))},
                         schema=FEATURES_SCHEMA)
        storage.write_parquet(table, storage.join(out, f"features-{part:05d}.parquet"))   # whole or not at all
        part += 1
    storage.write_json(meta_path, meta)
    return {"rows": n_rows, "embedded": len(blobs), "already_cached": len(known), "undecodable": n_bad,
            "teacher": teacher}


class FeatureHead(nn.Module):
    """The trainable part of the locked image side: frozen features -> joint embedding."""

    def __init__(self, in_dim: int, embed_dim: int, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", nargs="+", required=True, help="Parquet files / folders / globs with encoded images")
    ap.add_argument("--out", required=True, help="feature cache folder (created or extended)")
    ap.add_argument("--teacher", default="efficientnet-lite0", help="pipeline.distill.teacher spec (default: %(default)s)")
    ap.add_argument("--column", default="jpg", help="image bytes column (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    a = ap.parse_args(argv)
    print(json.dumps(cache_features(a.shards, a.out, a.teacher, a.column, a.batch_size), indent=2))


if __name__ == "__main__":
    main()
