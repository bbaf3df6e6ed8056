"""`make train-eval`: train a tiny dual encoder on the filter's shards, evaluate on held-out keys.

    python -m model_training.train_eval --shards out/filter/shards [--labels out/labels] --run runs/default
    python -m model_training.train_eval --shards ... --run ... --max-steps 1000 --model catclip-small

Defaults are sized for a laptop CPU (a few minutes): preset catclip-tiny (64 px ViT, 3+3 layers),
batch 64, 300 steps; 10% of keys (by hash, stable across runs) are held out. Concept distillation
is switched on when LABELS/shards exists (from `make distill`). Any other training flag of
model_training.train can be appended. Writes RUN/metrics.json (training summary + held-out
retrieval with chance levels), RUN/recall.png, RUN/loss_curve.png, RUN/log.csv, RUN/checkpoints/,
RUN/export/ (open_clip checkpoint + config). The held-out pairs have one caption per image, so
chance R@k is k / n_holdout both ways.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from model_training.data import ShardStream, list_shards
from model_training.evaluate import chance_recall, plot_recalls, retrieval_metrics
from model_training.models import build_model, get_tokenizer
from model_training.train import TrainConfig, parse_args, train

DEFAULTS = {"model": "catclip-tiny", "batch_size": 64, "max_steps": 150, "warmup_steps": 15,  # ~3 min on 2 cores
            "holdout_fraction": 0.1, "checkpoint_every": 50, "log_every": 10}


@torch.no_grad()
def holdout_retrieval(cfg: TrainConfig, model) -> dict:
    """Embed every held-out pair (eval transform, no shuffling) and score retrieval."""
    stream = ShardStream(list_shards(cfg.shards), get_tokenizer(model.name), model.image_size, 256, train=False,
                         shuffle_buffer=0, split="holdout", holdout_fraction=cfg.holdout_fraction,
                         infinite=False, seed=cfg.seed)
    model.eval()
    imgs, txts, keys = [], [], []
    try:
        for batch in stream:
            imgs.append(model.encode_image(batch["images"]))
            txts.append(model.encode_text(batch["texts"]))
            keys += batch["keys"]
    except ValueError as e:
        raise ValueError(f"no held-out pairs to evaluate: {e}. Raise --holdout-fraction or add data.") from e
    if len(keys) < 2:
        raise ValueError(f"only {len(keys)} held-out pair(s); raise --holdout-fraction or add data")
    n = len(keys)
    metrics = retrieval_metrics(torch.cat(imgs), torch.cat(txts), list(range(n)))
    return {**metrics, "n_pairs": n, "chance": chance_recall(n, 1)}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    defaults = [f"--{k.replace('_', '-')}={v}" for k, v in DEFAULTS.items() if k not in given]
    cfg = parse_args(defaults + argv)
    if cfg.labels and not (Path(cfg.labels) / "shards").is_dir():
        print(f"[train-eval] {cfg.labels}/shards not found: training without concept labels "
              f"(run `make distill` to add them)")
        cfg.labels = ""
    if cfg.labels and "concept_weight" not in given:
        cfg.loss.concept_weight = 1.0
    n_shards = len(list_shards(cfg.shards))
    cfg.num_workers = min(cfg.num_workers, n_shards)

    summary = train(cfg)
    run = Path(cfg.run_dir)
    model = build_model(summary["model"], summary["export"])   # round trip through the exported checkpoint
    result = holdout_retrieval(cfg, model)
    plot_recalls(result, run / "recall.png", f"held-out retrieval ({result['n_pairs']} pairs)", result["chance"])
    metrics = {"holdout_retrieval": result, "train": summary, "labels_used": bool(cfg.labels),
               "config": {k: v for k, v in vars(cfg).items() if k != "loss"}, "loss": vars(cfg.loss)}
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("i2t_r1", "t2i_r1", "rsum", "n_pairs")}, indent=2))
    print(f"[train-eval] wrote {run / 'metrics.json'}, {run / 'recall.png'}, {run / 'loss_curve.png'}")


if __name__ == "__main__":
    main()
