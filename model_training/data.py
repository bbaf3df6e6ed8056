"""Streaming training data: Parquet shards or webdataset tars (+ optional label shards) -> batches of tensors.

    from model_training.data import ShardStream, make_loader
    stream = ShardStream(list_shards("out/filter/shards"), tokenizer, image_size=64, batch_size=64,
                         labels_dir="out/labels", seed=0)
    list_shards("s3://bucket/laion-cat/webdataset/{00000..00099}.tar")   # tars, any fsspec URI, brace patterns
    for batch in make_loader(stream, num_workers=2): ...   # dict: images, texts, keys, concepts, position

How it works, and why:
- Every path (shards, labels) is a local path or a URI (s3://, gs://, file://, ...): listed, globbed
  and opened through pipeline.store.storage (fsspec), and handed on as a string (a URI is never made a
  pathlib.Path, which would turn s3://b into s3:/b).
- Shards are Parquet files with at least key, caption, jpg (schemas.SHARD has more), read row group
  by row group (pyarrow iter_batches), or webdataset tars (KEY.jpg|png|jpeg|webp + KEY.txt [+ KEY.json
  whose "key" is the row key], as pipeline/store/webdataset.py and img2dataset write them), read member by
  member from the stream without extracting anything. Never whole, so shard size does not matter. A
  tar of the filter's OUTPUT is used only once its done marker exists (pipeline.store.webdataset.trusted_tars).
- Work is split by FILE across (DDP rank x DataLoader worker); fewer shards than that is an error
  raised before training starts (the alternative is a rank with no data and a DDP hang).
- Each worker streams its files forever, epoch after epoch (training is counted in steps, so ranks
  with unequal data never wait on each other). File order and the shuffle buffer are seeded by
  (seed, epoch, worker); augmentation by (seed, epoch, key): the stream is a pure function of those.
- The dataset does its own batching (DataLoader batch_size=None): every batch carries the position
  (epoch, rows consumed in that epoch) of the worker that made it. The trainer saves the positions
  of the batches it consumed; on resume each worker skips exactly that many rows (without decoding
  them) and the worker order is rotated so the DataLoader's round robin continues where it stopped.
- Rows that cannot be used (undecodable or missing image, empty caption, no key, the unreadable rest
  of a truncated tar) are skipped and COUNTED per reason in batch["skipped"]; rows without labels are
  kept and counted in batch["unlabelled"].
- Labels (schemas.LABELS) are joined by key: from the label file with the same name as the shard
  (for a tar: as its source Parquet shard, named in its NNNNN_stats.json) when it exists (memory
  bounded by one shard), else from an index of all label files.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import open_clip
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.store import storage
from pipeline.store import webdataset as wds
from schemas import LABELS, SHARD

KEY, CAPTION, JPG = "key", "caption", "jpg"
assert {KEY, CAPTION, JPG} <= set(SHARD.columns), "schemas.SHARD changed: update data.py"
READ_COLUMNS = [KEY, CAPTION, JPG]
LABEL_COLUMNS = [c for c in LABELS.columns if c != KEY]
SKIP_DECODE, SKIP_CAPTION, SKIP_KEY = "image_decode_error", "empty_caption", "missing_key"
SKIP_FEATURES = "missing_image_features"
SKIP_TAR = "tar_read_error"   # counted once for the rest of a truncated or corrupt tar
SHARD_SUFFIXES = (".parquet", ".tar")
MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def _folder_shards(folder: str) -> list[str]:
    """A folder's tars when it has any (its .parquet files are then img2dataset's sidecars, without
    images), else its Parquet files; hidden and '_' names (temporaries, markers) left out."""
    return storage.files(folder, ".tar") or storage.files(folder, ".parquet")


def list_shards(spec: str | Path | list) -> list[str]:
    """A folder (its *.tar, else its *.parquet), a glob, a brace pattern ('out/webdataset/{00000..00003}.tar'),
    a file, or a list of those, each a local path or a URI -> sorted unique paths (URIs stay URIs, local
    paths become absolute). Tars of the filter's OUTPUT without their done marker are left out, with a warning."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    found: set[str] = set()
    for s in specs:
        for pattern in map(storage.normalize, braceexpand(str(s))):   # file:// -> a plain path
            if storage.isdir(pattern):
                found.update(_folder_shards(pattern))
            elif storage.isfile(pattern):
                found.add(pattern)
            else:
                found.update(p for p in storage.glob(pattern) if p.endswith(SHARD_SUFFIXES))
    if not found:
        raise FileNotFoundError(f"no Parquet shards or webdataset tars found at {spec} (run `make filter` first, "
                                f"or pass Parquet files with columns {READ_COLUMNS} or tars of KEY.jpg + KEY.txt)")
    _, untrusted = wds.trusted_tars(sorted(p for p in found if p.endswith(".tar")))
    if untrusted:
        print(f"[data] leaving out {len(untrusted)} tar(s) without their done marker (conversion unfinished), "
              f"e.g. {untrusted[0]}", flush=True)
    out = sorted(found - set(untrusted))
    if not out:
        raise FileNotFoundError(f"no finished shards at {spec}: every tar lacks its done marker (rerun the filter)")
    return out


