"""`make ablate`: train several objective presets on the same data, seed and budget; compare retrieval.

    .venv/bin/catcurate ablate --shards out/filter/shards --labels out/labels --out runs/ablate
    .venv/bin/catcurate ablate --shards S --out runs/ablate --presets clip,conlip,cl --max-steps 300
    .venv/bin/catcurate ablate --shards S --out runs/ablate --fractions 0.1,0.25,0.5,1.0     # data scaling
    .venv/bin/catcurate ablate --shards coco_shards --out runs/ablate_coco \
        --eval-coco-json coco-mini/captions.json --eval-images coco-mini/images --eval-caption-index 4

Every run gets the same trainer flags (defaults below, sized so all seven presets take a few minutes
on a laptop CPU at catclip-micro size; any model_training.train flag can be appended and applies to
all runs; explicit flags beat preset values). Momentum queues keep ConLIP's ratio to the GLOBAL batch
(3 x batch x ranks x accumulation steps, resolved by the trainer as in every run) unless --queue-size
is given. --seeds N repeats every (preset, fraction) with seeds 0..N-1 (init, data order, masks) and
the table gives each run plus the mean and std over seeds. Evaluation:
- default: held-out pairs (--holdout-fraction of keys by hash, never trained on), 1 caption per image;
- --eval-coco-json/--eval-images: a COCO-format caption set (5-caption protocol), optionally only
  caption --eval-caption-index of each image (e.g. the one left out of the training shards);
- --eval-flickr8k ROOT: Flickr8k's dev split (1,000 photos, 5 captions each; any layout
  caption_sets.load_flickr8k reads), with --eval-images-limit N to use its first N photos.
ConLIP's attention statistic is computed at evaluation from the trained heads on the first
evaluation batch. A preset that needs concept labels (diht) runs without them when none are given;
the table's notes column says so.
Writes OUT/results.{csv,md,json}, OUT/ablate_recall.png (grouped bars), OUT/scaling.png (when more
than one fraction), and per run OUT/f<fraction>/<preset>/ (the trainer's run folder + result.json;
a finished run is reused on rerun, so an interrupted ablation resumes).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from model_training.caption_sets import CaptionSet, load_coco, load_flickr8k
from model_training.data import ImageTransform, ShardStream, has_label_shards, list_shards, read_vocab
from model_training.evaluate import KS, chance_recall, embed_images, embed_texts, retrieval_metrics
from model_training.losses import STAT_PREFIX, LossConfig, build_objective
from model_training.models import build_model, get_tokenizer
from model_training.presets import list_presets, load_preset
from pipeline.store import storage
from model_training.train import Trainee, TrainConfig, parse_args, train
from model_training.train_eval import holdout_retrieval

DEFAULT_PRESETS = ("clip", "diht", "cl", "conlip", "conlip-vanilla", "denoise", "masked")
DEFAULTS = {"model": "catclip-micro", "batch_size": 32, "max_steps": 120, "warmup_steps": 12, "lr": 1e-3,
            "holdout_fraction": 0.1, "log_every": 20, "checkpoint_every": 100000, "keep_checkpoints": 1,
            "shuffle_buffer": 512}
METRICS = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS] + ["rsum"]


def _eval_set(a) -> CaptionSet | None:
    if a.eval_flickr8k:
        cs = load_flickr8k(a.eval_flickr8k, "dev")
        if a.eval_images_limit:
            n = a.eval_images_limit
            keep = [j for j, i in enumerate(cs.text_to_image) if i < n]
            cs = CaptionSet(cs.image_paths[:n], [cs.captions[j] for j in keep], [cs.text_to_image[j] for j in keep],
                            cs.image_ids[:n], [f"first {n} dev photos"])
        return cs
    if not a.eval_coco_json:
        return None
    cs = load_coco(a.eval_coco_json, a.eval_images)
    if a.eval_caption_index is None:
        return cs
    k = a.eval_caption_index
    per_image: dict[int, list[int]] = {}
    for j, i in enumerate(cs.text_to_image):
        per_image.setdefault(i, []).append(j)
    picks = [per_image[i][min(k, len(per_image[i]) - 1)] for i in range(len(cs.image_paths))]
    return CaptionSet(cs.image_paths, [cs.captions[j] for j in picks], list(range(len(cs.image_paths))),
                      cs.image_ids, [f"caption {k} of each image"])


@torch.no_grad()
def _attention_stats(cfg: TrainConfig, summary: dict, images, texts) -> dict:
    """Rebuild model + heads from the final checkpoint; the objective's stat_* terms on one eval batch."""
    ckpt = Path(cfg.run_dir) / "checkpoints" / f"step_{summary['steps']:07d}.pt"
    n_obj, n_att = read_vocab(cfg.labels) if cfg.labels else (0, 0)
    state = torch.load(ckpt, weights_only=True)
    loss = LossConfig(**state["config"]["loss"])   # as trained (the queue size resolved by the trainer)
    model = build_model(cfg.model, text_attention=cfg.text_attention)
    trainee = Trainee(model, build_objective(loss, model, n_obj, n_att, caption_shards=list_shards(cfg.shards),
                                             holdout_fraction=cfg.holdout_fraction))
    trainee.load_state_dict(state["trainee"])
    trainee.eval()
    if "concepts" in trainee.objective.parts:   # no labels for evaluation pairs: stats need no concept term
        del trainee.objective.parts["concepts"]
    terms = trainee(images, texts)
    return {k[len(STAT_PREFIX):]: round(float(v), 5) for k, v in terms.items() if k.startswith(STAT_PREFIX)}


