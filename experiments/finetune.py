"""Zero-shot and fine-tuned retrieval on Flickr8k, the protocol the papers report (`make finetune`).

    make finetune CHECKPOINT=runs/default/export/open_clip_model.pt RUN=runs/ft FINETUNE_ARGS="--model catclip-tiny"
    .venv/bin/catcurate finetune --flickr8k ../shared/data/flickr8k --checkpoint CKPT --model catclip-tiny \
        --run runs/ft [--steps 300 --batch-size 128 --lr 1e-4] [--eval-split dev|test]

1. zero-shot: the checkpoint as given, evaluated on the eval split (5 captions per image, R@1/5/10).
2. fine-tuned: the same checkpoint trained on Flickr8k's train split (model_training.train with
   --init-checkpoint; every train pair, 5 per photo) and evaluated on the same split.
RUN/finetune.json holds both next to each other; RUN/zero_shot/ and RUN/fine_tuned/ hold metrics.json
and recall.png. Flickr8k is read in any layout model_training.caption_sets.load_flickr8k knows
(distributed token file + split lists + images, dataset_flickr8k.json, or the Parquet layout).
Without --checkpoint the model starts from random weights (zero-shot = chance, as a check).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.webnoise import DEFAULT_FLICKR8K


def finetune(flickr8k: str | Path, run: str | Path, model: str = "catclip-tiny", checkpoint: str = "",
             steps: int = 300, batch_size: int = 128, lr: float = 1e-4, eval_split: str = "dev",
             num_workers: int = 2, seed: int = 0) -> dict:
    from model_training.caption_sets import load_flickr8k, write_shards
    from model_training.evaluate import evaluate_retrieval
    from model_training.models import build_model, get_tokenizer
    from model_training.train import TrainConfig, train

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    evaluation = load_flickr8k(flickr8k, eval_split)
    tokenizer = get_tokenizer(model)
    zero_shot = evaluate_retrieval(build_model(model, checkpoint or None), tokenizer, evaluation, run / "zero_shot",
                                   name=f"flickr8k_{eval_split}_zero_shot")
    shards = run / "train_shards"
    if not shards.is_dir():   # one SHARD row per (train photo, caption); reused by reruns
        write_shards(load_flickr8k(flickr8k, "train", None), shards, n_shards=max(4, num_workers))
    summary = train(TrainConfig(shards=str(shards), run_dir=str(run / "train"), model=model,
                                init_checkpoint=checkpoint, batch_size=batch_size, max_steps=steps, lr=lr,
                                warmup_steps=max(1, steps // 10), num_workers=num_workers, seed=seed,
                                checkpoint_every=steps, resume="latest"))
    tuned = build_model(model, summary["export"])
    fine_tuned = evaluate_retrieval(tuned, tokenizer, evaluation, run / "fine_tuned",
                                    name=f"flickr8k_{eval_split}_fine_tuned")
    result = {"model": model, "checkpoint": checkpoint or None, "eval_split": eval_split,
              "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "samples_seen": summary["samples_seen"]},
              "zero_shot": zero_shot, "fine_tuned": fine_tuned}
    (run / "finetune.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flickr8k", default=str(DEFAULT_FLICKR8K), help="Flickr8k folder (default: %(default)s)")
    ap.add_argument("--checkpoint", default="", help="open_clip state dict to start from ('' = random init)")
    ap.add_argument("--model", default="catclip-tiny", help="model config of the checkpoint (default: %(default)s)")
    ap.add_argument("--run", required=True, help="output folder")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak lr; lower than pre-training (default: %(default)s)")
    ap.add_argument("--eval-split", default="dev", help="dev | test (default: %(default)s)")
    ap.add_argument("--num-workers", type=int, default=2, help="(default: %(default)s)")
    a = ap.parse_args(argv)
    r = finetune(a.flickr8k, a.run, a.model, a.checkpoint, a.steps, a.batch_size, a.lr, a.eval_split, a.num_workers)
    for name in ("zero_shot", "fine_tuned"):
        m = r[name]
        print(f"{name:>10}: rsum {m['rsum']:.1f}  i2t R@1/5/10 {m['i2t_r1']:.1f}/{m['i2t_r5']:.1f}/{m['i2t_r10']:.1f}"
              f"  t2i {m['t2i_r1']:.1f}/{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f}")


if __name__ == "__main__":
    main()