def label_files(labels_dir: str | Path) -> list[str]:
    """LABELS/shards/*.parquet and LABELS/vocab.json that exist: the label data a run depends on."""
    labels_dir = storage.normalize(labels_dir)
    vocab = storage.join(labels_dir, "vocab.json")
    return storage.files(storage.join(labels_dir, "shards"), ".parquet") + ([vocab] if storage.isfile(vocab) else [])


def has_label_shards(labels_dir: str | Path) -> bool:
    return storage.isdir(storage.join(storage.normalize(labels_dir), "shards"))


def shard_keys(path: str | Path) -> list[str | None]:
    """Keys of a shard's usable rows, reading as little as possible: a Parquet shard's key column; a tar's
    sidecar Parquet (its rows with status success: img2dataset lists failed downloads there too), else
    the tar's members."""
    path = storage.normalize(path)
    if not path.endswith(".tar"):
        return storage.parquet_file(path).read(columns=[KEY]).column(KEY).to_pylist()
    sidecar = path[: -len(".tar")] + ".parquet"
    if storage.isfile(sidecar):
        t = storage.parquet_file(sidecar).read().to_pydict()
        if KEY in t:
            status = t.get("status") or ["success"] * len(t[KEY])
            return [k for k, st in zip(t[KEY], status) if st == "success"]
    return [row[0] for row in _tar_rows(path) if not isinstance(row, str)]


def _tar_rows(path: str):
    """(key, caption, image bytes) per sample of a tar, in member order; the string SKIP_TAR once for
    the rest of a tar that breaks off (truncated upload, corrupt block)."""
    def sample(stem, fields):
        key = stem.rsplit("/", 1)[-1]
        if "json" in fields:
            try:
                key = json.loads(fields["json"]).get("key", key)
            except (ValueError, AttributeError):
                pass   # not our json: the member name is the key, as in webdataset
        try:
            caption = fields["txt"].decode("utf-8") if "txt" in fields else None
        except UnicodeDecodeError:
            caption = None
        image = next((fields[e] for e in wds.IMAGE_EXTENSIONS if e in fields), None)
        return key, caption, image

    with storage.open(path, "rb") as f:
        stem, fields = None, {}
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:   # stream mode: members in order, no seeks
                for member in tar:
                    if not member.isfile():
                        continue
                    member_stem, ext = wds.split_member(member.name)
                    if member_stem != stem and stem is not None:
                        yield sample(stem, fields)
                        fields = {}
                    stem = member_stem
                    fields[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError):
            yield SKIP_TAR   # the sample being read is incomplete: not yielded
            return
        if stem is not None:
            yield sample(stem, fields)


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
    from pipeline.distill.concepts import read_vocab_json
    path = storage.join(storage.normalize(labels_dir), "vocab.json")
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path} is missing: label shards need their vocab.json")
    try:
        vocabs = read_vocab_json(path)
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
        self.dir = storage.join(storage.normalize(labels_dir), "shards")
        if not storage.isdir(self.dir):
            raise FileNotFoundError(f"{self.dir} does not exist (expected LABELS/shards/*.parquet)")
        self._all: dict | None = None

    @staticmethod
    def _read(paths) -> dict:
        out = {}
        for p in paths:
            t = storage.parquet_file(p).read(columns=[KEY, *LABEL_COLUMNS]).to_pydict()
            for i, k in enumerate(t[KEY]):
                out[k] = tuple(t[c][i] for c in LABEL_COLUMNS)
        return out

    def for_shard(self, shard: str) -> dict:
        name = wds.source_shard(shard) if shard.endswith(".tar") else storage.basename(shard)
        same_name = storage.join(self.dir, name) if name else None
        if same_name and storage.isfile(same_name):
            return self._read([same_name])
        if self._all is None:
            self._all = self._read(storage.files(self.dir, ".parquet"))
        return self._all


