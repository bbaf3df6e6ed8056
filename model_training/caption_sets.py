"""Image-caption sets in the papers' layouts, and writing them as training shards.

    .venv/bin/python -m model_training.caption_sets --coco-json captions.json --images DIR --out shards/ [--n-shards 4]

`load_coco` reads a COCO captions json (images + annotations); `load_karpathy` reads the Karpathy
split files (dataset_coco.json / dataset_flickr30k.json / dataset_flickr8k.json: images[].{filepath?,
filename, split, sentences[].raw}); `load_flickr8k` reads Flickr8k as distributed (Flickr8k.token.txt
+ Flickr_8k.{train,dev,test}Images.txt + an image folder), its Karpathy json, or the Parquet layout
of ../shared/data/flickr8k (images.parquet + captions.parquet). All return a CaptionSet whose captions are grouped per image (the first
`captions_per_image`, 5 in the retrieval protocol) with `text_to_image[j]` = image index of caption j.
`write_shards` turns a CaptionSet into SHARD Parquet files (one row per caption), which is how the
tests and anyone with COCO-style data get training input without running the filter.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
from PIL import Image

from schemas import SHARD

log = logging.getLogger(__name__)


@dataclass
class CaptionSet:
    image_paths: list[Path | bytes]   # a file path, or the encoded image itself (Parquet layouts)
    captions: list[str]
    text_to_image: list[int]
    image_ids: list[str]
    notes: list[str] = field(default_factory=list)   # explained irregularities (e.g. images with < 5 captions)

    def summary(self) -> dict:
        return {"n_images": len(self.image_paths), "n_captions": len(self.captions), "notes": self.notes}

    def image_bytes(self, i: int) -> bytes:
        item = self.image_paths[i]
        return item if isinstance(item, bytes) else Path(item).read_bytes()


def open_image(item: Path | bytes | Image.Image) -> Image.Image:
    """A CaptionSet image entry (path or encoded bytes) or a PIL image -> RGB PIL image."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as im:
        return im.convert("RGB")


def _group(entries: list[tuple[str, Path, list[str]]], captions_per_image: int | None) -> CaptionSet:
    paths, caps, t2i, ids, short = [], [], [], [], 0
    for image_id, path, sentences in entries:
        sentences = [s.strip() for s in sentences if s and s.strip()]
        if captions_per_image:
            short += len(sentences) < captions_per_image
            sentences = sentences[:captions_per_image]
        if not sentences:
            raise ValueError(f"image {image_id} ({path}) has no caption")
        for s in sentences:
            caps.append(s)
            t2i.append(len(paths))
        paths.append(path)
        ids.append(str(image_id))
    notes = [f"{short} images have fewer than {captions_per_image} captions; all of theirs are used"] if short else []
    return CaptionSet(paths, caps, t2i, ids, notes)


def load_coco(captions_json: str | Path, image_dir: str | Path, captions_per_image: int | None = 5) -> CaptionSet:
    """COCO captions format. Images keep the json's order; captions keep annotation order."""
    data = json.loads(Path(captions_json).read_text())
    by_image: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    entries = []
    for img in data["images"]:
        if img["id"] not in by_image:
            raise ValueError(f"COCO image {img['id']} ({img['file_name']}) has no annotations")
        entries.append((img["id"], Path(image_dir) / img["file_name"], by_image[img["id"]]))
    return _group(entries, captions_per_image)


def load_karpathy(split_json: str | Path, image_dir: str | Path, split: str = "test",
                  captions_per_image: int | None = 5) -> CaptionSet:
    """Karpathy split json; COCO's entries carry `filepath` (val2014/...), Flickr30k's do not."""
    data = json.loads(Path(split_json).read_text())
    entries = [(img.get("cocoid", img.get("imgid", img["filename"])),
                Path(image_dir) / img.get("filepath", "") / img["filename"],
                [s["raw"] for s in img["sentences"]])
               for img in data["images"] if img["split"] == split]
    if not entries:
        raise ValueError(f"{split_json} has no images with split == {split!r}")
    return _group(entries, captions_per_image)


