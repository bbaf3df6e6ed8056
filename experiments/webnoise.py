"""A seeded web-noise model on real photos: Flickr8k pairs corrupted the way LAION pairs are.

    .venv/bin/python -m experiments.webnoise --flickr8k ../shared/data/flickr8k --out out/noisy --photos 2000
    from experiments.webnoise import NoiseConfig, make_noisy_set

Reads Flickr8k (the shared Parquet layout, the distributed layout or Karpathy JSON: see
model_training.caption_sets.load_flickr8k) and writes OUT/train.parquet: one row per (train photo,
caption), columns key, caption, url, jpg, width, height (an img2dataset-like input the CAT filter
reads as is) plus the ground truth: noise, clean_caption, photo, rendered_text. Every pair gets at
most one corruption, drawn independently per pair with these probabilities (each a flag):

  text_shortcut   1-4 consecutive words of the pair's OWN caption are drawn onto its photo
                  (pipeline.media.render.render_text: DejaVu fonts, 8-14% of the image height, white/
                  yellow with outline, on a dark or light banner, or plain with a halo; top, bottom,
                  middle or anywhere; original or upper case). The LAION images that show their caption.
  misaligned      the caption is replaced by a real web alt-text of another image (LAION sample).
  low_complexity  the caption is cut to a bare noun phrase: determiner + head noun of its first
                  noun chunk ("A black dog is running ..." -> "A dog").
  none            untouched.

The dev split is never corrupted: OUT/dev.parquet holds its photos (image, jpg) and 5 captions each
(OUT/dev_captions.parquet) for evaluation with the 5-captions protocol. OUT/noise.json records the
configuration and the counts. Keys are "<photo stem>_<caption index>", stable across runs.
"""
from __future__ import annotations

import argparse
import io
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

NOISE_TYPES = ("none", "text_shortcut", "misaligned", "low_complexity")
DEFAULT_FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
DEFAULT_WEB_CAPTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "laion-sample" / "test_1000.parquet"

NOISY_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("url", pa.string()),
                          ("jpg", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
                          ("noise", pa.string()), ("clean_caption", pa.string()), ("photo", pa.string()),
                          ("rendered_text", pa.string())])


@dataclass(frozen=True)
class NoiseConfig:
    photos: int = 1500              # train photos used (x5 captions = pairs); 0 = all 6,000
    text_shortcut: float = 0.15     # LAION: up to ~30% of images show part of their caption (DiHT)
    misaligned: float = 0.20        # alt-text of another image: the commonest web noise
    low_complexity: float = 0.15    # captions reduced to a bare noun phrase
    min_words: int = 1              # rendered words per text-shortcut image: 1-4 consecutive words
    max_words: int = 4
    jpeg_quality: int = 85          # the shared photos' own quality: rendered images re-encode alike
    seed: int = 0

    def __post_init__(self):
        if self.text_shortcut + self.misaligned + self.low_complexity > 1:
            raise ValueError("noise fractions must add up to at most 1")


def caption_phrase(caption: str, rng: random.Random, cfg: NoiseConfig) -> str:
    """1-4 consecutive words of the caption with >= 5 letters in all (else the rule can never match)."""
    words = caption.rstrip(" .").split()
    for _ in range(50):
        n = rng.randint(cfg.min_words, min(cfg.max_words, len(words)))
        start = rng.randint(0, len(words) - n)
        phrase = " ".join(words[start:start + n])
        if sum(c.isalnum() for c in phrase) >= 5:
            return phrase.upper() if rng.random() < 0.3 else phrase
    return " ".join(words[:cfg.max_words])


def bare_noun_phrase(doc) -> str | None:
    """Determiner + head noun of the first noun chunk of a spaCy doc ("A black dog runs" -> "A dog")."""
    for chunk in doc.noun_chunks:
        if chunk.root.pos_ in ("NOUN", "PROPN"):
            det = [t.text for t in chunk if t.dep_ == "det" and t.i < chunk.root.i][:1]
            return " ".join(det + [chunk.root.text])
    return None


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def load_web_captions(path: str | Path = DEFAULT_WEB_CAPTIONS) -> list[str]:
    t = pq.read_table(path)
    col = "TEXT" if "TEXT" in t.column_names else "caption"
    return [c.strip() for c in t.column(col).to_pylist() if isinstance(c, str) and len(c.strip()) >= 3]


