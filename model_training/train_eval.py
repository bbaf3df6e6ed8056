"""`make train-eval`: train a tiny dual encoder on the filter's shards, evaluate on held-out keys.

    .venv/bin/catcurate train-eval --shards out/filter/shards [--labels out/labels] --run runs/default
    .venv/bin/catcurate train-eval --shards ... --run ... --max-steps 1000 --model catclip-small

Defaults are sized for a laptop CPU (a few minutes): preset catclip-tiny (64 px ViT, 3+3 layers),
batch 64, 150 steps (40 on fewer than 1,000 training pairs: a smoke test, said when it starts); 10% of keys (by hash, stable across runs) are held out (--help shows them all). Concept distillation
is switched on when LABELS/shards exists (from `make distill`). Any other training flag of
model_training.train can be appended. Writes RUN/metrics.json (training summary + held-out
retrieval with chance levels), RUN/recall.png, RUN/loss_curve.png, RUN/log.csv, RUN/checkpoints/,
RUN/export/ (open_clip checkpoint + config). The held-out pairs have one caption per image, so
chance R@k is k / n_holdout both ways.

RUN follows model_training.train's rule: the same command resumes, another configuration or other
data is refused (--overwrite starts over). A filter that kept nothing is said as such, and tiny data
gets fewer DataLoader workers (or a clear error) instead of a crash inside a worker.
"""
from __future__ import annotations

import json
import posixpath
import sys
from pathlib import Path

import torch

from model_training.data import ShardStream, has_label_shards, in_subset, is_holdout, list_shards, shard_keys
from model_training.evaluate import chance_recall, plot_recalls, retrieval_metrics
from model_training.models import build_model, get_tokenizer
from model_training.train import TrainConfig, one_line_errors, parse_args, train
from model_training.run_dir import staged_run
from pipeline.store import storage
from pipeline.store.partitions import atomic_write_json
from pipeline.filter.report import no_pairs_reason

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


def find_shards(cfg: TrainConfig) -> list[str]:
    """The shard files; when the filter ran and kept no pairs with images, say that (not 'run the filter')."""
    shards = str(cfg.shards).rstrip("/")   # a str, not a Path: a URI (s3://...) must pass through unchanged
    is_output_folder = posixpath.basename(shards) in ("shards", "webdataset")
    reason = no_pairs_reason(posixpath.dirname(shards) if is_output_folder else shards)
    if reason is not None:
        raise ValueError(f"{reason[0]}: nothing to train on ({reason[1]})")
    return list_shards(cfg.shards)


