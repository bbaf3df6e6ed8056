"""Labelled image sets for the text-spot stage: which image-caption pairs must the CAT filter drop?

    from bench.textspot_set import build_set, build_flickr_set
    items = build_set()          # 60 LabelledPair(name, image (H x W x 3 uint8), caption, drop, kind, text)
    items = build_flickr_set(size=256)   # the operating point: 80 real Flickr8k photos as the download
                                         # stage stores them (img2dataset: 256 px, border, JPEG q95)
    PYTHONPATH=. .venv/bin/python -m bench.textspot_set --out bench/work/textspot_set [--flickr 256]

Deterministic (seeded). Real photos from ../shared/data/coco-mini (with their COCO captions) and
skimage.data, at varied sizes. Kinds and labels:
  caption_text  drop  part of the caption (or all of it) rendered onto the photo: varied fonts,
                      sizes (8-14% of the image height, >= 20 px: overlaid titles and memes),
                      colours, styles (outline, banner, plain), positions, upper/original case
  clean         keep  the same photos without text
  other_text    keep  text that shares < 5 characters with the caption (watermarks, sale tags, dates)
  natural       both  real photos of text: skimage's book page (caption quoting its heading -> drop,
                      caption not quoting it -> keep), handwriting, COCO photos of signs and buses
build_flickr_set: Flickr8k dev photos (224 px, ../shared/data/flickr8k) with their first caption; text
is rendered on the 224-px photo (as it would be on the web image), then the picture goes through what
img2dataset does with its defaults (resize to fit `size` x `size`, black border, JPEG quality 95).
Kinds caption_text / clean / other_text as above (clean photos may show real text - signs, shirts -
that their caption does not quote: keep).
The generator checks its own labels: a keep item's visible text shares no 5-character window
with the caption (same normalisation as pipeline.filter.textspot.caption_match).
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.filter.textspot import caption_match
from pipeline.media.render import render_text

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco-mini"
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
LONG_SIDES = (400, 512, 640, 800, 1024)  # web images come at many sizes; the spotter resizes to its canvas
OTHER_TEXTS = ("SALE 50% OFF", "www.picsum.net", "(c) Northwind Studio", "Happy Birthday!", "Summer 2019",
               "FREE SHIPPING", "Limited Edition", "Qwerty Zephyr", "BEST PRICE", "Copyright 2021",
               "Hello Kitty", "Photo by J. Kowalski", "New Arrivals", "Vintage Look")
SKIMAGE_PHOTOS = {  # name -> caption written for the photo
    "astronaut": "An astronaut in a white suit poses in front of the American flag",
    "chelsea": "A tabby cat is looking at the camera with green eyes",
    "coffee": "A cup of coffee sits on a saucer next to a spoon",
    "rocket": "A space shuttle is sitting on the launch pad under a blue sky",
}
SIGN_PHOTOS = ("000000231460.jpg", "000000525891.jpg", "000000252639.jpg", "000000466547.jpg")


@dataclass
class LabelledPair:
    name: str
    image: np.ndarray   # H x W x 3 uint8 RGB
    caption: str
    drop: bool          # ground truth: the CAT filter should drop this pair
    kind: str           # caption_text | clean | other_text | natural
    text: str           # the text rendered onto the image ("" if none was added)


def _coco_photos() -> list[tuple[str, Image.Image, str]]:
    meta = json.loads((COCO / "captions.json").read_text())
    first_caption = {}
    for ann in sorted(meta["annotations"], key=lambda a: a["id"]):
        first_caption.setdefault(ann["image_id"], ann["caption"].strip())
    photos = []
    for im in sorted(meta["images"], key=lambda i: i["file_name"]):
        if im["file_name"] not in SIGN_PHOTOS:
            photos.append((im["file_name"], Image.open(COCO / "images" / im["file_name"]).convert("RGB"),
                           first_caption[im["id"]]))
    return photos


def _skimage_photos() -> list[tuple[str, Image.Image, str]]:
    from skimage import data
    return [(name, Image.fromarray(getattr(data, name)()).convert("RGB"), caption)
            for name, caption in SKIMAGE_PHOTOS.items()]


def _resize(img: Image.Image, long_side: int) -> Image.Image:
    scale = long_side / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)


def _caption_phrase(caption: str, rng: random.Random) -> str:
    """2-5 consecutive caption words with >= 8 letters, or the whole caption; sometimes upper case."""
    words = caption.rstrip(".").split()
    if rng.random() < 0.25 or len(words) <= 3:
        phrase = " ".join(words)
    else:
        for _ in range(20):
            n = rng.randint(2, min(5, len(words)))
            start = rng.randint(0, len(words) - n)
            phrase = " ".join(words[start:start + n])
            if sum(c.isalnum() for c in phrase) >= 8:
                break
    return phrase.upper() if rng.random() < 0.3 else phrase


def _shares_caption_text(text: str, caption: str) -> bool:
    return caption_match([(text, 1.0)], caption) is not None


def _natural_items() -> list[LabelledPair]:
    from skimage import data
    page = np.stack([data.page()] * 3, axis=-1)
    handwriting = np.stack([data.text()] * 3, axis=-1)
    items = [
        LabelledPair("page_quoted", page, "Textbook page on region-based segmentation of coins", True, "natural",
                     "Region-based segmentation"),
        LabelledPair("page_unquoted", page, "A printed paper sheet lying flat on a wooden desk", False, "natural", ""),
        LabelledPair("handwriting", handwriting, "Handwritten maths formulas on a paper sheet", False, "natural", ""),
    ]
    meta = json.loads((COCO / "captions.json").read_text())
    ids = {im["file_name"]: im["id"] for im in meta["images"]}
    for file_name in SIGN_PHOTOS:
        caption = min((a for a in meta["annotations"] if a["image_id"] == ids[file_name]), key=lambda a: a["id"])
        image = np.asarray(Image.open(COCO / "images" / file_name).convert("RGB"))
        items.append(LabelledPair(f"sign_{file_name[:-4]}", image, caption["caption"].strip(), False, "natural", ""))
    return items


def build_set(n_caption_text: int = 24, n_clean: int = 18, n_other_text: int = 11, seed: int = 0) -> list[LabelledPair]:
    """The labelled set (default 24 + 18 + 11 + 7 natural = 60 pairs, 25 to drop)."""
    rng = random.Random(seed)
    photos = _skimage_photos() + _coco_photos()
    order = list(range(len(photos)))
    rng.shuffle(order)
    photos = [photos[i] for i in order]
    assert len(photos) >= n_caption_text + n_other_text and n_clean <= n_caption_text
    items: list[LabelledPair] = []
    for i, (name, photo, caption) in enumerate(photos[:n_caption_text]):
        photo = _resize(photo, rng.choice(LONG_SIDES))
        phrase = _caption_phrase(caption, rng)
        items.append(LabelledPair(f"caption_text_{name}", np.asarray(render_text(photo, phrase, rng)), caption,
                                  True, "caption_text", phrase))
        if i < n_clean:
            items.append(LabelledPair(f"clean_{name}", np.asarray(photo), caption, False, "clean", ""))
    for name, photo, caption in photos[n_caption_text:n_caption_text + n_other_text]:
        photo = _resize(photo, rng.choice(LONG_SIDES))
        text = rng.choice([t for t in OTHER_TEXTS if not _shares_caption_text(t, caption)])
        items.append(LabelledPair(f"other_text_{name}", np.asarray(render_text(photo, text, rng)), caption,
                                  False, "other_text", text))
    items += _natural_items()
    for item in items:  # the labels must agree with the rule applied to the text we know is visible
        assert item.drop == (item.kind in ("caption_text", "natural") and _shares_caption_text(item.text, item.caption)), item.name
    return items


def img2dataset_resize(image: np.ndarray, size: int) -> np.ndarray:
    """img2dataset's default resize_mode="border": fit into size x size (cv2 INTER_LANCZOS4 up,
    INTER_AREA down), centre on black, then its JPEG encoding (quality 95), decoded back."""
    import cv2
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LANCZOS4 if scale > 1 else cv2.INTER_AREA)
    canvas = np.zeros((size, size, 3), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = resized
    ok, jpg = cv2.imencode(".jpg", canvas[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    return np.ascontiguousarray(cv2.imdecode(jpg, cv2.IMREAD_COLOR)[:, :, ::-1])


def _flickr_photos(n: int, rng: random.Random) -> list[tuple[str, Image.Image, str]]:
    import io
    import pyarrow.parquet as pq
    images = pq.read_table(FLICKR / "images.parquet", filters=[("split", "=", "dev")], columns=["image", "jpg"])
    captions = pq.read_table(FLICKR / "captions.parquet", filters=[("n", "=", 0)]).to_pydict()
    first_caption = dict(zip(captions["image"], captions["caption"]))
    names = images.column("image").to_pylist()
    chosen = sorted(rng.sample(range(len(names)), n))
    jpgs = images.column("jpg")
    return [(names[i], Image.open(io.BytesIO(jpgs[i].as_py())).convert("RGB"), first_caption[names[i]].strip())
            for i in chosen]


def build_flickr_set(size: int = 256, n_caption_text: int = 30, n_clean: int = 35, n_other_text: int = 15,
                     seed: int = 0) -> list[LabelledPair]:
    """The operating point (default 80 pairs, 30 to drop): distinct real photos per kind, stored as the
    download stage stores them at `size` px. The same seed gives the same photos and texts at every size."""
    rng = random.Random(seed)
    photos = _flickr_photos(n_caption_text + n_clean + n_other_text, rng)
    rng.shuffle(photos)
    items: list[LabelledPair] = []
    for k, (name, photo, caption) in enumerate(photos):
        if k < n_caption_text:
            kind, text, drop = "caption_text", _caption_phrase(caption, rng), True
        elif k < n_caption_text + n_clean:
            kind, text, drop = "clean", "", False
        else:
            kind, text, drop = "other_text", rng.choice([t for t in OTHER_TEXTS if not _shares_caption_text(t, caption)]), False
        if text:
            photo = render_text(photo, text, rng)
        items.append(LabelledPair(f"flickr_{kind}_{name}", img2dataset_resize(np.asarray(photo), size), caption,
                                  drop, kind, text))
    for item in items:
        assert item.drop == (item.kind == "caption_text" and _shares_caption_text(item.text, item.caption)), item.name
    return items


REALTEXT_LABELS = ROOT / "bench" / "data" / "realtext_labels.csv"


def build_realtext_set(size: int | None = 256, labels: Path = REALTEXT_LABELS, limit: int | None = None
                       ) -> list[LabelledPair]:
    """The labelled real-text set: real photos (Flickr8k train/dev, coco-mini) listed in
    bench/data/realtext_labels.csv with a verdict and a caption, looked at one by one: drop = the photo
    shows legible natural text (signs, shop fronts, banners, jerseys, placards, vehicles) and the caption
    quotes some of it, as alt-text does; keep = the photo's own caption (Flickr8k caption 0, COCO's first),
    whether or not the photo shows text. Images are read from ../shared/data (never copied) and stored as
    the download stage stores them at `size` px (img2dataset_resize), or as they are with size=None.
    `limit`: the first rows of each verdict in file order, alternately (a stratified subset)."""
    import csv
    import io
    import pyarrow.parquet as pq
    rows = list(csv.DictReader(labels.open()))
    if limit is not None:
        drops, keeps = [r for r in rows if r["drop"] == "1"], [r for r in rows if r["drop"] == "0"]
        n_drop = round(limit * len(drops) / len(rows))
        rows = drops[:n_drop] + keeps[:limit - n_drop]
    wanted = {r["image"] for r in rows if r["source"] == "flickr8k"}
    jpgs = {}
    if wanted:
        t = pq.read_table(FLICKR / "images.parquet", columns=["image", "jpg"], filters=[("image", "in", sorted(wanted))])
        jpgs = dict(zip(t.column("image").to_pylist(), (v.as_py() for v in t.column("jpg"))))
    items = []
    for r in rows:
        if r["source"] == "coco-mini":
            photo = Image.open(COCO / "images" / r["image"]).convert("RGB")
        else:
            photo = Image.open(io.BytesIO(jpgs[r["image"]])).convert("RGB")
        image = np.asarray(photo) if size is None else img2dataset_resize(np.asarray(photo), size)
        drop = r["drop"] == "1"
        items.append(LabelledPair(f"real_{r['source']}_{r['image']}", image, r["caption"], drop,
                                  "real_text" if drop else "real_own_caption", ""))
    return items


HARD_STYLES = ("small", "perspective", "low_contrast", "busy", "multi_line")


def _render_hard(photo: Image.Image, text: str, style: str, rng: random.Random) -> Image.Image:
    """Harder rendered text than render_text's overlay titles: small (4-8% of the height), perspective
    (a plane tilted up to ~30 degrees), low contrast (text +-35 grey levels from the area under it), busy
    (plain text without halo over the most textured part), multi_line (2-3 short lines)."""
    import cv2
    img = photo.copy()
    h = img.height
    frac = rng.uniform(0.04, 0.08) if style == "small" else rng.uniform(0.07, 0.11)
    size = max(9, round(h * frac))
    font = ImageFont.truetype(str(Path(__import__("matplotlib").get_data_path()) / "fonts" / "ttf" /
                                  rng.choice(("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf"))), size)
    words = text.split()
    if style == "multi_line" and len(words) >= 2:
        cut = sorted(rng.sample(range(1, len(words)), min(2, len(words) - 1)))
        lines = [" ".join(words[a:b]) for a, b in zip([0, *cut], [*cut, len(words)])]
    else:
        lines = [text]
    while max(font.getlength(line) for line in lines) > img.width * 0.9 and size > 9:
        size -= 1
        font = ImageFont.truetype(str(font.path), size)
    line_h = round(size * 1.2)
    bw, bh = int(max(font.getlength(line) for line in lines)) + 2, line_h * len(lines) + 2
    grey = np.asarray(img.convert("L"), np.float32)
    if style == "busy":   # the block position with the most local texture
        gy, gx = np.gradient(grey)
        energy = np.hypot(gx, gy)
        spots = [(rng.randint(0, max(0, img.width - bw)), rng.randint(0, max(0, h - bh))) for _ in range(12)]
        x, y = max(spots, key=lambda s: energy[s[1]:s[1] + bh, s[0]:s[0] + bw].mean())
    else:
        x, y = rng.randint(0, max(0, img.width - bw)), rng.randint(0, max(0, h - bh))
    under = grey[y:y + bh, x:x + bw].mean() if bh and bw else 128.0
    if style == "low_contrast":
        v = int(under + 35 if under < 128 else under - 35)
        fill = (v, v, v)
    else:
        fill = (15, 15, 15) if under > 128 else (245, 245, 245)
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for i, line in enumerate(lines):
        draw.text((x + 1, y + 1 + i * line_h), line, font=font, fill=(*fill, 255))
    if style == "perspective":
        src = np.float32([[x, y], [x + bw, y], [x + bw, y + bh], [x, y + bh]])
        d = rng.uniform(0.15, 0.3) * bh * 2
        dst = src + np.float32([[0, d], [0, -d], [0, d], [0, -d]]) * rng.choice((1, -1)) / 2 + \
            np.float32([[d, 0], [0, 0], [0, 0], [d, 0]])
        layer = Image.fromarray(cv2.warpPerspective(np.asarray(layer), cv2.getPerspectiveTransform(src, dst), img.size,
                                                    flags=cv2.INTER_LINEAR))
    img.paste(layer, (0, 0), layer)
    return img


def build_hard_rendered_set(size: int = 256, n_per_style: int = 8, n_clean: int = 20, seed: int = 1
                            ) -> list[LabelledPair]:
    """Harder rendered cases on real Flickr8k dev photos (HARD_STYLES x n_per_style to drop, n_clean clean
    photos to keep), drawn on the 224-px photo and stored as the download stage stores them."""
    rng = random.Random(seed)
    photos = _flickr_photos(len(HARD_STYLES) * n_per_style + n_clean, rng)
    items = []
    for k, (name, photo, caption) in enumerate(photos):
        if k < len(HARD_STYLES) * n_per_style:
            style = HARD_STYLES[k // n_per_style]
            text = _caption_phrase(caption, rng)
            shown = _render_hard(photo, text, style, rng)
            items.append(LabelledPair(f"hard_{style}_{name}", img2dataset_resize(np.asarray(shown), size), caption,
                                      _shares_caption_text(text, caption), f"hard_{style}", text))
        else:
            items.append(LabelledPair(f"hard_clean_{name}", img2dataset_resize(np.asarray(photo), size), caption,
                                      False, "clean", ""))
    return items


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/work/textspot_set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flickr", type=int, default=0, help="write the Flickr8k set at this size instead")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = []
    for item in build_flickr_set(args.flickr, seed=args.seed) if args.flickr else build_set(seed=args.seed):
        Image.fromarray(item.image).save(out / f"{item.name}.png")
        labels.append({"name": item.name, "caption": item.caption, "drop": item.drop, "kind": item.kind,
                       "text": item.text, "height": item.image.shape[0], "width": item.image.shape[1]})
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    print(f"{len(labels)} images ({sum(l['drop'] for l in labels)} to drop) -> {out}")


if __name__ == "__main__":
    main()
