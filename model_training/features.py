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
config's.

A locked tower cannot learn to read. `--glyphs 96` (cache_features(glyph_side=96)) makes the one that can:
each cached vector also carries a 96x96 grayscale thumbnail (rendered 8-14%-of-height words stay legible
there, 64 px is not), and FeatureHead adds a small trainable CNN over it (GlyphCNN) to the MLP over the
teacher's features. The teacher part is copied from an existing cache of the same teacher (--reuse), so
adding glyphs costs a JPEG decode per image. The experiment's reading probe (experiments/budget.py)
measures whether a model trained this way reads.

A glyph CNN trained from scratch on 2 cores does not learn to read within the experiment's budgets
(docs/evaluation.md). `--ocr-tokens 16` (cache_features(ocr_tokens=16)) gives the tower a reader instead:
each vector also carries the BPE ids (open_clip's tokenizer, -1 padded) of the words the product's text
spotter reads in the image (confidence >= its min_conf, reading order), taken from the filter's own OCR
store (`--ocr-from` filter outputs, by image digest) where it read those bytes, else spotted here.
FeatureHead embeds them with the text tower's own token table (tied) and adds a learned projection of
their mean: whether the model trusts what it reads is what training decides - as in a large CLIP, which
has learned to read (Materzynska et al. 2022) - and the reading probe measures it.

The export holds the open_clip text tower plus feature_head.pt: it embeds images only from the same
teacher's features (say so when sharing it).
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
        self.glyph_side = int(self.meta.get("glyph_side", 0))   # > 0: the vectors end in a glyph thumbnail
        self.ocr_tokens = int(self.meta.get("ocr_tokens", 0))   # > 0: ... or in the token ids of the words read
        self.vectors: dict[bytes, np.ndarray] = {}
        for path in feature_files(self.folder):
            t = storage.read_parquet(path)
            emb = np.asarray(t.column("embedding").combine_chunks().flatten(), dtype=np.float16).reshape(-1, self.dim)
            self.vectors.update(zip(t.column("digest").to_pylist(), emb))

    _shared: dict = {}

    @classmethod
    def shared(cls, folder: str | Path) -> "FeatureCache":
        """This process's FeatureCache of `folder`, loaded once (runs after runs in one experiment worker read
        the same cache: a load costs seconds); loaded again when files were added to it since."""
        folder = storage.normalize(str(folder))
        key = (folder, tuple(feature_files(folder)) if storage.isdir(folder) else ())
        if cls._shared.get(folder, (None,))[0] != key:
            cls._shared[folder] = (key, cls(folder))
        return cls._shared[folder][1]

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


def glyph_thumbnails(blobs: list[bytes], side: int) -> tuple[np.ndarray, dict[int, str]]:
    """Encoded images -> [n, side*side] grayscale 0-255 (squashed to a square: words stay whole), and
    {input index: error} for the undecodable ones, as Teacher.embed_bytes returns them."""
    from PIL import Image

    from model_training.data import decode_image
    out, errors = [], {}
    for i, jpg in enumerate(blobs):
        try:
            im = decode_image(jpg, draft_size=2 * side).convert("L").resize((side, side), Image.BILINEAR)
            out.append(np.asarray(im, dtype=np.float32).reshape(-1))
        except Exception as exc:  # noqa: BLE001 - counted as undecodable, as the teacher counts them
            errors[i] = str(exc)[:1000]
    return (np.stack(out) if out else np.zeros((0, side * side), np.float32)), errors


def _reading_order(detections) -> list:
    """Lines top to bottom (a line at its highest word), words left to right; unlined words are lines."""
    def line_of(k, d):
        return d.line if d.line >= 0 else -1 - k
    top = {}
    for k, d in enumerate(detections):
        top[line_of(k, d)] = min(top.get(line_of(k, d), float("inf")), d.box[1] if d.box else 0.0)
    order = sorted(range(len(detections)), key=lambda k: (top[line_of(k, detections[k])], line_of(k, detections[k]),
                                                         detections[k].box[0] if detections[k].box else 0.0))
    return [detections[k] for k in order]


def stored_detections(filter_outputs: list[str | Path]) -> dict[bytes, list]:
    """image digest -> the detections (textspot.Detection) the filter stored for those bytes in
    OUTPUT/ocr/ (schemas.OCR) of each filter output; later outputs do not override earlier ones."""
    from pipeline.filter.textspot import Detection
    found: dict[bytes, list] = {}
    for folder in filter_outputs:
        for path in storage.files(storage.join(storage.normalize(str(folder)), "ocr"), ".parquet"):
            t = storage.read_parquet(path, columns=["digest", "detections"])
            for digest, dets in zip(t.column("digest").to_pylist(), t.column("detections").to_pylist()):
                if digest is not None and digest not in found:
                    found[digest] = [Detection(d["text"], d["conf"], (d["x0"], d["y0"], d["x1"], d["y1"]), d["line"])
                                     for d in dets]
    return found


def read_token_ids(blobs: list[bytes], n_tokens: int, known: dict[bytes, list] | None = None
                   ) -> tuple[np.ndarray, dict[int, str]]:
    """Encoded images -> the BPE ids (open_clip's tokenizer, at most n_tokens, -1 padded) of the words the text
    spotter (TextSpotParams() defaults) reads with confidence >= min_conf, in reading order, as
    split_token_ids' [n_decoded, 2 * n_tokens]; and {input index: error} for the undecodable ones.
    Detections in `known` (by digest: the filter's reading of the same bytes) are reused, the rest spotted."""
    from open_clip.tokenizer import SimpleTokenizer
    from tqdm import tqdm

    from pipeline.filter.spotting import get_spotter
    from pipeline.filter.textspot import TextSpotParams
    from pipeline.media.images import decode_image
    params, known = TextSpotParams(), known or {}
    detections, errors, todo = {}, {}, {}
    for i, jpg in enumerate(blobs):
        d = image_digest(jpg)
        if d in known:
            detections[i] = known[d]
            continue
        try:
            todo[i] = decode_image(jpg).array()
        except Exception as exc:  # noqa: BLE001 - counted as undecodable, as the teacher counts them
            errors[i] = str(exc)[:1000]
    if todo:
        spotter, idx = get_spotter(params), list(todo)
        for start in tqdm(range(0, len(idx), 32), desc="text spotting (ocr tower)", unit="batch", leave=False,
                          disable=len(idx) < 256):
            batch = idx[start:start + 32]
            detections.update(zip(batch, spotter.spot([todo[i] for i in batch])))
    tokenizer = SimpleTokenizer()
    ids = np.full((len(blobs), n_tokens), -1, np.int64)
    for i, dets in detections.items():
        words = [d.text for d in _reading_order([d for d in dets if d.conf >= params.min_conf])]
        read = tokenizer.encode(" ".join(words))[:n_tokens] if words else []
        ids[i, :len(read)] = read
    ok = [i for i in range(len(blobs)) if i not in errors]
    return split_token_ids(ids[ok]), errors


# The cache stores float16, exact for integers up to 2048 only: an id (< 49408) is kept as id // 256 and
# id % 256, both exact; -1 (padding) as -1, -1.
def split_token_ids(ids: np.ndarray) -> np.ndarray:
    """[n, k] int ids (-1 = none) -> [n, 2k] float32: k high parts, then k low parts."""
    pad = ids < 0
    return np.concatenate([np.where(pad, -1, ids // 256), np.where(pad, -1, ids % 256)], axis=1).astype(np.float32)


def join_token_ids(parts: torch.Tensor) -> torch.Tensor:
    """split_token_ids' inverse on a [B, 2k] tensor: [B, k] long ids, -1 where none."""
    hi, lo = parts.round().long().chunk(2, dim=1)
    return torch.where(hi < 0, -1, hi * 256 + lo)


class _WithExtras:
    """A teacher whose vectors end in extra columns (a glyph thumbnail, or the token ids of the words read);
    the teacher part comes from `reuse` (a cache of the same teacher) where it is there, else from the
    teacher, loaded only if needed. extras(blobs) -> ([n_ok, extra_dim], {index: error})."""

    def __init__(self, teacher: str, extras, extra_dim: int, reuse: FeatureCache | None, device: str | None):
        from pipeline.distill.teacher import load_teacher
        self.extras, self.reuse, self._load = extras, reuse, lambda: load_teacher(teacher, device)
        self._teacher = None if reuse is not None else self._load()
        self.meta = reuse.meta["teacher"] if reuse is not None else self._teacher.describe()
        self.teacher_dim = reuse.dim if reuse is not None else self._teacher.embed_dim
        self.embed_dim = self.teacher_dim + extra_dim

    def describe(self) -> dict:
        return self.meta

    def embed_bytes(self, blobs: list[bytes], batch_size: int) -> tuple[np.ndarray, dict[int, str]]:
        extra, errors = self.extras(blobs)
        ok = [i for i in range(len(blobs)) if i not in errors]
        found = {i: self.reuse.get(blobs[i]) if self.reuse is not None else None for i in ok}
        todo = [i for i, v in found.items() if v is None]
        if todo:
            self._teacher = self._teacher or self._load()
            emb, bad = self._teacher.embed_bytes([blobs[i] for i in todo], batch_size)
            errors.update({todo[j]: msg for j, msg in bad.items()})   # the teacher's guarded decoder refused it
            found.update(zip([i for j, i in enumerate(todo) if j not in bad], emb))
        keep = [k for k, i in enumerate(ok) if i not in errors]
        if not keep:
            return np.zeros((0, self.embed_dim), np.float32), errors
        return np.concatenate([np.stack([found[ok[k]] for k in keep]).astype(np.float32), extra[keep]], axis=1), errors


def cache_features(parquet: str | list[str], out: str | Path, teacher: str = "efficientnet-lite0",
                   column: str = "jpg", batch_size: int = 64, device: str | None = None,
                   glyph_side: int = 0, reuse: str | Path | None = None, ocr_tokens: int = 0,
                   ocr_from: list[str | Path] = ()) -> dict:
    """Embed every distinct image of the Parquet file(s) not yet in OUT with the frozen teacher.
    glyph_side > 0 appends a glyph thumbnail to every vector (a tower that may learn to read); ocr_tokens > 0
    appends the token ids of the words the text spotter reads (a tower given a reader), reusing the OCR
    stored by the filter outputs in `ocr_from`. Either takes the teacher's part from the cache at `reuse`
    where it has the image."""
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
        if (meta["teacher"]["spec"], int(meta.get("glyph_side", 0)), int(meta.get("ocr_tokens", 0))) != (
                teacher, glyph_side, ocr_tokens):
            raise ValueError(f"{out} caches features of teacher {meta['teacher']['spec']!r} (glyphs "
                             f"{meta.get('glyph_side', 0)}, ocr tokens {meta.get('ocr_tokens', 0)}), not {teacher!r} "
                             f"(glyphs {glyph_side}, ocr tokens {ocr_tokens}): use another folder")
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
    if glyph_side and ocr_tokens:
        raise ValueError("a cache carries glyph thumbnails or read tokens, not both")
    if glyph_side:
        model = _WithExtras(teacher, lambda blobs: glyph_thumbnails(blobs, glyph_side), glyph_side * glyph_side,
                            FeatureCache(reuse) if reuse else None, device)
    elif ocr_tokens:
        stored = stored_detections(list(ocr_from)) if todo else {}
        model = _WithExtras(teacher, lambda blobs: read_token_ids(blobs, ocr_tokens, stored), 2 * ocr_tokens,
                            FeatureCache(reuse) if reuse else None, device)
    else:
        model = load_teacher(teacher, device)
    if meta is None:
        meta = {"teacher": model.describe(), "embed_dim": model.embed_dim}
        meta.update({k: v for k, v in (("glyph_side", glyph_side), ("ocr_tokens", ocr_tokens)) if v})
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


class GlyphCNN(nn.Module):
    """A small from-scratch CNN over a glyph thumbnail: four stride-2 convolutions (96 -> 6 px), then max and
    mean pooling, so a word counts wherever it is drawn. ~9M multiply-adds per image: a CPU step stays cheap."""

    def __init__(self, side: int, embed_dim: int, width: int = 16):
        super().__init__()
        self.side = side
        layers, c_in = [], 1
        for c_out in (width, 2 * width, 4 * width, 8 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(2 * c_in, embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.convs((pixels.view(-1, 1, self.side, self.side) - 128.0) / 64.0)
        return self.proj(torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1))


class TokenReader(nn.Module):
    """The words read in an image (token ids from the cache) -> a joint-space offset: their mean embedding in
    the text tower's own token table (passed in: tied, so a word read means what the word written means),
    through a small MLP. Images with nothing read get zero: the MLP over the teacher's features decides."""

    def __init__(self, width: int, embed_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        # starts silent (its output layer zero): a model whose data rarely shows text keeps a reader it never
        # trained near zero instead of adding a random offset to every image with words on it (measured: a
        # randomly initialised reader cost the filtered arm ~20 RSUM more on text-drawn dev than the locked tower)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, parts: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        ids = join_token_ids(parts)
        read = (ids >= 0).unsqueeze(-1).to(token_embedding.dtype)
        mean = (nn.functional.embedding(ids.clamp(min=0), token_embedding) * read).sum(1) / read.sum(1).clamp(min=1)
        return self.net(mean) * (read.sum(1) > 0).to(mean.dtype)


class FeatureHead(nn.Module):
    """The trainable part of the locked image side: frozen features -> joint embedding, plus a GlyphCNN over
    the glyph thumbnail the vectors end in when the cache has one (glyph_side > 0), or a TokenReader over the
    words read (ocr_tokens > 0; it needs the text tower's token table at forward)."""

    def __init__(self, in_dim: int, embed_dim: int, hidden: int = 512, glyph_side: int = 0, ocr_tokens: int = 0,
                 token_width: int = 0):
        super().__init__()
        self.teacher_dim = in_dim - glyph_side * glyph_side - 2 * ocr_tokens
        self.net = nn.Sequential(nn.LayerNorm(self.teacher_dim), nn.Linear(self.teacher_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, embed_dim))
        self.glyphs = GlyphCNN(glyph_side, embed_dim) if glyph_side else None
        self.reader = TokenReader(token_width, embed_dim) if ocr_tokens else None

    def forward(self, x: torch.Tensor, token_embedding: torch.Tensor | None = None) -> torch.Tensor:
        out = self.net(x[:, :self.teacher_dim])
        if self.glyphs is not None:
            out = out + self.glyphs(x[:, self.teacher_dim:])
        if self.reader is not None:
            out = out + self.reader(x[:, self.teacher_dim:], token_embedding)
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", nargs="+", required=True, help="Parquet files / folders / globs with encoded images")
    ap.add_argument("--out", required=True, help="feature cache folder (created or extended)")
    ap.add_argument("--teacher", default="efficientnet-lite0", help="pipeline.distill.teacher spec (default: %(default)s)")
    ap.add_argument("--column", default="jpg", help="image bytes column (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    ap.add_argument("--glyphs", type=int, default=0, metavar="SIDE",
                    help="append a SIDE x SIDE grayscale thumbnail to every vector: a tower that can learn to read")
    ap.add_argument("--ocr-tokens", type=int, default=0, metavar="N",
                    help="append the BPE ids of up to N words-pieces the text spotter reads: a tower given a reader")
    ap.add_argument("--ocr-from", nargs="*", default=[], metavar="FILTER_OUT",
                    help="with --ocr-tokens: filter outputs whose stored OCR (OUT/ocr/) is reused for the same bytes")
    ap.add_argument("--reuse", default=None, help="with --glyphs / --ocr-tokens: a cache of the same teacher to copy "
                                                  "vectors from")
    a = ap.parse_args(argv)
    print(json.dumps(cache_features(a.shards, a.out, a.teacher, a.column, a.batch_size, glyph_side=a.glyphs,
                                    reuse=a.reuse, ocr_tokens=a.ocr_tokens, ocr_from=a.ocr_from), indent=2))


if __name__ == "__main__":
    main()