def fit_workers(cfg: TrainConfig, shards: list[str]) -> tuple[int, int]:
    """(the most DataLoader workers (<= --num-workers) whose files all hold training rows, the training
    rows): a worker without any would crash inside the DataLoader. Tiny data that cannot train or
    evaluate fails here, clearly."""
    train_rows, held_out = [], 0
    for path in shards:
        keys = shard_keys(path)
        held = [k is not None and is_holdout(k, cfg.holdout_fraction) for k in keys]
        held_out += sum(held)
        train_rows.append(sum(not h and (k is None or in_subset(k, cfg.train_fraction)) for k, h in zip(keys, held)))
    if sum(train_rows) == 0:
        raise ValueError(f"no training pairs: the {held_out} pair(s) in {len(shards)} shard(s) are all held out "
                         f"(--holdout-fraction {cfg.holdout_fraction}); add data or lower it")
    if held_out < 2:
        raise ValueError(f"{held_out} held-out pair(s) in {len(shards)} shard(s): evaluation needs at least 2; "
                         f"raise --holdout-fraction (now {cfg.holdout_fraction}) or add data")
    for workers in range(min(cfg.num_workers, len(shards)), 0, -1):
        if all(sum(train_rows[w::workers]) for w in range(workers)):
            return workers, sum(train_rows)
    return 0, sum(train_rows)   # --num-workers 0: read in the main process


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv, defaults=DEFAULTS, description=__doc__)
    with one_line_errors("train-eval"):
        train_eval(cfg, given={a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")})


def train_eval(cfg: TrainConfig, given: set[str]):
    """Train on cfg.shards, evaluate on the held-out keys, write RUN/metrics.json; `given` = flags set explicitly.
    A RUN in an object store is worked on in a local mirror and pushed after each checkpoint and at the end."""
    if storage.is_remote(cfg.run_dir):
        with staged_run(cfg.run_dir, "train-eval") as mirror:
            cfg.run_dir = str(mirror.local)
            return _train_eval(cfg, given, mirror.push)
    return _train_eval(cfg, given, None)


def _train_eval(cfg: TrainConfig, given: set[str], on_checkpoint):
    shards = find_shards(cfg)
    if cfg.labels and not has_label_shards(cfg.labels):
        print(f"[train-eval] {cfg.labels}/shards not found: training without concept labels "
              f"(run `make distill` to add them)")
        cfg.labels = ""
    if cfg.labels and "concept_weight" not in given:
        cfg.loss.concept_weight = 1.0
    workers, n_train = fit_workers(cfg, shards)
    if n_train < SMOKE_PAIRS and not given & {"max_steps", "warmup_steps"}:
        cfg.max_steps, cfg.warmup_steps = SMOKE_STEPS, SMOKE_STEPS // 8
        print(f"[train-eval] smoke test: {n_train} training pairs (fewer than {SMOKE_PAIRS}), so {cfg.max_steps} "
              f"steps, {SMOKE_MINUTES} on 2 CPU cores. It checks that filter -> train -> eval work end to "
              f"end and measures nothing (--max-steps N trains longer; `make experiment` measures).")
    if workers < cfg.num_workers:
        print(f"[train-eval] {workers} DataLoader worker(s) instead of {cfg.num_workers}: every worker needs "
              f"shard files with training rows ({len(shards)} shard file(s))")
        cfg.num_workers = workers

    summary = train(cfg, on_checkpoint=on_checkpoint)
    run = Path(cfg.run_dir)
    model = build_model(summary["model"], summary["export"])   # round trip through the exported checkpoint
    result = holdout_retrieval(cfg, model)
    plot_recalls(result, run / "recall.png", f"held-out retrieval ({result['n_pairs']} pairs)", result["chance"])
    metrics = {"holdout_retrieval": result, "train": summary, "labels_used": bool(cfg.labels),
               "config": {k: v for k, v in vars(cfg).items() if k != "loss"}, "loss": vars(cfg.loss)}
    atomic_write_json(metrics, str(run / "metrics.json"))
    print(json.dumps({k: result[k] for k in ("i2t_r1", "t2i_r1", "rsum", "n_pairs")}, indent=2))
    print(f"[train-eval] wrote {run / 'metrics.json'}, {run / 'recall.png'}, {run / 'loss_curve.png'}")
    print(smoke_note(result["n_pairs"], summary["samples_seen"], result["rsum"], sum(result["chance"].values())))


SMOKE_PAIRS = 1000   # fewer held-out pairs than this, or recall near chance: the run only shows the plumbing
SMOKE_STEPS = 40     # on fewer training pairs than SMOKE_PAIRS a longer run shows nothing more
SMOKE_MINUTES = "under a minute"   # measured: make train-eval on the sample, 18 s on an idle 2-core EPYC


def smoke_note(n_holdout: int, samples_seen: int, rsum: float, chance_rsum: float) -> str:
    """Say plainly when a run is a smoke test rather than a measurement."""
    if n_holdout >= SMOKE_PAIRS and rsum > 2 * chance_rsum:
        return f"[train-eval] held-out RSUM {rsum:.1f} vs chance {chance_rsum:.1f}"
    return (f"[train-eval] SMOKE TEST: {n_holdout} held-out pairs, {samples_seen} samples seen, RSUM {rsum:.1f} vs "
            f"chance {chance_rsum:.1f}. This checks that filter -> train -> eval work end to end; it measures "
            "nothing. For a run that means something: `make experiment` (Flickr8k, real photos, arms over training budgets; "
            "reads ../shared/data/flickr8k or FLICKR8K=<folder with Flickr8k.token.txt + Flickr_8k.*Images.txt + "
            "images>, or dataset_flickr8k.json).")


if __name__ == "__main__":
    main()
