"""The embedded default sample, and converters that turn image folders into filter inputs.

    .venv/bin/catcurate sample --output data/sample/captions.parquet       # what `make sample` runs
    .venv/bin/catcurate sample --coco ../shared/data/coco-mini --output data/coco/coco.parquet

The sample is img2dataset-style Parquet (key, url, caption, status, error_message, jpg, width,
height) made entirely by this code: web-style captions of every kind the filter must handle (scene
descriptions with actions, product titles, keyword lists, non-English, empty, very long, duplicates)
on real photos that ship inside scikit-image, a share of them showing their caption as rendered
text so the text-spot stage has something to find. Seeded: the same file every time.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

IMG2DATASET_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("jpg", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
])

_SUBJECTS = [("dog", ["small", "brown", "fluffy", "old"]), ("cat", ["black", "white", "sleepy"]),
             ("man", ["young", "tall", "smiling"]), ("woman", ["young", "elderly", "happy"]),
             ("child", ["little", "laughing"]), ("horse", ["brown", "white", "wild"]),
             ("bird", ["small", "colorful"]), ("cyclist", ["professional", "tired"])]
_ACTIONS = [("chasing", "ball"), ("riding", "bicycle"), ("holding", "umbrella"), ("eating", "sandwich"),
            ("carrying", "bag"), ("watching", "sunset"), ("crossing", "street"), ("throwing", "frisbee")]
_PLACES = ["in the park", "on the beach", "near a lake", "in a busy city", "on a snowy mountain",
           "in the kitchen", "at the market", ""]
_OBJ_ADJ = ["red", "yellow", "wooden", "large", "old", "new", "striped"]
_PRODUCTS = ["Stainless Steel Water Bottle 750ml BPA Free", "Men's Running Shoes Black/White Size 10",
             "USB-C Fast Charger 65W GaN", "Vintage Leather Wallet RFID Blocking Brown",
             "Organic Green Tea 100 Bags", "4K Ultra HD Smart TV 55 inch", "Cotton T-Shirt Slim Fit Navy",
             "Wireless Bluetooth Headphones Noise Cancelling", "Ceramic Coffee Mug 350 ml Set of 4"]
_KEYWORDS = ["wedding", "bride", "flowers", "love", "vintage", "summer", "travel", "sunset", "nature",
             "background", "texture", "abstract", "pattern", "holiday", "food", "healthy", "business"]
_FOREIGN = ["Ein kleiner Hund läuft am Strand entlang", "Un chat noir dort sur le canapé",
            "Una mujer camina por la calle con un paraguas", "海滩上的狗在追球",
            "Кошка сидит на окне", "Il bambino gioca con la palla nel parco", "犬が公園で走っている"]
_TITLES = ["Home", "Untitled", "IMG_2034.JPG", "Summer Collection 2019", "Chapter 3: The Journey",
           "Best Deals of the Week", "About Us"]

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "immunohistochemistry",
          "hubble_deep_field", "retina", "motorcycle_left", "colorwheel", "page", "text", "brick",
          "grass", "gravel", "moon", "horse", "clock", "coins"]


def _font(size: int) -> ImageFont.FreeTypeFont:
    import matplotlib
    ttf = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans-Bold.ttf")
    return ImageFont.truetype(ttf, size)


def _photos() -> list[Image.Image]:
    import skimage.data
    out = []
    for name in PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - some skimage images need pooch downloads; skip those
            continue
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            arr = (255 * (arr - arr.min()) / max(1e-9, float(np.ptp(arr)))).astype(np.uint8)
        img = Image.fromarray(arr).convert("RGB")
        img.thumbnail((512, 512))
        out.append(img)
    return out


def render_text(img: Image.Image, text: str, rng: random.Random) -> Image.Image:
    """The caption as a banner on the photo, as web images with titles burnt in show it."""
    img = img.copy()
    draw = ImageDraw.Draw(img)
    size = rng.randint(max(14, img.height // 18), max(18, img.height // 10))
    font = _font(size)
    words = text.split()[:4]
    line = " ".join(words)
    while font.getlength(line) > img.width * 0.95 and len(line) > 6:
        line = line[:-1]
    y = rng.choice([0.05, 0.45, 0.8]) * img.height
    w = font.getlength(line)
    x = max(2, (img.width - w) / 2)
    draw.rectangle([x - 6, y - 4, x + w + 6, y + size + 8], fill=(255, 255, 255))
    draw.text((x, y), line, font=font, fill=(0, 0, 0))
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def sample_captions(n: int, rng: random.Random) -> list[tuple[str | None, str]]:
    """(caption, kind) pairs in roughly web proportions; kind says which rule should decide it."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.40:
            noun, adjs = rng.choice(_SUBJECTS)
            verb, obj = rng.choice(_ACTIONS)
            adj = " ".join(rng.sample(adjs, rng.randint(0, min(2, len(adjs)))))
            oadj = rng.choice(_OBJ_ADJ) if rng.random() < 0.6 else ""
            text = f"A {adj} {noun} {rng.choice(['', 'is '])}{verb} a {oadj} {obj} {rng.choice(_PLACES)}"
            out.append((" ".join(text.split()), "scene"))
        elif r < 0.55:
            out.append((rng.choice(_PRODUCTS), "product"))
        elif r < 0.67:
            out.append((", ".join(rng.sample(_KEYWORDS, rng.randint(3, 8))), "keywords"))
        elif r < 0.77:
            out.append((rng.choice(_FOREIGN), "foreign"))
        elif r < 0.85:
            out.append((rng.choice(_TITLES), "title"))
        elif r < 0.91:
            out.append((rng.choice([None, "", "   ", "\n\t"]), "empty"))
        else:
            noun, _ = rng.choice(_SUBJECTS)
            seo = " ".join(rng.choice(_KEYWORDS) for _ in range(900))
            out.append((f"Cheap {noun} pictures {seo}", "long"))
    return out


