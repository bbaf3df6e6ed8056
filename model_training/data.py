"""Streaming training data: Parquet shards (+ optional label shards) -> batches of tensors.

    from model_training.data import ShardStream, make_loader
    stream = ShardStream(list_shards("out/filter/shards"), tokenizer, image_size=64, batch_size=64,
                         labels_dir="out/labels", seed=0)
    for batch in make_loader(stream, num_workers=2): ...   # dict: images, texts, keys, concepts, position

How it works, and why:
- Shards are Parquet files with at least key, caption, jpg (schemas.SHARD has more). They are read
  row group by row group (pyarrow iter_batches), never whole, so shard size does not matter.
- Work is split by FILE across (DDP rank x DataLoader worker); fewer shards than that is an error
  raised before training starts (the alternative is a rank with no data and a DDP hang).
- Each worker streams its files forever, epoch after epoch (training is counted in steps, so ranks
  with unequal data never wait on each other). File order and the shuffle buffer are seeded by
  (seed, epoch, worker); augmentation by (seed, epoch, key): the stream is a pure function of those.
- The dataset does its own batching (DataLoader batch_size=None): every batch carries the position
  (epoch, rows consumed in that epoch) of the worker that made it. The trainer saves the positions
  of the batches it consumed; on resume each worker skips exactly that many rows (without decoding
  them) and the worker order is rotated so the DataLoader's round robin continues where it stopped.
- Rows that cannot be used (undecodable image, empty caption, no key) are skipped and COUNTED per
  reason in batch["skipped"]; rows without labels are kept and counted in batch["unlabelled"].
- Labels (schemas.LABELS) are joined by key: from the label file with the same name as the shard
  when it exists (memory bounded by one shard), else from an index of all label files.
"""
from __future__ import annotations

import glob
import hashlib
import io
import random
from pathlib import Path

import open_clip
import pyarrow.parquet as pq
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from schemas import LABELS, SHARD

KEY, CAPTION, JPG = "key", "caption", "jpg"
assert {KEY, CAPTION, JPG} <= set(SHARD.columns), "schemas.SHARD changed: update data.py"
READ_COLUMNS = [KEY, CAPTION, JPG]
LABEL_COLUMNS = [c for c in LABELS.columns if c != KEY]
SKIP_DECODE, SKIP_CAPTION, SKIP_KEY = "image_decode_error", "empty_caption", "missing_key"
SKIP_FEATURES = "missing_image_features"
MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def list_shards(spec: str | Path | list) -> list[Path]:
    """A folder (its *.parquet), a glob, a file, or a list of those -> sorted unique paths."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    out: set[Path] = set()
    for s in specs:
        p = Path(s)
        if p.is_dir():
            out.update(p.glob("*.parquet"))
        elif p.is_file():
            out.add(p)
        else:
            out.update(Path(x) for x in glob.glob(str(s)))
    if not out:
        raise FileNotFoundError(f"no Parquet shards found at {spec} (run `make filter` first, or pass a folder of "
                                f"Parquet files with columns {READ_COLUMNS})")
    return sorted(out)


def is_holdout(key: str, fraction: float) -> bool:
    """Stable key-hash split: the same key is held out in every run, on every machine."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return h / 2.0 ** 64 < fraction


def in_subset(key: str, fraction: float) -> bool:
    """Stable training subset (data-scaling runs): a hash salted differently from is_holdout, so the
    subset is independent of the held-out split and nested (the 10% subset is inside the 25% one)."""
    if fraction >= 1.0:
        return True
    h = int.from_bytes(hashlib.sha1(f"subset:{key}".encode()).digest()[:8], "big")
    return h / 2.0 ** 64 < fraction


def check_sharding(n_shards: int, num_workers: int, world_size: int):
    readers = max(num_workers, 1) * world_size
    if n_shards < readers:
        raise ValueError(f"{n_shards} shard file(s) for {world_size} rank(s) x {max(num_workers, 1)} DataLoader "
                         f"worker(s) = {readers} readers: every reader needs at least one file. Lower --num-workers, "
                         f"use fewer ranks, or split the data into more shards.")


