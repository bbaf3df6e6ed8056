"""Our trainer against the anchor: open_clip's own trainer on the same clean Flickr8k pairs.

    .venv/bin/python -m experiments.anchor --experiment out/experiment [--epochs 3 --batch-size 128]

Same model (catclip-tiny, 64-px ViT + text transformer, from scratch: open_clip_train cannot read
our cached frozen features, so the comparison is of full towers), same pairs (the experiment's clean
arm), batch, epochs, peak lr, warmup, weight decay (0.2) and seed; open_clip_train's own CSV loader
and transforms, ours streaming Parquet. Both models are scored by the same function on the same
clean dev photos (5 captions each). Writes EXPERIMENT/results/anchor.{json,md} with wall times.
Runs open_clip_train as `python -m open_clip_train.main` would, after registering our model
configs (it knows only its bundled ones).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OPEN_CLIP_TRAIN = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
                   "from open_clip_train.main import main; main(sys.argv[1:])")


def write_csv_dataset(shards: Path, out: Path) -> tuple[Path, int]:
    """The clean arm as open_clip_train's CSV layout: one JPEG per distinct photo + filepath,title rows."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard in sorted(shards.glob("*.parquet")):
        for r in pq.read_table(shard, columns=["key", "caption", "url", "jpg"]).to_pylist():
            path = images / f"{Path(r['url']).name or r['key']}"
            if not path.exists():
                Image.open(io.BytesIO(r["jpg"])).convert("RGB").save(path, quality=95)
            rows.append({"filepath": str(path), "title": r["caption"]})
    csv_path = out / "train.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filepath", "title"])
        w.writeheader()
        w.writerows(rows)
    return csv_path, len(rows)


def run_anchor(experiment: str | Path, epochs: int = 3, batch_size: int = 128, lr: float = 5e-4,
               warmup: int = 20, model: str = "catclip-tiny", workers: int = 1, seed: int = 0) -> dict:
    from model_training.caption_sets import load_flickr8k
    from model_training.evaluate import evaluate_retrieval
    from model_training.models import CONFIG_DIR, build_model, get_tokenizer
    from model_training.train import TrainConfig, train

    experiment = Path(experiment)
    summary = json.loads((experiment / "results" / "results.json").read_text())
    shards = experiment / "work" / "arms" / "clean"
    out = experiment / "work" / "anchor"
    csv_path, n = write_csv_dataset(shards, out)
    steps = epochs * (n // batch_size)          # open_clip_train drops the last partial batch of an epoch
    dev = load_flickr8k(summary["noise"]["flickr8k"], "dev")
    if summary["config"].get("dev_images"):
        from experiments.flickr8k import subset_images
        dev = subset_images(dev, summary["config"]["dev_images"])
    tok = get_tokenizer(model)
    result = {"model": model, "pairs": n, "epochs": epochs, "steps": steps, "batch_size": batch_size, "lr": lr,
              "warmup": warmup, "seed": seed}

    t = time.time()
    logs = out / "open_clip_logs"
    cmd = [sys.executable, "-c", OPEN_CLIP_TRAIN, str(CONFIG_DIR), "--train-data", str(csv_path),
           "--dataset-type", "csv", "--csv-img-key", "filepath", "--csv-caption-key", "title",
           "--csv-separator", ",", "--model", model, "--batch-size", str(batch_size), "--epochs", str(epochs),
           "--lr", str(lr), "--warmup", str(warmup), "--wd", "0.2", "--workers", str(workers), "--device", "cpu",
           "--precision", "fp32", "--logs", str(logs), "--name", f"anchor-seed{seed}", "--save-frequency", str(epochs),
           "--seed", str(seed), "--report-to", "", "--log-every-n-steps", "20"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result["open_clip_train_seconds"] = round(time.time() - t, 1)
    ckpt = logs / f"anchor-seed{seed}" / "checkpoints" / f"epoch_{epochs}.pt"
    result["open_clip_train"] = _scores(evaluate_retrieval(build_model(model, str(ckpt)), tok, dev,
                                                           out / "eval_open_clip_train", "open_clip_train"))

    t = time.time()
    ours = train(TrainConfig(shards=str(shards), run_dir=str(out / "ours"), model=model, batch_size=batch_size,
                             max_steps=steps, lr=lr, warmup_steps=warmup, num_workers=workers, seed=seed,
                             checkpoint_every=steps, overwrite=True))
    result["ours_seconds"] = round(time.time() - t, 1)
    result["ours"] = _scores(evaluate_retrieval(build_model(model, ours["export"]), tok, dev, out / "eval_ours",
                                                "ours"))
    (experiment / "results" / "anchor.json").write_text(json.dumps(result, indent=2))
    (experiment / "results" / "anchor.md").write_text(_markdown(result))
    return result


def _scores(metrics: dict) -> dict:
    return {k: round(v, 2) for k, v in metrics.items() if k.startswith(("i2t_", "t2i_", "rsum"))}


def _markdown(r: dict) -> str:
    head = "| trainer | wall s | R@1 i2t | R@5 i2t | R@10 i2t | R@1 t2i | R@5 t2i | R@10 t2i | RSUM |\n|---|---|---|---|---|---|---|---|---|\n"
    row = lambda name, m, s: (f"| {name} | {s} | " + " | ".join(f"{m[k]:.1f}" for k in
                              ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")) + " |\n")
    return (f"# Our trainer vs open_clip_train: {r['model']} from scratch, {r['pairs']} clean pairs, "
            f"{r['epochs']} epochs = {r['steps']} steps x batch {r['batch_size']}, lr {r['lr']}, seed {r['seed']}\n\n"
            + head + row("open_clip_train", r["open_clip_train"], r["open_clip_train_seconds"])
            + row("ours (model_training.train)", r["ours"], r["ours_seconds"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="out/experiment", help="a finished experiment folder (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=3, help="(default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    ap.add_argument("--lr", type=float, default=5e-4, help="(default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=20, help="(default: %(default)s)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers, both trainers (default: %(default)s)")
    a = ap.parse_args(argv)
    print(_markdown(run_anchor(a.experiment, a.epochs, a.batch_size, a.lr, a.warmup, workers=a.workers)))


if __name__ == "__main__":
    main()
