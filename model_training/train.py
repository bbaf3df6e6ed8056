r"""Pre-train a CLIP-like dual encoder on Parquet shards. One straight-line loop, nanoGPT style.

    .venv/bin/catcurate train --shards out/filter/shards --run runs/tiny --max-steps 300
    .venv/bin/catcurate train --shards ... --run runs/tiny --resume latest          # continue
    .venv/bin/catcurate train --shards ... --run runs/conlip --preset conlip --model catclip-tiny
    .venv/bin/torchrun --nproc_per_node 8 -m model_training.train --model ViT-B-16 --batch-size 256 \
        --shards /data/laion-cat/shards --labels /data/laion-cat/labels --contrastive hn_nce \
        --concept-weight 1.0 --max-steps 100000 --warmup-steps 2000 --lr 5e-4 --run runs/b16
    .venv/bin/catcurate train --help

DDP: under torchrun each rank reads its own shard files; image and text embeddings are
all-gathered WITH gradient so the contrastive losses see the global batch (gloo on CPU, nccl on GPU).
Outputs in RUN/: checkpoints/step_NNNNNNN.pt (+ .json meta), log.csv (+ TensorBoard events when
tensorboard is installed), loss_curve.png, export/open_clip_model.pt (+ config json), train_summary.json.

A RUN folder holds one run (the filter's rule for OUTPUT): RUN/run.json records its identity (the
settings that shape the trajectory + a fingerprint of the shard and label files). The same command
again resumes from the newest checkpoint; another configuration or other data is refused with the
differences named (--overwrite clears RUN and starts over); --resume checks the checkpoint's stored
config. One process holds RUN at a time (pipeline.store.locks). A full disk stops with one line naming the
file and the space needed / free, temporaries removed; the same command then resumes.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and ("-h" in sys.argv[1:] or "--help" in sys.argv[1:]):
    # answer --help before torch and open_clip are imported (seconds on a loaded machine)
    from model_training.options import parse_args as _parse_args
    _parse_args(sys.argv[1:], description=__doc__)

import argparse
import csv
import dataclasses
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from model_training.data import (ShardStream, check_label_coverage, check_sharding, label_coverage, list_shards,
                                 make_loader, read_vocab)
from model_training.config import LossConfig, TrainConfig, with_effective_queue  # noqa: F401 (TrainConfig is imported from here too)
from model_training.losses import (OBJECTIVE_FORMAT, STAT_PREFIX, build_objective, check_objective_format,
                                   gather_with_grad)
from model_training.options import parse_args  # noqa: F401 (train_eval and others import it from here)
from model_training.models import build_model, get_tokenizer
from pipeline.store import storage
from pipeline.store.locks import LockHeld, LockLost, folder_lock
from pipeline.store.partitions import StorageError, as_storage_error, atomic_write_json, check_apart, writing
from model_training.run_dir import (RUN_MANIFEST, RunFolderError, check_checkpoint_config, delete_checkpoint,
                                   export_checked, find_checkpoint, list_checkpoints, load_checkpoint, prepare_run_dir,
                                   remove_run_temporaries, run_identity, save_checkpoint, staged_run)


# ------------------------------------------------------------------ pieces of the loop
class Trainee(nn.Module):
    """Model + objective as one module, so DDP sees (and syncs) the loss heads too."""

    def __init__(self, model, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, images, texts, concepts=None):
        # tokens come from the same pass (free); the token-level heads read them and call the model
        # again for masked / noisy views, all inside this forward so DDP sees one graph
        img, img_tokens = self.model.encode_image(images, return_tokens=True)
        txt, txt_tokens = self.model.encode_text(texts, return_tokens=True)
        return self.objective({"image_emb": gather_with_grad(img), "text_emb": gather_with_grad(txt),
                               "logit_scale": self.model.logit_scale.exp(), "image_emb_local": img,
                               "text_emb_local": txt, "image_tokens": img_tokens, "text_tokens": txt_tokens,
                               "model": self.model, "images": images, "texts": texts, "concepts": concepts})


# objectives that read image tokens or pixels: not available over cached features
PIXEL_OBJECTIVES = ("mlm_weight", "mim_weight", "itm_weight", "text_denoise_weight", "image_denoise_weight",
                    "repr_weight")


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    decay = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def make_optimizer(trainee: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """open_clip's rule: no weight decay on gains, biases, embeddings' 1-d params and logit_scale."""
    decay, no_decay = [], []
    for name, p in trainee.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "bias" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=True)   # one kernel over all params: ~10x faster than the loop on CPU


class RunLog:
    """CSV (always) + TensorBoard (when installed). On resume, rows after the checkpoint are dropped
    so the log describes exactly one trajectory."""

    def __init__(self, run_dir: Path, start_step: int):
        self.path = run_dir / "log.csv"
        self.rows = []
        if start_step > 0 and self.path.is_file():
            with open(self.path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            pass

    def add(self, row: dict):
        self.rows.append(row)
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path.with_suffix(".csv.tmp")
        with writing(str(self.path), str(tmp)):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(self.rows)
            tmp.replace(self.path)
        if self.tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])


def plot_losses(log_csv: Path, out_png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    skip = {"step", "samples", "lr", "samples_per_s", "temperature", "grad_norm", "skipped"}
    terms = [k for k in rows[0] if k not in skip and not k.startswith(STAT_PREFIX)]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [int(r["step"]) for r in rows]
    for k in terms:
        ax.plot(steps, [float(r[k]) for r in rows], label=k)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    ax.set_title(f"training loss ({log_csv.parent.name})")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _setup_distributed(device_pref: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is available")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _to(batch: dict, device):
    concepts = batch.get("concepts")
    if concepts is not None:
        concepts = {k: v.to(device, non_blocking=True) for k, v in concepts.items()}
    return batch["images"].to(device, non_blocking=True), batch["texts"].to(device, non_blocking=True), concepts


# ------------------------------------------------------------------ the loop
def train(cfg: TrainConfig, on_checkpoint=None) -> dict:
    """Train (or resume) the run in cfg.run_dir; returns the summary also written to RUN/train_summary.json.
    Rank 0 holds RUN's lock throughout; a full disk raises one StorageError with the temporaries removed.
    A RUN in an object store (s3://...) is trained in a local mirror and pushed after every checkpoint
    (run_dir.staged_run); `on_checkpoint` is called on rank 0 after each checkpoint is complete."""
    given = [cfg.shards] if isinstance(cfg.shards, (str, Path)) and "{" not in str(cfg.shards) else []
    check_apart({"--shards": [*map(str, given), *list_shards(cfg.shards)], "--labels": cfg.labels or ""},
                {"--run": cfg.run_dir})   # RUN inside (or around) its data: refused
    if storage.is_remote(cfg.run_dir):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RunFolderError(f"--run {cfg.run_dir}: a RUN in an object store is supported for one process; "
                                 f"with torchrun give a local or shared-filesystem RUN")
        with staged_run(cfg.run_dir, "train") as mirror:
            return train(dataclasses.replace(cfg, run_dir=str(mirror.local)), on_checkpoint=mirror.push)
    rank, world, device = _setup_distributed(cfg.device)
    run_dir = Path(cfg.run_dir)
    created = not run_dir.exists()
    try:
        with folder_lock(str(run_dir), "train") if rank == 0 else nullcontext():
            try:
                return _train(cfg, rank, world, device, run_dir, on_checkpoint or (lambda: None))
            except Exception as e:
                full = as_storage_error(e, str(run_dir))
                if full is None:
                    raise
                if rank == 0:
                    remove_run_temporaries(run_dir)
                raise full from None
    finally:
        if created and rank == 0 and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()   # refused before any work (no shards, ...): leave no empty RUN behind


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device, run_dir: Path, on_checkpoint) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    shards = list_shards(cfg.shards)
    check_sharding(len(shards), cfg.num_workers, world)   # fail here, not in a worker or a hung rank
    coverage = label_coverage(shards, cfg.labels) if cfg.labels else None   # labels of another OUTPUT match nothing
    if coverage is not None:
        check_label_coverage(coverage, cfg.labels, cfg.allow_missing_labels)
    cfg = with_effective_queue(cfg, world)   # queue 3 x global batch unless --queue-size: recorded as resolved
    identity = run_identity(cfg, shards)
    resume = prepare_run_dir(run_dir, identity, cfg, rank)
    if rank == 0:
        remove_run_temporaries(run_dir)
    if dist.is_initialized():
        dist.barrier()   # rank 0 may have cleared RUN (--overwrite)
    n_obj, n_att = read_vocab(cfg.labels) if cfg.labels else (0, 0)

    features = None
    if cfg.image_features:
        from model_training.features import FeatureCache
        needs_tokens = [n for n in PIXEL_OBJECTIVES if getattr(cfg.loss, n) > 0]
        if needs_tokens:
            raise ValueError(f"--image-features (a locked image tower) gives no image tokens or pixels; "
                             f"{', '.join('--' + n.replace('_', '-') for n in needs_tokens)} need the full tower")
        features = FeatureCache.shared(cfg.image_features)
    model = build_model(cfg.model, cfg.init_checkpoint or None, image_feature_dim=features.dim if features else 0,
                        text_attention=cfg.text_attention, glyph_side=features.glyph_side if features else 0,
                        ocr_tokens=features.ocr_tokens if features else 0
                        ).to(device)
    objective = build_objective(cfg.loss, model, n_obj, n_att, caption_shards=shards,   # shards: text noise's words
                                holdout_fraction=cfg.holdout_fraction).to(device)
    trainee = Trainee(model, objective)
    optimizer = make_optimizer(trainee, cfg)

    start_step, positions, samples_seen, skipped = 0, {}, 0, {}
    ckpt, state = load_checkpoint(run_dir, resume, device) if resume else (None, None)   # unreadable: the one before
    if resume and ckpt is None:
        print(f"[train] --resume {resume}: no checkpoint in {run_dir / 'checkpoints'}; starting fresh")
    if ckpt is None and rank == 0:
        print(f"[train] {cfg.model}: " + (f"weights from {cfg.init_checkpoint}" if cfg.init_checkpoint else
                                          "random initial weights (training from scratch)"))
    if ckpt is not None:
        check_objective_format(ckpt, state, trainee)   # a checkpoint of an older objective: one line naming the change
        check_checkpoint_config(ckpt, state, identity)
        trainee.load_state_dict(state["trainee"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, samples_seen, skipped = state["step"], state["samples_seen"], dict(state["skipped"])
        if len(state["data_positions"]) != world:
            raise ValueError(f"{ckpt} was written by {len(state['data_positions'])} rank(s); resuming with {world} "
                             "would change which shards each rank reads")
        positions = {int(k): tuple(v) for k, v in state["data_positions"][rank].items()}
        if rank == 0:
            print(f"[train] resumed from {ckpt} at step {start_step}")
            for step, later in list_checkpoints(run_dir):   # their trajectory is being replaced (as log rows are)
                if step > start_step:
                    delete_checkpoint(later)
    if rank == 0 and not (run_dir / RUN_MANIFEST).is_file():
        atomic_write_json({"identity": identity, "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
                          str(run_dir / RUN_MANIFEST))

    if cfg.compile:
        model.encode_image = torch.compile(model.encode_image)
        model.encode_text = torch.compile(model.encode_text)
    ddp = DDP(trainee, device_ids=[device.index] if device.type == "cuda" else None,
              broadcast_buffers=False) if world > 1 else None   # no BN; queues are identical on every rank
    step_fn = ddp or trainee

    batches_done = start_step * cfg.accum_steps
    n_workers = max(cfg.num_workers, 1)
    stream = ShardStream(shards, get_tokenizer(model.name), model.image_size, cfg.batch_size, train=True,
                         image_features=features,
                         labels_dir=cfg.labels or None, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                         split="train", holdout_fraction=cfg.holdout_fraction, rank=rank, world_size=world,
                         train_fraction=cfg.train_fraction,
                         start_positions=positions, worker_offset=batches_done % n_workers)
    batches = iter(make_loader(stream, cfg.num_workers))
    if ckpt is not None and "rng" in state:   # masks / noise / ITM negatives continue the same random stream
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    log = RunLog(run_dir, start_step) if rank == 0 else None
    end_step = min(cfg.max_steps, cfg.stop_after) if cfg.stop_after else cfg.max_steps
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    trainee.train()
    t_window, n_window, last_terms, rate = time.perf_counter(), 0, {}, 0.0
    for step in range(start_step, end_step):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        sums = {}
        for micro in range(cfg.accum_steps):
            batch = next(batches)
            worker, epoch, rows = batch["position"]
            positions[worker] = (epoch, rows)
            for reason, n in batch["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
            images, texts, concepts = _to(batch, device)
            sync = ddp.no_sync() if ddp is not None and micro < cfg.accum_steps - 1 else nullcontext()
            with sync:
                with autocast:
                    terms = step_fn(images, texts, concepts)
                (terms["loss"] / cfg.accum_steps).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.accum_steps
        grad_norm = (torch.nn.utils.clip_grad_norm_(trainee.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else torch.tensor(0.0))
        optimizer.step()
        with torch.no_grad():   # CLIP caps 1/temperature at 100 for stability
            model.logit_scale.clamp_(0, math.log(100))
        objective.after_step(model)   # EMA copies (momentum queue encoder, representation target)

        samples_seen += cfg.batch_size * cfg.accum_steps * world
        n_window += cfg.batch_size * cfg.accum_steps * world
        done = step + 1
        last_terms = sums
        if bar is not None:
            elapsed = time.perf_counter() - t_window
            rate = n_window / elapsed if elapsed > 0 else 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", samples_s=f"{rate:.0f}")
        if log is not None and (done % cfg.log_every == 0 or done == end_step):
            log.add({"step": done, "samples": samples_seen, "lr": lr, **sums,
                     "temperature": float(1 / model.logit_scale.detach().exp()), "grad_norm": float(grad_norm),
                     "samples_per_s": round(rate, 2), "skipped": sum(skipped.values())})
            t_window, n_window = time.perf_counter(), 0
        if done % cfg.checkpoint_every == 0 or done == end_step:
            all_pos = [None] * world
            mine = {str(k): list(v) for k, v in positions.items()}
            if world > 1:
                dist.all_gather_object(all_pos, mine)
            else:
                all_pos = [mine]
            if rank == 0:
                save_checkpoint(run_dir, {"step": done, "trainee": trainee.state_dict(), "objective_format": OBJECTIVE_FORMAT,
                                          "optimizer": optimizer.state_dict(), "data_positions": all_pos,
                                          "samples_seen": samples_seen, "skipped": skipped, "config": asdict(cfg),
                                          "data": identity["data"],
                                          "rng": {"cpu": torch.get_rng_state(),
                                                  "cuda": torch.cuda.get_rng_state(device)
                                                  if device.type == "cuda" else None}},
                                {"step": done, "loss": sums["loss"], "samples_seen": samples_seen,
                                 "model": model.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                cfg.keep_checkpoints)
                on_checkpoint()
    if bar is not None:
        bar.close()

    summary = {"steps": end_step, "samples_seen": samples_seen, "world_size": world,
               "final_terms": last_terms, "skipped_rows": skipped, "model": model.name,
               "finished": end_step == cfg.max_steps}
    if coverage is not None:
        summary["labels"] = coverage   # the shards' keys matched by --labels (metrics.json holds this summary)
    if rank == 0:
        if (run_dir / "log.csv").is_file():
            plot_losses(run_dir / "log.csv", run_dir / "loss_curve.png")
        if summary["finished"]:
            summary["export"] = str(export_checked(model, run_dir / "export"))
        atomic_write_json(summary, str(run_dir / "train_summary.json"))
    if dist.is_initialized():
        dist.barrier()
    return summary


# ------------------------------------------------------------------ CLI (parsing: model_training/options.py)
# errors a user can act on: RUN refusals, a full disk, a held lock, missing or unusable data
USER_ERRORS = (RunFolderError, StorageError, storage.StorageAccessError, LockHeld, LockLost, FileNotFoundError,
               ValueError)


@contextmanager
def one_line_errors(prog: str):
    """USER_ERRORS print as one line on stderr (no traceback) and exit with status 2."""
    try:
        yield
    except USER_ERRORS as e:
        lines = [line.strip() for line in (e.strerror if isinstance(e, StorageError) else str(e)).splitlines()]
        lines = [line for line in lines if line]
        # raised in a DataLoader worker, it arrives wrapped in the worker's traceback: the last line says it
        text = lines[-1] if len(lines) > 1 and "DataLoader worker" in lines[0] else " ".join(lines)
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", ())):   # a bar the error left open would prefix the line
            bar.close()
        print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main(argv=None):
    cfg = parse_args(argv, description=__doc__)
    with one_line_errors("train"):
        summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
