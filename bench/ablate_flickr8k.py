"""The objective ablation on Flickr8k (issue #24): every preset, 3 seeds, evaluated on the dev split.

    .venv/bin/python -m bench.ablate_flickr8k [--photos 1000 --steps 40 --batch-size 16 --seeds 3 --out bench/work/ablate-flickr8k]

Training pairs: the first --photos photos of Flickr8k's train split with all 5 captions each (5 pairs per
photo), images shrunk to 64 px (catclip-micro trains at 48 px). Evaluation: the 1,000 dev photos, 5
captions each (R@1/5/10 both ways, model_training.evaluate). Sized for 2 CPU cores shared with other
jobs (~45 min for 7 presets x 3 seeds): catclip-micro (48 px), batch 16, 40 optimizer steps per run,
i.e. 640 pairs seen: a check that every objective trains end to end, not a ranking of objectives. Writes OUT/results.{md,csv,json}; copy them to
bench/results/ablate/flickr8k/ to publish (bench/work/ is not tracked).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from model_training import ablate
from model_training.caption_sets import CaptionSet, load_flickr8k, write_shards

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def make_shards(root: Path, photos: int, out: Path) -> Path:
    if (out / "00003.parquet").is_file():
        return out
    cs = load_flickr8k(root, "train", None)
    keep = [j for j, i in enumerate(cs.text_to_image) if i < photos]
    sub = CaptionSet(cs.image_paths[:photos], [cs.captions[j] for j in keep], [cs.text_to_image[j] for j in keep],
                     cs.image_ids[:photos], [f"first {photos} train photos"])
    write_shards(sub, out, n_shards=4, max_side=64)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flickr8k", default=str(FLICKR8K))
    ap.add_argument("--photos", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--presets", default=",".join(ablate.DEFAULT_PRESETS))
    ap.add_argument("--out", default="bench/work/ablate-flickr8k")
    a = ap.parse_args(argv)
    shards = make_shards(Path(a.flickr8k), a.photos, Path(a.out) / "shards")
    ablate.main(["--shards", str(shards), "--out", str(Path(a.out) / "runs"), "--presets", a.presets,
                 "--seeds", str(a.seeds), "--eval-flickr8k", a.flickr8k, f"--max-steps={a.steps}",
                 f"--warmup-steps={max(1, a.steps // 10)}", f"--batch-size={a.batch_size}", "--num-workers=1",
                 "--log-every=10"])


if __name__ == "__main__":
    main()