def make_noisy_set(out: str | Path, cfg: NoiseConfig = NoiseConfig(), flickr8k: str | Path = DEFAULT_FLICKR8K,
                   web_captions: str | Path = DEFAULT_WEB_CAPTIONS) -> dict:
    """Write OUT/train.parquet (noisy), OUT/dev.parquet + dev_captions.parquet (clean), OUT/noise.json."""
    from pipeline.media.render import render_text   # the labelled text-spot set's renderer: one renderer
    from model_training.caption_sets import load_flickr8k
    from pipeline.filter.captions import get_nlp

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_flickr8k(flickr8k, "train")
    dev = load_flickr8k(flickr8k, "dev")
    rng = random.Random(cfg.seed)
    photo_ids = list(range(len(train.image_ids)))
    if cfg.photos and cfg.photos < len(photo_ids):
        photo_ids = sorted(rng.sample(photo_ids, cfg.photos))
    chosen = set(photo_ids)
    web = load_web_captions(web_captions)
    nlp = get_nlp()
    pairs = [(j, i, c) for j, (c, i) in enumerate(zip(train.captions, train.text_to_image)) if i in chosen]
    # one uniform draw per pair decides its corruption: changing one fraction keeps the others' pairs
    draws = [rng.random() for _ in pairs]
    cuts = (cfg.text_shortcut, cfg.text_shortcut + cfg.misaligned,
            cfg.text_shortcut + cfg.misaligned + cfg.low_complexity)
    kinds = ["text_shortcut" if u < cuts[0] else "misaligned" if u < cuts[1] else
             "low_complexity" if u < cuts[2] else "none" for u in draws]
    low_idx = [n for n, k in enumerate(kinds) if k == "low_complexity"]
    bare = {n: bare_noun_phrase(doc) for n, doc in zip(low_idx, nlp.pipe([pairs[n][2] for n in low_idx]))}
    rows, k_of_photo, decoded = [], {}, {}
    for n, ((j, i, caption), kind) in enumerate(zip(pairs, kinds)):
        k = k_of_photo.get(i, 0)
        k_of_photo[i] = k + 1
        jpg = train.image_bytes(i)
        text, new_caption = "", caption
        if kind == "text_shortcut":
            if i not in decoded:
                decoded = {i: Image.open(io.BytesIO(jpg)).convert("RGB")}   # one photo at a time in memory
            text = caption_phrase(caption, rng, cfg)
            jpg = encode_jpeg(render_text(decoded[i], text, rng), cfg.jpeg_quality)
        elif kind == "misaligned":
            new_caption = rng.choice(web)
        elif kind == "low_complexity":
            new_caption = bare[n]
            if not new_caption:       # no noun chunk: leave the pair clean, and say so in the labels
                kind, new_caption = "none", caption
        with Image.open(io.BytesIO(jpg)) as im:
            w, h = im.size
        stem = train.image_ids[i].rsplit(".", 1)[0]
        rows.append({"key": f"{stem}_{k}", "caption": new_caption, "url": f"http://flickr8k.invalid/{train.image_ids[i]}",
                     "jpg": jpg, "width": w, "height": h, "noise": kind, "clean_caption": caption,
                     "photo": train.image_ids[i], "rendered_text": text})
    _write(NOISY_SCHEMA, rows, out / "train.parquet")
    dev_rows = [{"image": dev.image_ids[i], "jpg": dev.image_bytes(i)} for i in range(len(dev.image_ids))]
    _write(pa.schema([("image", pa.string()), ("jpg", pa.binary())]), dev_rows, out / "dev.parquet")
    cap_rows = [{"image": dev.image_ids[i], "caption": c} for c, i in zip(dev.captions, dev.text_to_image)]
    _write(pa.schema([("image", pa.string()), ("caption", pa.string())]), cap_rows, out / "dev_captions.parquet")
    counts = {t: sum(r["noise"] == t for r in rows) for t in NOISE_TYPES}
    info = {"config": asdict(cfg), "flickr8k": str(flickr8k), "web_captions": str(web_captions),
            "n_pairs": len(rows), "n_photos": len(chosen), "counts": counts,
            "n_dev_images": len(dev_rows), "n_dev_captions": len(cap_rows)}
    (out / "noise.json").write_text(json.dumps(info, indent=2))
    return info


def _write(schema: pa.Schema, rows: list[dict], path: Path, row_group_size: int = 256):
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, row_group_size=row_group_size)
    tmp.replace(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = NoiseConfig()
    ap.add_argument("--flickr8k", default=str(DEFAULT_FLICKR8K), help="Flickr8k folder (any layout load_flickr8k reads)")
    ap.add_argument("--web-captions", default=str(DEFAULT_WEB_CAPTIONS), help="Parquet of real alt-texts (TEXT column)")
    ap.add_argument("--out", required=True, help="output folder")
    for name in ("photos", "text_shortcut", "misaligned", "low_complexity", "seed"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(d, name)), default=getattr(d, name),
                        help=f"(default: {getattr(d, name)})")
    a = ap.parse_args(argv)
    cfg = NoiseConfig(photos=a.photos, text_shortcut=a.text_shortcut, misaligned=a.misaligned,
                      low_complexity=a.low_complexity, seed=a.seed)
    print(json.dumps(make_noisy_set(a.out, cfg, a.flickr8k, a.web_captions), indent=2))


if __name__ == "__main__":
    main()