def evaluate_run(cfg: TrainConfig, summary: dict, eval_set: CaptionSet | None) -> dict:
    model = build_model(summary["model"], summary["export"])    # the exported open_clip weights
    model.eval()
    tok = get_tokenizer(model.name)
    if eval_set is None:
        result = holdout_retrieval(cfg, model)
        stream = ShardStream(list_shards(cfg.shards), tok, model.image_size, 64, train=False, shuffle_buffer=0,
                             split="holdout", holdout_fraction=cfg.holdout_fraction, infinite=False)
        first = next(iter(stream))
        images, texts = first["images"], first["texts"]
    else:
        img = embed_images(model, eval_set.image_paths, model.image_size)
        txt = embed_texts(model, tok, eval_set.captions)
        n_img = len(eval_set.image_paths)
        result = {**retrieval_metrics(img, txt, eval_set.text_to_image), "n_images": n_img,
                  "n_captions": len(eval_set.captions),
                  "chance": chance_recall(n_img, round(len(eval_set.captions) / n_img))}
        tf = ImageTransform(model.image_size, train=False)
        idx = [eval_set.text_to_image[j] for j in range(min(64, len(eval_set.captions)))]
        images = torch.stack([tf(_open(eval_set.image_paths[i])) for i in idx])
        texts = tok(eval_set.captions[:len(idx)])
    result["attention"] = _attention_stats(cfg, summary, images, texts)
    return result


def _open(item):
    from model_training.caption_sets import open_image
    return open_image(item)   # a path, or the bytes of a Parquet-layout set (Flickr8k)


def _queue_size(run_dir: Path):
    """The momentum queue length the run trained with (as resolved and recorded in RUN/run.json), or ''."""
    from model_training.run_dir import RUN_MANIFEST
    loss = json.loads((run_dir / RUN_MANIFEST).read_text())["identity"]["config"]["loss"]
    return loss["queue_size"] if loss.get("momentum_weight", 0) > 0 else ""