def read_vocab(labels_dir: str | Path) -> tuple[int, int]:
    """Sizes of the object and attribute vocabularies of LABELS/vocab.json, as make distill writes it."""
    from pipeline.concepts import read_vocab_json
    path = Path(labels_dir) / "vocab.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: label shards need their vocab.json")
    try:
        vocabs = read_vocab_json(str(path))
        return len(vocabs["objects"]), len(vocabs["attributes"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a vocab.json written by jobs/distill_labels.py: {e}") from e


def decode_image(jpg: bytes, draft_size: int | None = None) -> Image.Image:
    im = Image.open(io.BytesIO(jpg))
    if draft_size and im.format == "JPEG":
        im.draft("RGB", (draft_size, draft_size))   # DCT-domain downscale: decoding 4-8x cheaper, still >= size
    return im.convert("RGB")


class ImageTransform:
    """open_clip-like preprocessing. Eval: resize shorter side + center crop (open_clip's eval
    transform). Train: a light random-resized crop (scale 0.9-1, open_clip's default) whose
    randomness comes from the per-sample rng, so batches are reproducible across workers/resume.
    No flips: captions say "left" and "right"."""

    def __init__(self, image_size: int, train: bool, scale=(0.9, 1.0)):
        self.size, self.train, self.scale = image_size, train, scale

    def __call__(self, im: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        w, h = im.size
        if self.train:
            area = w * h * rng.uniform(*self.scale)
            side = min(int(round(area ** 0.5)), w, h)
            top, left = rng.randint(0, h - side), rng.randint(0, w - side)
            im = im.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + side, top + side))
        else:
            im = TF.center_crop(TF.resize(im, self.size, interpolation=TF.InterpolationMode.BICUBIC), self.size)
        return TF.normalize(TF.to_tensor(im), MEAN, STD)


class _Labels:
    """Key -> (object idx, object probs, attribute idx, attribute probs), joined shard by shard."""

    def __init__(self, labels_dir: str | Path):
        self.dir = Path(labels_dir) / "shards"
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir} does not exist (expected LABELS/shards/*.parquet)")
        self._all: dict | None = None

    @staticmethod
    def _read(paths) -> dict:
        out = {}
        for p in paths:
            t = pq.read_table(p, columns=[KEY, *LABEL_COLUMNS]).to_pydict()
            for i, k in enumerate(t[KEY]):
                out[k] = tuple(t[c][i] for c in LABEL_COLUMNS)
        return out

    def for_shard(self, shard: Path) -> dict:
        same_name = self.dir / shard.name
        if same_name.is_file():
            return self._read([same_name])
        if self._all is None:
            self._all = self._read(sorted(self.dir.glob("*.parquet")))
        return self._all


class ShardStream(IterableDataset):
    def __init__(self, shards: list[Path], tokenizer, image_size: int, batch_size: int, *, train: bool = True,
                 labels_dir: str | Path | None = None, seed: int = 0, shuffle_buffer: int = 2048,
                 split: str = "train", holdout_fraction: float = 0.0, rank: int = 0, world_size: int = 1,
                 infinite: bool = True, train_fraction: float = 1.0, start_positions: dict[int, tuple[int, int]] | None = None,
                 worker_offset: int = 0, draft_decode: bool = True, image_features=None):
        if split not in ("train", "holdout", "all"):
            raise ValueError(f"split must be train | holdout | all, got {split!r}")
        self.shards, self.tokenizer, self.batch_size = list(shards), tokenizer, batch_size
        self.transform = ImageTransform(image_size, train)
        self.draft_size = image_size if draft_decode else None
        self.labels = _Labels(labels_dir) if labels_dir else None
        self.features = image_features   # a model_training.features.FeatureCache: images -> frozen features
        self.seed, self.shuffle_buffer, self.split, self.holdout_fraction = seed, shuffle_buffer, split, holdout_fraction
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        self.train_fraction = train_fraction   # applies to the train split only
        self.rank, self.world_size, self.infinite = rank, world_size, infinite
        self.start_positions = dict(start_positions or {})
        self.worker_offset = worker_offset
        for p in self.shards:  # fail before training, not inside a worker, on a shard missing columns
            missing = set(READ_COLUMNS) - set(pq.read_schema(p).names)
            if missing:
                raise ValueError(f"{p} lacks column(s) {sorted(missing)}; shards need {READ_COLUMNS}")

    # ---------------------------------------------------------------- row stream
    def _keep(self, key) -> bool:
        if self.split == "all" or key is None:
            return True   # keyless rows flow on to be counted as skipped
        if is_holdout(key, self.holdout_fraction) != (self.split == "holdout"):
            return False
        return self.split != "train" or in_subset(key, self.train_fraction)

    def _rows(self, files: list[Path]):
        for path in files:
            labels = self.labels.for_shard(path) if self.labels else None
            for rb in pq.ParquetFile(path).iter_batches(batch_size=256, columns=READ_COLUMNS):
                d = rb.to_pydict()
                for key, caption, jpg in zip(d[KEY], d[CAPTION], d[JPG]):
                    if self._keep(key):
                        yield key, caption, jpg, (labels.get(key) if labels is not None else None)

    def _shuffled(self, rows, rng: random.Random):
        if self.shuffle_buffer <= 1:
            yield from rows
            return
        buf = []
        for row in rows:
            if len(buf) < self.shuffle_buffer:
                buf.append(row)
                continue
            i = rng.randrange(len(buf))
            buf[i], row = row, buf[i]
            yield row
        rng.shuffle(buf)
        yield from buf

    def _epoch_rows(self, files, epoch: int, reader: int):
        order = list(files)
        if self.shuffle_buffer > 1:
            random.Random(f"files-{self.seed}-{epoch}-{reader}").shuffle(order)
        return self._shuffled(self._rows(order), random.Random(f"buffer-{self.seed}-{epoch}-{reader}"))

    # ---------------------------------------------------------------- batches
    def _sample(self, row, epoch: int):
        key, caption, jpg, labels = row
        if key is None:
            return SKIP_KEY
        if not isinstance(caption, str) or not caption.strip():
            return SKIP_CAPTION
        if self.features is not None:
            vec = self.features.get(jpg)
            return SKIP_FEATURES if vec is None else (key, caption, torch.from_numpy(vec.astype("float32")), labels)
        try:
            im = decode_image(jpg, self.draft_size)
            rng = random.Random(f"aug-{self.seed}-{epoch}-{key}") if self.transform.train else None
            image = self.transform(im, rng)
        except Exception:  # noqa: BLE001 - any decoder failure is a counted skip, never a crash mid-epoch
            return SKIP_DECODE
        return key, caption, image, labels

    def _collate(self, samples, position, skipped) -> dict:
        keys, captions, images, labels = zip(*samples)
        batch = {"keys": list(keys), "captions": list(captions), "images": torch.stack(images),
                 "texts": self.tokenizer(list(captions)), "position": position, "skipped": dict(skipped)}
        if self.labels is not None:
            batch["unlabelled"] = sum(lab is None for lab in labels)
            batch["concepts"] = _pad_labels(labels)
        return batch

    def __iter__(self):
        info = get_worker_info()
        n_workers, physical = (info.num_workers, info.id) if info else (1, 0)
        check_sharding(len(self.shards), n_workers, self.world_size)
        logical = (physical + self.worker_offset) % n_workers
        reader = self.rank * n_workers + logical
        files = self.shards[reader::self.world_size * n_workers]
        epoch, skip = self.start_positions.get(logical, (0, 0))
        samples, skipped = [], {}
        while True:
            rows_done = 0
            for row in self._epoch_rows(files, epoch, reader):
                rows_done += 1
                if rows_done <= skip:
                    continue   # resume: these rows were consumed before the interruption
                s = self._sample(row, epoch)
                if isinstance(s, str):
                    skipped[s] = skipped.get(s, 0) + 1
                    continue
                samples.append(s)
                if len(samples) == self.batch_size:
                    yield self._collate(samples, (logical, epoch, rows_done), skipped)
                    samples, skipped = [], {}
            if rows_done == 0:
                raise ValueError(f"reader {reader} ({[str(f) for f in files]}) has no rows for split "
                                 f"{self.split!r} (holdout_fraction={self.holdout_fraction}, "
                                 f"train_fraction={self.train_fraction})")
            skip = 0
            if not self.infinite:
                if samples:
                    yield self._collate(samples, (logical, epoch, rows_done), skipped)
                return
            epoch += 1


def _pad_labels(labels) -> dict:
    """Sparse top-k labels -> padded [B, K] tensors (index -1 / prob 0 at padding)."""
    out = {"has_labels": torch.tensor([lab is not None for lab in labels])}
    for j, name in enumerate(LABEL_COLUMNS):
        is_index = name.endswith("indices")
        rows = [list(lab[j] or []) if lab is not None else [] for lab in labels]
        k = max(1, max(len(r) for r in rows))
        t = torch.full((len(rows), k), -1 if is_index else 0, dtype=torch.long if is_index else torch.float32)
        for i, r in enumerate(rows):
            if r:
                t[i, :len(r)] = torch.tensor(r, dtype=t.dtype)
        out[name] = t
    for kind in ("object", "attribute"):   # renormalise the kept top-k mass (the targets are distributions)
        p = out[f"{kind}_probs"]
        out[f"{kind}_probs"] = p / p.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return out


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    """Batches are built inside the dataset; the loader only parallelises and prefetches."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None)