def load_flickr8k(root: str | Path, split: str = "test", captions_per_image: int | None = 5) -> CaptionSet:
    """Flickr8k in any of its three layouts (see the module docstring); split: train | dev | test.

    Distributed layout: ROOT/Flickr8k.token.txt ("<file>#<n>\t<caption>" lines), ROOT/Flickr_8k.<split>Images.txt
    (one file name per line), images in ROOT/Flicker8k_Dataset/ (the archive's spelling), ROOT/Flickr8k_Dataset/,
    ROOT/Images/ or ROOT/images/. Karpathy layout: ROOT/dataset_flickr8k.json (split "val" is dev).
    Parquet layout: ROOT/images.parquet (image, split, jpg) + ROOT/captions.parquet (image, n, caption)."""
    root = Path(root)
    if root.suffix == ".json" or (root / "dataset_flickr8k.json").is_file():
        js = root if root.suffix == ".json" else root / "dataset_flickr8k.json"
        img_dir = next((d for d in (js.parent / "Flicker8k_Dataset", js.parent / "Flickr8k_Dataset",
                                    js.parent / "Images", js.parent / "images") if d.is_dir()), js.parent)
        return load_karpathy(js, img_dir, {"dev": "val"}.get(split, split), captions_per_image)
    if (root / "images.parquet").is_file() and (root / "captions.parquet").is_file():
        images = pq.read_table(root / "images.parquet", columns=["image", "split", "jpg"])
        images = images.filter(pa.compute.equal(images["split"], split))
        caps = pq.read_table(root / "captions.parquet").sort_by([("image", "ascending"), ("n", "ascending")])
        by_image: dict[str, list[str]] = {}
        for name, caption in zip(caps["image"].to_pylist(), caps["caption"].to_pylist()):
            by_image.setdefault(name, []).append(caption)
        names, jpgs = images["image"].to_pylist(), images["jpg"].to_pylist()
        entries = sorted((n, j, by_image.get(n, [])) for n, j in zip(names, jpgs))
    elif (root / "Flickr8k.token.txt").is_file():
        split_file = root / f"Flickr_8k.{split}Images.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file} not found (Flickr8k splits: train, dev, test)")
        by_image = {}
        for line in (root / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
            if "\t" in line:
                ref, caption = line.split("\t", 1)
                by_image.setdefault(ref.split("#")[0], []).append(caption)
        img_dir = next((d for d in (root / "Flicker8k_Dataset", root / "Flickr8k_Dataset", root / "Images",
                                    root / "images") if d.is_dir()), None)
        if img_dir is None:
            raise FileNotFoundError(f"no image folder in {root} (Flicker8k_Dataset/, Flickr8k_Dataset/, Images/)")
        names = [n.strip() for n in split_file.read_text().splitlines() if n.strip()]
        entries = [(n, img_dir / n, by_image.get(n, [])) for n in names]
    else:
        raise FileNotFoundError(f"{root} holds no Flickr8k layout: expected Flickr8k.token.txt + "
                                "Flickr_8k.<split>Images.txt + images, dataset_flickr8k.json, or "
                                "images.parquet + captions.parquet")
    if not entries:
        raise ValueError(f"{root}: no images in split {split!r}")
    return _group(entries, captions_per_image)


def _jpeg(item: Path | bytes, max_side: int | None) -> tuple[bytes, int, int]:
    if isinstance(item, bytes) and not max_side:
        with Image.open(io.BytesIO(item)) as im:
            return item, im.size[0], im.size[1]
    im = open_image(item)
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), im.size[0], im.size[1]


def _url(cs: CaptionSet, i: int) -> str:
    item = cs.image_paths[i]
    return cs.image_ids[i] if isinstance(item, bytes) else str(item)


def write_shards(cs: CaptionSet, out_dir: str | Path, n_shards: int = 4, max_side: int | None = None,
                 caption_filter=None) -> list[Path]:
    """One SHARD row per (image, caption); key = "<image_id>_<caption index>"; images round-robin
    over shards so every shard has whole images. `caption_filter(k) -> bool` keeps caption k of
    each image (e.g. lambda k: k < 4 to hold the 5th out); `max_side` shrinks images for speed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[list[dict]] = [[] for _ in range(n_shards)]
    k_of_image: dict[int, int] = {}
    jpgs = {}
    for caption, i in zip(cs.captions, cs.text_to_image):
        k = k_of_image.get(i, 0)
        k_of_image[i] = k + 1
        if caption_filter is not None and not caption_filter(k):
            continue
        if i not in jpgs:
            jpgs[i] = _jpeg(cs.image_paths[i], max_side)
        jpg, w, h = jpgs[i]
        rows[i % n_shards].append({"key": f"{cs.image_ids[i]}_{k}", "caption": caption,
                                   "url": _url(cs, i), "jpg": jpg, "width": w, "height": h})
    paths = []
    for s, shard_rows in enumerate(rows):
        path = out_dir / f"{s:05d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(SHARD.from_rows(shard_rows), tmp, row_group_size=64)
        tmp.replace(path)
        paths.append(path)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--coco-json", help="COCO captions json")
    src.add_argument("--karpathy-json", help="Karpathy split json (dataset_coco.json / dataset_flickr30k.json)")
    src.add_argument("--flickr8k", help="Flickr8k folder: distributed, Karpathy-json or Parquet layout")
    ap.add_argument("--images", help="image folder the json's file names are relative to (COCO / Karpathy)")
    ap.add_argument("--split", default="train", help="split to write (Karpathy: train | restval | val | test; "
                                                     "Flickr8k: train | dev | test)")
    ap.add_argument("--out", required=True, help="output folder for NNNNN.parquet shards")
    ap.add_argument("--n-shards", type=int, default=4)
    ap.add_argument("--max-side", type=int, default=None, help="shrink images so the longer side is at most this")
    a = ap.parse_args(argv)
    if not a.flickr8k and not a.images:
        ap.error("--images is required with --coco-json / --karpathy-json")
    cs = (load_coco(a.coco_json, a.images, None) if a.coco_json
          else load_flickr8k(a.flickr8k, a.split, None) if a.flickr8k
          else load_karpathy(a.karpathy_json, a.images, a.split, None))
    paths = write_shards(cs, a.out, a.n_shards, a.max_side)
    print(json.dumps({**cs.summary(), "shards": [str(p) for p in paths]}, indent=2))


if __name__ == "__main__":
    main()
