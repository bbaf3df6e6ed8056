"""Trainer speed: our training step vs open_clip's own, and retrieval-eval time at COCO-5k scale.

    .venv/bin/python bench/bench_train.py [--model catclip-tiny] [--batch 64] [--steps 20]

1. Training samples/s of our step (model_training: Trainee + InfoNCE + fused AdamW + clipping) and of
   open_clip's step (open_clip.create_model + open_clip.loss.ClipLoss + torch.optim.AdamW with
   open_clip's weight-decay groups + clipping, as in open_clip's train_one_epoch) on the same model
   config, batch and data, in the same process, interleaved in blocks so load changes hit both
   alike. ratio = ours / open_clip (target >= 1.0). On GPU both run under bf16 autocast.
2. retrieval_metrics on 5,000 images x 25,000 captions of random 512-d embeddings (the COCO 5k shape).
Writes bench/results/train.json with the machine description (and the load average: this is a
shared machine, so absolute numbers move; the ratio is the figure to read).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402

from model_training.evaluate import retrieval_metrics  # noqa: E402
from model_training.losses import LossConfig, build_objective  # noqa: E402
from model_training.models import build_model  # noqa: E402
from model_training.train import Trainee, TrainConfig, make_optimizer  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "train.json"


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "open_clip": open_clip.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def our_step_fn(model_name, device):
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    trainee = Trainee(model, build_objective(LossConfig(contrastive="infonce"), model)).to(device)
    opt = make_optimizer(trainee, TrainConfig())

    def step(images, texts):
        opt.zero_grad(set_to_none=True)
        loss = trainee(images, texts)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainee.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss
    return step


def open_clip_step_fn(model_name, device):
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None, device=device)
    loss_fn = ClipLoss()
    # open_clip/main.py: no weight decay for gains / biases / logit_scale (p.ndim < 2 or bn/ln/bias/logit_scale)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                             {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
                            lr=5e-4, betas=(0.9, 0.98), eps=1e-6)

    def step(images, texts):
        opt.zero_grad(set_to_none=True)
        img, txt, scale = model(images, texts)
        loss = loss_fn(img, txt, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss
    return step


def bench_training(model_name: str, batch: int, steps: int, blocks: int, device) -> dict:
    cfg = open_clip.get_model_config(model_name)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):   # the same 4 batches for both steps
        texts = torch.randint(1, 49406, (batch, ctx), generator=g)
        texts[:, 0], texts[:, ctx // 2] = 49406, 49407          # sot ... eot, padded with token ids
        texts[:, ctx // 2 + 1:] = 0
        data.append((torch.randn(batch, 3, size, size, generator=g).to(device), texts.to(device)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    steps_fns = {"ours": our_step_fn(model_name, device), "open_clip": open_clip_step_fn(model_name, device)}
    rates = {k: [] for k in steps_fns}

    def run(fn, n):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for i in range(n):
            with autocast:
                loss = fn(*data[i % len(data)])
        float(loss)
        sync()
        return n * batch / (time.perf_counter() - t)

    for fn in steps_fns.values():
        run(fn, 3)   # warm-up: allocator, first-call overheads
    for b in range(blocks):   # alternate which goes first
        order = list(steps_fns) if b % 2 == 0 else list(reversed(steps_fns))
        for name in order:
            rates[name].append(run(steps_fns[name], steps))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"model": model_name, "batch": batch, "steps_per_block": steps, "blocks": blocks,
            "ours_samples_per_s": round(med["ours"], 2), "open_clip_samples_per_s": round(med["open_clip"], 2),
            "ratio": round(med["ours"] / med["open_clip"], 3),
            "blocks_samples_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()}}


def bench_retrieval(n_img=5000, per=5, dim=512, device=torch.device("cpu")) -> dict:
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=-1).to(device)
    txt = torch.nn.functional.normalize(torch.randn(n_img * per, dim, generator=g), dim=-1).to(device)
    t2i = [i for i in range(n_img) for _ in range(per)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    m = retrieval_metrics(img, txt, t2i)
    seconds = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n_images": n_img, "n_captions": n_img * per, "dim": dim, "seconds": round(seconds, 2),
            "peak_rss_growth_mb": round((rss1 - rss0) / 1024, 1),
            "full_matrix_would_be_mb": round(n_img * n_img * per * 4 / 2 ** 20, 1),
            "rsum_random": round(m["rsum"], 3), "device": str(device)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="catclip-tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="steps per timed block")
    ap.add_argument("--blocks", type=int, default=4, help="timed blocks per step implementation")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"machine": machine(), "training": bench_training(a.model, a.batch, a.steps, a.blocks, device),
              "retrieval_eval": bench_retrieval(device=device)}
    result["machine"]["load_average_1m_end"] = os.getloadavg()[0]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