def make_sample(output: str, n: int = 200, seed: int = 0, text_share: float = 0.3) -> str:
    rng = random.Random(seed)
    photos = _photos()
    rows = []
    for i, (caption, kind) in enumerate(sample_captions(n, rng)):
        photo = photos[i % len(photos)]
        if kind == "scene" and rng.random() < text_share:
            photo = render_text(photo, caption, rng)
        rows.append({"key": f"{i:09d}", "url": f"http://sample.invalid/{kind}/{i}.jpg", "caption": caption,
                     "status": "success", "error_message": None, "jpg": _jpeg(photo),
                     "width": photo.width, "height": photo.height})
    # exact duplicates of earlier rows under new img2dataset keys, as re-crawls produce them
    for j in rng.sample(range(len(rows)), max(1, n // 20)):
        rows.append({**rows[j], "key": f"{len(rows):09d}"})
    # a failed download as img2dataset records it
    rows.append({"key": f"{len(rows):09d}", "url": "http://sample.invalid/missing.jpg", "caption":
                 "A dog catching a frisbee in the park", "status": "failed_to_download",
                 "error_message": "HTTP Error 404: Not Found", "jpg": None, "width": None, "height": None})
    return _write(rows, output)


def coco_to_img2dataset(coco_dir: str, output: str, captions_per_image: int = 1) -> str:
    """COCO captions json + images -> img2dataset-style Parquet (one row per image and caption)."""
    with open(os.path.join(coco_dir, "captions.json")) as fh:
        coco = json.load(fh)
    by_image: dict[int, list[str]] = {}
    for a in sorted(coco["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(a["image_id"], []).append(a["caption"].strip())
    rows = []
    for im in sorted(coco["images"], key=lambda im: im["id"]):
        with open(os.path.join(coco_dir, "images", im["file_name"]), "rb") as fh:
            jpg = fh.read()
        for j, caption in enumerate(by_image.get(im["id"], [])[:captions_per_image]):
            rows.append({"key": f"{im['id']:012d}_{j}", "url": im.get("coco_url") or im["file_name"],
                         "caption": caption, "status": "success", "error_message": None, "jpg": jpg,
                         "width": im.get("width"), "height": im.get("height")})
    return _write(rows, output)


def _write(rows: list[dict], output: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=IMG2DATASET_SCHEMA), tmp, row_group_size=64)
    os.replace(tmp, output)
    print(f"wrote {len(rows)} rows to {output}")
    return output


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="Parquet file to write")
    ap.add_argument("--rows", type=int, default=200, help="captions in the generated sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coco", help="convert this COCO folder (captions.json + images/) instead")
    ap.add_argument("--captions-per-image", type=int, default=1, help="with --coco")
    a = ap.parse_args(argv)
    if a.coco:
        coco_to_img2dataset(a.coco, a.output, a.captions_per_image)
    else:
        make_sample(a.output, a.rows, a.seed)


if __name__ == "__main__":
    main()