def run_one(preset: str, fraction: float, a, passthrough: list[str], eval_set, seed: int | None = None) -> dict:
    run_dir = Path(a.out) / f"f{fraction:g}" / preset / ("" if seed is None else f"s{seed}")
    done = run_dir / "result.json"
    if done.is_file():
        print(f"[ablate] {preset} @ {fraction:g}: reusing {done}")
        return json.loads(done.read_text())
    given = {x.split("=")[0].lstrip("-").replace("-", "_") for x in passthrough if x.startswith("--")}
    preset_keys = set(load_preset(preset)["loss"]) | set(load_preset(preset)["train"])
    defaults = [f"--{k.replace('_', '-')}={v}" for k, v in DEFAULTS.items() if k not in given and k not in preset_keys]
    if eval_set is not None and "holdout_fraction" not in given:
        defaults = [d for d in defaults if not d.startswith("--holdout-fraction")]   # the eval set is separate
    argv = defaults + ["--shards", a.shards, "--run-dir", str(run_dir), "--preset", preset,
                       f"--train-fraction={fraction}"] + ([] if seed is None else [f"--seed={seed}"]) + passthrough
    cfg = parse_args(argv)   # queue_size 0 (the presets'): the trainer makes it 3 x the global batch
    cfg.num_workers = min(cfg.num_workers, len(list_shards(cfg.shards)))
    notes = []
    labels_ok = bool(a.labels) and has_label_shards(a.labels) and storage.isfile(storage.join(a.labels, "vocab.json"))
    if cfg.loss.concept_weight > 0 and not labels_ok:
        cfg.loss.concept_weight = 0.0
        notes.append("no labels: concept distillation off")
    cfg.labels = a.labels if labels_ok and cfg.loss.concept_weight > 0 else ""
    t0 = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - t0
    result = evaluate_run(cfg, summary, eval_set)
    row = {"preset": preset, "fraction": fraction, "seed": cfg.seed, "queue_size": _queue_size(run_dir),
           **{m: round(result[m], 2) for m in METRICS},
           **{f"attn_{k}": v for k, v in result["attention"].items()},
           "final_loss": round(summary["final_terms"]["loss"], 4), "train_seconds": round(seconds, 1),
           "steps": summary["steps"], "notes": "; ".join(notes),
           "chance_rsum": round(sum(result["chance"][m] for m in METRICS if m != "rsum"), 2)}
    done.write_text(json.dumps({**row, "eval": result, "train": summary}, indent=2, default=str))
    return row