def label_coverage(shards: list[str], labels_dir: str | Path) -> dict:
    """How the shards' keys meet LABELS' keys, joined as the reader joins them (per shard, the same-named
    label file, else all of them): counts of shards, shards with no label at all, keys, matched keys, and
    the match rate. Reads key columns only."""
    labels = _Labels(labels_dir)
    n_keys = n_matched = 0
    unlabelled = []
    for shard in shards:
        keys = [k for k in shard_keys(shard) if k is not None]
        have = labels.for_shard(shard)
        matched = sum(k in have for k in keys)
        n_keys, n_matched = n_keys + len(keys), n_matched + matched
        if keys and not matched:
            unlabelled.append(storage.basename(shard))
    return {"n_shards": len(shards), "n_shards_unlabelled": len(unlabelled), "unlabelled_shards": unlabelled[:20],
            "n_keys": n_keys, "n_keys_labelled": n_matched, "match_rate": round(n_matched / max(1, n_keys), 4)}


def check_label_coverage(coverage: dict, labels_dir: str, allow_missing: bool) -> None:
    """Refuse labels that leave a shard with no label at all (made from another filter OUTPUT, or a
    distillation that did not finish) unless allow_missing; ValueError with the counts."""
    if coverage["n_shards_unlabelled"] and not allow_missing:
        raise ValueError(
            f"--labels {labels_dir} has no label for any row of {coverage['n_shards_unlabelled']} of "
            f"{coverage['n_shards']} shard file(s) (e.g. {coverage['unlabelled_shards'][0]}; "
            f"{coverage['n_keys_labelled']:,} of {coverage['n_keys']:,} keys labelled, "
            f"{100 * coverage['match_rate']:.1f}%): were the labels distilled from another filter OUTPUT? Distill "
            f"the OUTPUT these shards come from, or pass --allow-missing-labels to train with the labels that match")


class ShardStream(IterableDataset):
    def __init__(self, shards: list[str | Path], tokenizer, image_size: int, batch_size: int, *, train: bool = True,
                 labels_dir: str | Path | None = None, seed: int = 0, shuffle_buffer: int = 2048,
                 split: str = "train", holdout_fraction: float = 0.0, rank: int = 0, world_size: int = 1,
                 infinite: bool = True, train_fraction: float = 1.0, start_positions: dict[int, tuple[int, int]] | None = None,
                 worker_offset: int = 0, draft_decode: bool = True, image_features=None):
        if split not in ("train", "holdout", "all"):
            raise ValueError(f"split must be train | holdout | all, got {split!r}")
        self.shards, self.tokenizer, self.batch_size = [storage.normalize(p) for p in shards], tokenizer, batch_size
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
            if p.endswith(".tar"):
                continue   # a tar has no schema: its samples are checked (and counted when unusable) as read
            missing = set(READ_COLUMNS) - set(storage.parquet_file(p).schema_arrow.names)
            if missing:
                raise ValueError(f"{p} lacks column(s) {sorted(missing)}; shards need {READ_COLUMNS}")

    # ---------------------------------------------------------------- row stream
    def _keep(self, key) -> bool:
        if self.split == "all" or key is None:
            return True   # keyless rows flow on to be counted as skipped
        if is_holdout(key, self.holdout_fraction) != (self.split == "holdout"):
            return False
        return self.split != "train" or in_subset(key, self.train_fraction)

    def _rows(self, files: list[str]):
        """(key, caption, jpg, labels) per row of the files, or a skip reason (str) standing for rows."""
        for path in files:
            labels = self.labels.for_shard(path) if self.labels else None
            for row in self._file_rows(path):
                if isinstance(row, str):
                    yield row
                elif self._keep(row[0]):
                    yield (*row, labels.get(row[0]) if labels is not None else None)

    @staticmethod
    def _file_rows(path: str):
        if path.endswith(".tar"):
            yield from _tar_rows(path)
            return
        for rb in storage.parquet_file(path).iter_batches(batch_size=256, columns=READ_COLUMNS):
            d = rb.to_pydict()
            yield from zip(d[KEY], d[CAPTION], d[JPG])

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
        if isinstance(row, str):
            return row   # decided while reading (the unreadable rest of a tar)
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