def write_table(rows: list[dict], out: Path):
    fields = list(dict.fromkeys(k for r in rows for k in r if k not in ("eval", "train")))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in fields} for r in rows])
    md_fields = ["preset", "fraction", "seed", *METRICS, "final_loss", "train_seconds", "notes"]
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["preset"], r["fraction"]), []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        chance = rows[0].get("chance_rsum", "")
        lines += [f"Mean +- std over seeds (population std); recall in %, chance rsum {chance}:", "",
                  "| preset | fraction | seeds | " + " | ".join(METRICS) + " |", "|" + "---|" * (3 + len(METRICS))]
        for (preset, fraction), g in groups.items():
            cells = []
            for m in METRICS:
                v = [float(r[m]) for r in g]
                mean = sum(v) / len(v)
                std = (sum((x - mean) ** 2 for x in v) / len(v)) ** 0.5
                cells.append(f"{mean:.2f} +- {std:.2f}")
            lines.append(f"| {preset} | {fraction:g} | {len(g)} | " + " | ".join(cells) + " |")
        lines += ["", "Every run:", ""]
    lines += ["| " + " | ".join(md_fields) + " |", "|" + "---|" * len(md_fields)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in md_fields) + " |")
    attn = [r for r in rows if any(k.startswith("attn_") and "attn_cls" in k for k in r)]
    if attn:
        lines += ["", "ConLIP attention statistic (attention on the other modality's CLS in the masked heads, "
                      "mean / std over query tokens, on the first evaluation batch):", ""]
        for r in attn:
            stats = ", ".join(f"{k[5:]}={v}" for k, v in r.items() if k.startswith("attn_") and "attn_cls" in k)
            seed = "" if r.get("seed") is None else f", seed {r['seed']}"
            lines.append(f"- {r['preset']} @ {r['fraction']:g}{seed}: {stats}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


def plot(rows: list[dict], out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    top = max(r["fraction"] for r in rows)
    by_preset: dict[str, list[dict]] = {}
    for r in rows:
        if r["fraction"] == top:
            by_preset.setdefault(r["preset"], []).append(r)
    main = [{"preset": p, "chance_rsum": g[0]["chance_rsum"], **{m: sum(float(r[m]) for r in g) / len(g) for m in METRICS}}
            for p, g in by_preset.items()]   # seeds averaged
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(main)), 4))
    width = 0.8 / len(METRICS[:-1])
    for j, m in enumerate(METRICS[:-1]):
        ax.bar([i + j * width for i in range(len(main))], [r[m] for r in main], width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(main))], [r["preset"] for r in main])
    ax.set_ylabel("recall (%)"), ax.legend(ncol=2, fontsize=8), ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"retrieval by objective (data fraction {top:g}; chance rsum {main[0]['chance_rsum']})")
    fig.tight_layout()
    fig.savefig(out / "ablate_recall.png", dpi=110)
    plt.close(fig)
    fractions = sorted({r["fraction"] for r in rows})
    if len(fractions) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for preset in dict.fromkeys(r["preset"] for r in rows):
            mine = [r for r in rows if r["preset"] == preset]
            pts = sorted((f, sum(r["rsum"] for r in mine if r["fraction"] == f)
                          / sum(1 for r in mine if r["fraction"] == f)) for f in {r["fraction"] for r in mine})
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=preset)
        ax.set_xscale("log"), ax.set_xticks([f * 100 for f in fractions], [f"{f:.0%}" for f in fractions])
        ax.set_xlabel("training data used"), ax.set_ylabel("rsum"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
        ax.set_title("data scaling (same steps per run)")
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=110)
        plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Other flags are passed to model_training.train for every run.")
    ap.add_argument("--shards", required=True)
    ap.add_argument("--labels", default="", help="LABELS dir for the presets with concept distillation")
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help=f"comma list of {list_presets()}")
    ap.add_argument("--fractions", default="1.0", help="comma list of training-data fractions, e.g. 0.1,0.25,0.5,1.0")
    ap.add_argument("--eval-coco-json", default="", help="COCO captions json to evaluate on (else held-out keys)")
    ap.add_argument("--eval-images", default="", help="image folder of --eval-coco-json")
    ap.add_argument("--eval-caption-index", type=int, default=None, help="evaluate only caption K of each image")
    ap.add_argument("--eval-flickr8k", default="", help="Flickr8k folder: evaluate on its dev split (5 captions each)")
    ap.add_argument("--eval-images-limit", type=int, default=0, help="with --eval-flickr8k: only its first N dev photos")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per (preset, fraction): 0..N-1; mean +- std in the table")
    a, passthrough = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    for p in presets:
        load_preset(p)   # unknown names fail before any training
    fractions = [float(f) for f in a.fractions.split(",")]
    if a.eval_coco_json and not a.eval_images:
        ap.error("--eval-images is required with --eval-coco-json")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_set = _eval_set(a)
    rows = []
    seeds = [None] if a.seeds <= 1 else list(range(a.seeds))
    for fraction in fractions:
        for seed, preset in ((s, p) for s in seeds for p in presets):   # seed-major: every preset once first
            row = run_one(preset, fraction, a, passthrough, eval_set, seed)
            rows.append({k: v for k, v in row.items() if k not in ("eval", "train")})
            print(f"[ablate] {preset} @ {fraction:g}: rsum {row['rsum']} (t2i R@1 {row['t2i_r1']}, "
                  f"i2t R@1 {row['i2t_r1']}) in {row['train_seconds']} s")
            write_table(rows, out)
    plot(rows, out)
    print((out / "results.md").read_text())
    print(f"[ablate] wrote {out / 'results.md'}, results.csv, results.json, ablate_recall.png"
          + (", scaling.png" if len(fractions) > 1 else ""))


if __name__ == "__main__":
    main()
