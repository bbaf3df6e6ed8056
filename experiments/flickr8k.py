"""What does CAT filtering buy? A controlled experiment on real photos (Flickr8k) at one budget, every arm.

    make experiment-arms                              # defaults: ~30 min on 2 CPU cores
    .venv/bin/catcurate experiment --out out/experiment [--photos 2000 --seeds 3 --steps 600]
    .venv/bin/catcurate experiment --out out/exp-gpu --scale gpu      # all 6,000 photos, full image tower
    .venv/bin/catcurate experiment --out out/exp-tiny --scale smoke   # what `make test` runs

1. experiments.webnoise corrupts Flickr8k's train pairs like web data (text shortcut, misaligned
   alt-text, low-complexity captions), recording every corruption; dev stays clean.
2. The real CAT filter job (jobs.cat_filter, Spark, every stage) runs on the noisy pairs, plus one
   run per stage alone (caption rules only; text spotting only, caption rules off), and concept
   distillation (jobs.distill_labels) on the filtered output.
3. Arms, trained from scratch with the same model, schedule and samples seen, several seeds each:
     clean            the same photos with their true captions, no noise
     noisy            every noisy pair
     filtered         the filter's output shards (noisy -> make filter)
     random           a random subset of the noisy pairs of the filtered size ("which" vs "how many")
     filtered_distill filtered + concept distillation against make distill's labels
     caption_only     noisy -> caption rules alone;  textspot_only: noisy -> text spotting alone
     masked           the filter with --text-action mask: the text-shortcut pairs kept with the caption
                      text masked in their images (T-MARS), re-decided from the full run's stored
                      evidence (jobs.redecide, no second OCR pass); its shards carry the masked JPEGs
4. Every model is evaluated on the clean dev split (1,000 photos, 5 captions each, R@1/5/10 both
   ways); arms are compared with a paired bootstrap over dev images (seeds averaged).
5. OUT/results/: results.{md,csv,json}, recall.png (mean +- std), detector.{md,csv} (the filter as a
   detector of each noise type, and the clean pairs it threw away), machine.json, command.txt.

Model choice (CPU default, `--scale cpu`): a locked image tower (LiT): the offline EfficientNet-Lite0
teacher's features are computed once per distinct image (model_training.features) and a trained head
maps them; the text tower (catclip-micro's: 2 layers, width 64) trains from scratch. From-scratch 64-px towers
reach only RSUM ~41 in 10 CPU-minutes, too close to the noise floor to tell arms apart. The frozen
tower cannot learn to read, so the text shortcut cannot be exploited here (its harm at LAION scale);
what this experiment can show is what the filter's drops cost or save in data. `--scale gpu` trains
full image towers from scratch at 224 px (catclip-small), where reading rendered words is learnable.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from experiments.webnoise import DEFAULT_FLICKR8K, NOISE_TYPES, NoiseConfig, make_noisy_set

ARMS = ("clean", "noisy", "filtered", "random", "filtered_distill", "caption_only", "textspot_only", "masked")
GLYPH_SIDE = 96   # the glyphs tower's thumbnail: drawn words (8-14% of the height) legible, 64 px is not
FILTER_RUNS = {"filtered": "full", "caption_only": "caption_only", "textspot_only": "textspot_only"}


@dataclass(frozen=True)
class ExperimentConfig:
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    arms: tuple = ARMS
    seeds: int = 3                  # seeds per arm: init, data order (paired across arms by seed)
    model: str = "catclip-micro"    # text tower (2 layers, width 64) and image tower when image_tower == "full"
    # locked: LiT over cached EfficientNet-Lite0 features (cannot read) | glyphs: the same plus a small
    # trainable CNN over a 96-px grayscale thumbnail, where drawn words are legible (a tower that may learn
    # to read, model_training.features.GlyphCNN; on 2 cores it does not) | ocr: the same plus the words the
    # text spotter reads, embedded with the text tower's token table (a tower given a reader, which learns
    # whether to trust it: model_training.features.TokenReader) | full: the model's own tower from scratch (GPU)
    image_tower: str = "locked"
    steps: int = 400                # same samples seen in every arm: steps x batch_size
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 50
    distill_weight: float = 1.0     # concept-distillation loss weight in the filtered_distill arm
    rows_per_part: int = 2000       # filter parts (Spark tasks): several per core keep both cores busy
    spark_master: str = "local[2]"
    num_workers: int = 0            # the locked tower reads no pixels: loading is cheap, stay in-process
    dev_images: int = 0             # evaluate on the first N dev photos (0 = all 1,000; smoke runs use fewer)
    parallel_runs: int = 2          # training runs side by side (one torch thread each); 1 on a GPU


SCALES = {  # presets; explicit flags override
    "cpu": {},
    "smoke": {"noise": NoiseConfig(photos=40, text_shortcut=0.3, misaligned=0.2, low_complexity=0.15),
              "seeds": 1, "steps": 20, "batch_size": 32, "rows_per_part": 100, "dev_images": 50, "parallel_runs": 1,
              "arms": ("clean", "noisy", "filtered", "random", "filtered_distill", "masked")},
    "gpu": {"noise": NoiseConfig(photos=0), "image_tower": "full", "model": "catclip-small", "steps": 5000,
            "batch_size": 256, "lr": 5e-4, "warmup_steps": 500, "num_workers": 8, "parallel_runs": 1},
}


# ------------------------------------------------------------------ data for the arms
def _read(path, columns=None) -> list[dict]:
    return pq.read_table(path, columns=columns).to_pylist()


def ledger_rows(output: Path) -> list[dict]:
    """Every ledger row of a filter output (one per input row)."""
    files = sorted((output / "ledger").rglob("*.parquet"))
    return [r for f in files for r in _read(f, ["key", "status", "stage", "reason"])]


def _write_shards(rows: list[dict], out: Path, n_shards: int = 4) -> Path:
    import schemas as S
    from pipeline.store.partitions import atomic_write_parquet
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cols = set(S.SHARD.columns)
    for s in range(n_shards):
        atomic_write_parquet(S.SHARD.from_rows([{k: v for k, v in r.items() if k in cols} for r in rows[s::n_shards]]),
                             str(out / f"{s:05d}.parquet"))
    return out


def run_filters(cfg: ExperimentConfig, noisy: Path, work: Path, spark) -> dict[str, Path]:
    """The real CAT filter job on the noisy pairs: all stages, and each stage alone; for the masked arm, the
    full run re-decided with --text-action mask from its stored evidence (what a fresh run writes)."""
    from jobs.cat_filter import cat_filter
    from jobs.redecide import redecide
    from pipeline.filter.captions import CaptionParams
    runs = {"full": {}, "caption_only": {"stages": "caption"},
            "textspot_only": {"caption": CaptionParams(min_complexity=0, require_action=False)}}
    wanted = {FILTER_RUNS[a] for a in cfg.arms if a in FILTER_RUNS} | \
        ({"full"} if {"random", "filtered_distill", "masked"} & set(cfg.arms) else set())
    outs = {}
    for name, kwargs in runs.items():
        if name in wanted:
            outs[name] = work / "filter" / name
            print(f"[experiment] filter run {name!r} -> {outs[name]}", flush=True)
            cat_filter(str(noisy), str(outs[name]), rows_per_part=cfg.rows_per_part, spark=spark, **kwargs)
    if "masked" in cfg.arms:
        outs["masked"] = work / "filter" / "masked"
        if not (outs["masked"] / "stats.json").is_file():   # a rerun reuses it
            print(f"[experiment] filter run 'masked' (re-decided from 'full') -> {outs['masked']}", flush=True)
            redecide(str(outs["full"]), str(outs["masked"]), text_action="mask", engine="local")
    return outs


def arm_shards(cfg: ExperimentConfig, noisy_rows: list[dict], filters: dict[str, Path], work: Path,
               clean_rows: list[dict]) -> dict[str, dict]:
    """arm -> {"shards": path, "keys": set of training keys, "labels": LABELS dir or ''}."""
    kept = {name: {r["key"] for r in ledger_rows(out) if r["status"] == "kept"} for name, out in filters.items()}
    arms = {}
    for arm in cfg.arms:
        if arm == "clean":
            rows = clean_rows
        elif arm == "noisy":
            rows = noisy_rows
        elif arm == "random":   # same size as the filtered set, drawn from all noisy pairs
            rows = random.Random(f"random-arm-{cfg.noise.seed}").sample(noisy_rows, len(kept["full"]))
        elif arm in ("filtered", "filtered_distill", "masked"):   # the filter's own shards (masked: masked JPEGs)
            run = "masked" if arm == "masked" else "full"
            shards = filters[run] / "shards"
            keys = {r["key"] for f in sorted(shards.glob("*.parquet")) for r in _read(f, ["key"])}
            if keys != kept[run]:
                raise AssertionError("the filter's shards and its ledger disagree on the kept pairs")
            arms[arm] = {"shards": shards, "n_pairs": len(keys),
                         "labels": str(work / "labels") if arm == "filtered_distill" else ""}
            continue
        else:
            rows = [r for r in noisy_rows if r["key"] in kept[FILTER_RUNS[arm]]]
        arms[arm] = {"shards": _write_shards(rows, work / "arms" / arm), "n_pairs": len(rows), "labels": ""}
    return arms


def clean_pairs(noisy_rows: list[dict], flickr8k: str | Path) -> list[dict]:
    """The noisy set's photos with their true captions and untouched images (the clean arm)."""
    from model_training.caption_sets import load_flickr8k
    train = load_flickr8k(flickr8k, "train")
    index = {name: i for i, name in enumerate(train.image_ids)}
    return [{**r, "caption": r["clean_caption"], "jpg": train.image_bytes(index[r["photo"]]), "noise": "none"}
            for r in noisy_rows]


def subset_images(cs, n: int):
    """The first n images of a CaptionSet with all their captions."""
    from model_training.caption_sets import CaptionSet
    keep = [(c, i) for c, i in zip(cs.captions, cs.text_to_image) if i < n]
    return CaptionSet(cs.image_paths[:n], [c for c, _ in keep], [i for _, i in keep], cs.image_ids[:n], cs.notes)


def write_dev_images(dev, path: Path) -> None:
    import pyarrow as pa
    pq.write_table(pa.table({"jpg": pa.array([dev.image_bytes(i) for i in range(len(dev.image_ids))], pa.binary())}),
                   path)


# ------------------------------------------------------------------ training and evaluation
def train_arm(cfg: ExperimentConfig, arm: dict, seed: int, run_dir: Path, features: Path) -> dict:
    from model_training.train import TrainConfig, train
    from model_training.losses import LossConfig
    summary_path = run_dir / "train_summary.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("finished"):
        return json.loads(summary_path.read_text())    # a rerun of the experiment reuses finished arms
    if run_dir.exists():
        shutil.rmtree(run_dir)
    loss = LossConfig(concept_weight=cfg.distill_weight) if arm["labels"] else LossConfig()
    tc = TrainConfig(shards=str(arm["shards"]), labels=arm["labels"], run_dir=str(run_dir), model=cfg.model,
                     batch_size=cfg.batch_size, max_steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                     num_workers=cfg.num_workers, seed=seed, checkpoint_every=cfg.steps, keep_checkpoints=1,
                     log_every=max(1, cfg.steps // 30),
                     image_features=str(features) if cfg.image_tower != "full" else "", loss=loss)
    t0 = time.time()
    summary = train(tc)
    summary["train_seconds"] = round(time.time() - t0, 1)
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def load_run(cfg: ExperimentConfig, run_dir: Path, features: Path) -> dict:
    """A finished run's model (latest checkpoint, eval mode) and the feature cache it reads, for evaluate_run
    on several sets without loading either again."""
    import torch
    from model_training.features import FeatureCache
    from model_training.models import build_model
    from model_training.run_dir import find_checkpoint
    ckpt = find_checkpoint(run_dir, "latest")   # by step, as the trainer orders them
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    cache = FeatureCache.shared(features) if cfg.image_tower != "full" else None
    model = build_model(cfg.model, image_feature_dim=cache.dim if cache else 0, glyph_side=cache.glyph_side if cache else 0,
                        ocr_tokens=cache.ocr_tokens if cache else 0)
    model.load_state_dict({k[len("model."):]: v for k, v in state["trainee"].items() if k.startswith("model.")})
    model.eval()
    return {"model": model, "cache": cache, "texts": {}}


def evaluate_run(cfg: ExperimentConfig, run_dir: Path, dev, features: Path, loaded: dict | None = None):
    """Dev retrieval of a finished run: (metrics dict, i2t ranks, t2i ranks). `loaded`, a dict kept across the
    calls of one run, is filled with load_run's on first need and reused, and with it the caption embeddings
    of sets with the same captions (the probe sets keep dev's)."""
    import torch
    from model_training.evaluate import embed_images, embed_texts, recall_from_ranks, retrieval_ranks
    from model_training.models import get_tokenizer
    loaded = {} if loaded is None else loaded
    if not loaded:
        loaded.update(load_run(cfg, run_dir, features))
    model, cache = loaded["model"], loaded["cache"]
    with torch.no_grad():
        if cache:
            img = model.encode_image(cache.lookup([dev.image_bytes(i) for i in range(len(dev.image_ids))]))
        else:
            img = embed_images(model, dev.image_paths, model.image_size)
        key = tuple(dev.captions)
        if key not in loaded["texts"]:
            loaded["texts"][key] = embed_texts(model, get_tokenizer(model.name), dev.captions)
        txt = loaded["texts"][key]
    i2t, t2i = retrieval_ranks(img, txt, dev.text_to_image)
    return recall_from_ranks(i2t, t2i), i2t.numpy(), t2i.numpy()


def _train_and_evaluate(job):
    cfg, arm, spec, seed, run_dir, dev, features = job
    summary = train_arm(cfg, spec, seed, run_dir, features)
    metrics, i2t, t2i = evaluate_run(cfg, run_dir, dev, features)
    return arm, seed, metrics, i2t, t2i, summary


def _map_runs(fn, jobs: list, processes: int):
    """Runs in `processes` fresh processes of one torch thread each: two small runs side by side use
    two cores better than one run with two threads. Results come back in job order."""
    if processes <= 1:
        yield from map(fn, jobs)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn"), initializer=_one_thread) as pool:
        yield from pool.map(fn, jobs)


def _one_thread():
    import torch
    torch.set_num_threads(1)


def paired_bootstrap(a: dict, b: dict, text_to_image, n_boot: int = 2000, seed: int = 0) -> dict:
    """RSUM(a) - RSUM(b) with both arms' ranks averaged over seeds, resampling dev images (with their
    captions) with replacement: the same resample for both arms, so the comparison is paired."""
    t2i_img = np.asarray(text_to_image)
    n_img = len(a["i2t"][0])
    caps_of = [np.flatnonzero(t2i_img == i) for i in range(n_img)]

    ks = np.array([1, 5, 10])

    def hits(arm):   # [queries, k]: the fraction of seeds that retrieved each query within k
        return tuple(np.mean([np.asarray(r)[:, None] < ks for r in arm[d]], axis=0) for d in ("i2t", "t2i"))
    (ai, at), (bi, bt) = hits(a), hits(b)
    di, dt = (ai - bi).sum(1), (at - bt).sum(1)   # per-query difference of hits, summed over k
    dt_img = np.array([dt[c].sum() for c in caps_of])       # an image's captions travel with it
    n_caps = np.array([len(c) for c in caps_of])

    def rsum_diff(imgs):
        return 100.0 * (di[imgs].mean() + dt_img[imgs].sum() / n_caps[imgs].sum())
    rng = np.random.default_rng(seed)
    observed = rsum_diff(np.arange(n_img))
    boots = np.array([rsum_diff(rng.integers(0, n_img, n_img)) for _ in range(n_boot)])
    p = 2 * min((boots <= 0).mean(), (boots >= 0).mean())
    return {"rsum_diff": round(float(observed), 2), "ci95": [round(float(np.percentile(boots, 2.5)), 2),
                                                             round(float(np.percentile(boots, 97.5)), 2)],
            "p_two_sided": round(float(min(1.0, p)), 4)}


# ------------------------------------------------------------------ the filter as a detector
def detector_table(filters: dict[str, Path], noise_of: dict[str, str]) -> list[dict]:
    rows = []
    for name, out in filters.items():
        ledger = ledger_rows(out)
        for kind in NOISE_TYPES:
            mine = [r for r in ledger if noise_of[r["key"]] == kind]
            dropped = [r for r in mine if r["status"] != "kept"]
            masked = sum(r["reason"] == "text_masked" for r in mine)   # kept with the text masked (masked run)
            reasons: dict[str, int] = {}
            for r in dropped:
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
            rows.append({"filter_run": name, "noise": kind, "n": len(mine), "dropped": len(dropped),
                         "drop_rate": round(len(dropped) / len(mine), 4) if mine else None,
                         "reasons": dict(sorted(reasons.items())), "masked": masked})
    return rows


def textspot_scores(filters: dict[str, Path], noise_of: dict[str, str]) -> dict:
    """The text-spot stage as a detector of rendered caption text, where it saw every pair."""
    out = filters.get("textspot_only") or filters.get("full")
    ledger = ledger_rows(out)
    seen = [r for r in ledger if r["stage"] == "textspot"]
    flagged = [r for r in seen if r["reason"] == "text_spotted"]
    positives = [r for r in seen if noise_of[r["key"]] == "text_shortcut"]
    tp = sum(noise_of[r["key"]] == "text_shortcut" for r in flagged)
    return {"filter_run": out.name, "n_spotted_images": len(seen), "n_rendered": len(positives),
            "recall": round(tp / len(positives), 4) if positives else None,
            "precision": round(tp / len(flagged), 4) if flagged else None}


# ------------------------------------------------------------------ driver
@dataclass
class Pool:
    """What every arm and budget shares, made once per noisy pool (reused by a rerun): the noisy set, the
    filter runs, the distillation labels, the arms' shards, dev and the image-feature cache."""
    noisy: Path
    info_path: Path
    noise_of: dict
    filters: dict
    arms: dict
    dev: object
    features: Path
    timings: dict


OCR_TOKENS = 16   # word pieces kept of what the spotter reads: the noise model draws 1-4 words


def cache_tower_features(images: list[str], work: Path, tower: str) -> Path:
    """The feature cache the image tower reads, extended by `images`: the teacher's vectors (locked), and for
    the glyphs / ocr towers the same vectors copied with a glyph thumbnail / the read words' token ids
    appended (ocr reuses what the pool's filter runs read). Returns its folder."""
    from model_training.features import cache_features
    cache_features(images, work / "features")
    if tower == "glyphs":
        folder = work / f"features-glyphs{GLYPH_SIDE}"
        cache_features(images, folder, glyph_side=GLYPH_SIDE, reuse=work / "features")
    elif tower == "ocr":
        folder = work / f"features-ocr{OCR_TOKENS}"
        ocr_from = sorted(p for p in (work / "filter").glob("*") if (p / "ocr").is_dir())
        cache_features(images, folder, ocr_tokens=OCR_TOKENS, reuse=work / "features", ocr_from=ocr_from)
    else:
        folder = work / "features"
    return folder


def noisy_pool(work: Path, cfg: ExperimentConfig, flickr8k: str | Path) -> tuple[Path, Path]:
    """WORK/noisy/train.parquet and its noise.json, made by the noise model unless there for this config."""
    noisy_dir = work / "noisy"
    info_path = noisy_dir / "noise.json"
    if not info_path.is_file() or json.loads(info_path.read_text())["config"] != asdict(cfg.noise):
        make_noisy_set(noisy_dir, cfg.noise, flickr8k)
    return noisy_dir / "train.parquet", info_path


def _experiment_spark(cfg: ExperimentConfig):
    from jobs.spark import get_spark
    return get_spark("experiment", cfg.spark_master)


def prepare_pool(out: Path, cfg: ExperimentConfig, flickr8k: str | Path, spark=None) -> Pool:
    """Noise model -> real filter runs -> distillation -> arm shards -> dev -> feature cache (LiT), each
    step skipped when its output is there."""
    from jobs.distill_labels import distill_labels
    from model_training.caption_sets import load_flickr8k

    work = out / "work"
    t_start = time.time()
    timings = {}
    noisy, info_path = noisy_pool(work, cfg, flickr8k)
    noisy_rows = _read(noisy)
    noise_of = {r["key"]: r["noise"] for r in noisy_rows}
    timings["noise_model"] = round(time.time() - t_start, 1)

    spark = spark or _experiment_spark(cfg)
    t = time.time()
    filters = run_filters(cfg, noisy, work, spark)
    timings["filters"] = round(time.time() - t, 1)
    t = time.time()
    if "filtered_distill" in cfg.arms:
        distill_labels(str(filters["full"]), str(work / "labels"), spark=spark)
    timings["distill"] = round(time.time() - t, 1)
    arms = arm_shards(cfg, noisy_rows, filters, work, clean_pairs(noisy_rows, flickr8k) if "clean" in cfg.arms else [])
    del noisy_rows

    dev = load_flickr8k(flickr8k, "dev")
    if cfg.dev_images:
        dev = subset_images(dev, cfg.dev_images)
    features = work / "features"
    t = time.time()
    if cfg.image_tower != "full":
        write_dev_images(dev, work / "dev_images.parquet")
        images = [str(noisy)] + [str(a["shards"]) for a in arms.values()] + [str(work / "dev_images.parquet")]
        features = cache_tower_features(images, work, cfg.image_tower)
    timings["image_features"] = round(time.time() - t, 1)
    return Pool(noisy, info_path, noise_of, filters, arms, dev, features, timings)


def run_experiment(out: str | Path, cfg: ExperimentConfig = ExperimentConfig(), flickr8k: str | Path = DEFAULT_FLICKR8K,
                   spark=None) -> dict:
    from experiments.report import write_results

    out = Path(out)
    work = out / "work"
    t_start = time.time()
    pool = prepare_pool(out, cfg, flickr8k, spark)
    timings, filters, arms, dev, features = pool.timings, pool.filters, pool.arms, pool.dev, pool.features
    noise_of, info_path = pool.noise_of, pool.info_path

    results: dict[str, dict] = {a: {"n_pairs": spec["n_pairs"], "runs": [], "i2t": [], "t2i": []}
                                for a, spec in arms.items()}
    jobs = [(cfg, arm, spec, seed, work / "runs" / arm / f"seed{seed}", dev, features)
            for seed in range(cfg.seeds) for arm, spec in arms.items()]
    t = time.time()
    for arm, seed, metrics, i2t, t2i, summary in _map_runs(_train_and_evaluate, jobs, cfg.parallel_runs):
        results[arm]["runs"].append({"seed": seed, **metrics, "train_seconds": summary.get("train_seconds"),
                                     "samples_seen": summary["samples_seen"]})
        results[arm]["i2t"].append(i2t)
        results[arm]["t2i"].append(t2i)
        print(f"[experiment] {arm} seed {seed}: rsum {metrics['rsum']:.1f} "
              f"(R@1 i2t {metrics['i2t_r1']:.1f} t2i {metrics['t2i_r1']:.1f})", flush=True)
    timings["training_and_eval"] = round(time.time() - t, 1)

    comparisons = {}
    for a, b in (("filtered", "noisy"), ("filtered", "random"), ("random", "noisy"), ("clean", "noisy"),
                 ("filtered_distill", "filtered"), ("caption_only", "noisy"), ("textspot_only", "noisy"),
                 ("filtered", "clean"), ("masked", "filtered")):
        if a in results and b in results:
            comparisons[f"{a} - {b}"] = paired_bootstrap(results[a], results[b], dev.text_to_image)
    timings["total"] = round(time.time() - t_start, 1)
    summary = {"config": _jsonable(asdict(cfg)), "noise": json.loads(info_path.read_text()),
               "filter_stats": {name: json.loads((p / "stats.json").read_text()) for name, p in filters.items()},
               "arms": {a: {k: v for k, v in r.items() if k not in ("i2t", "t2i")} for a, r in results.items()},
               "comparisons": comparisons, "detector": detector_table(filters, noise_of),
               "textspot_detector": textspot_scores(filters, noise_of) if filters else None,
               "dev": {"n_images": len(dev.image_ids), "n_captions": len(dev.captions)},
               "timings_s": timings, "machine": machine(), "command": " ".join(sys.argv)}
    write_results(summary, out / "results")
    return summary


def run_detector(out: str | Path, cfg: ExperimentConfig = ExperimentConfig(),
                 flickr8k: str | Path = DEFAULT_FLICKR8K, spark=None) -> dict:
    """`--detector-only`: the noise model and the real filter runs (all stages, each stage alone, and the
    masked re-decision), scored as a detector of each noise type; no distillation or training. Writes
    OUT/results/detector.{md,csv,json}; a later full run reuses the filter runs."""
    from experiments.report import detector_markdown, write_detector_csv

    out, t_start = Path(out), time.time()
    noisy, info_path = noisy_pool(out / "work", cfg, flickr8k)
    noise_of = {r["key"]: r["noise"] for r in _read(noisy)}
    filters = run_filters(replace(cfg, arms=("filtered", "caption_only", "textspot_only", "masked")),
                          noisy, out / "work", spark or _experiment_spark(cfg))
    summary = {"noise": json.loads(info_path.read_text()), "detector": detector_table(filters, noise_of),
               "textspot_detector": textspot_scores(filters, noise_of),
               "filter_stats": {name: json.loads((p / "stats.json").read_text()) for name, p in filters.items()},
               "seconds": round(time.time() - t_start, 1), "machine": machine(), "command": " ".join(sys.argv)}
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "detector.json").write_text(json.dumps(_jsonable(summary), indent=2))
    write_detector_csv(summary["detector"], results / "detector.csv")
    (results / "detector.md").write_text(detector_markdown(summary))
    return summary


def machine() -> dict:
    import torch
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d")}


def _jsonable(x):
    return json.loads(json.dumps(x, default=list))


def parse_config(argv=None) -> tuple[ExperimentConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/experiment", help="output folder (default: %(default)s)")
    ap.add_argument("--flickr8k", default=str(DEFAULT_FLICKR8K), help="Flickr8k folder (default: %(default)s)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="preset (default: %(default)s)")
    d = ExperimentConfig()
    for name in ("seeds", "steps", "batch_size", "lr", "model", "image_tower", "spark_master", "parallel_runs"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(d, name)), default=None,
                        help=f"(default: {getattr(d, name)}, or the scale's)")
    ap.add_argument("--photos", type=int, default=None, help=f"train photos, x5 pairs (default: {d.noise.photos})")
    ap.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--detector-only", action="store_true",
                    help="only the noise model and the filter runs, scored as a detector of each noise type "
                         "(OUT/results/detector.*); no training")
    a = ap.parse_args(argv)
    cfg = replace(d, **SCALES[a.scale])
    over = {k: getattr(a, k) for k in ("seeds", "steps", "batch_size", "lr", "model", "image_tower", "spark_master",
                                       "parallel_runs") if getattr(a, k) is not None}
    if a.photos is not None:
        over["noise"] = replace(cfg.noise, photos=a.photos)
    if a.arms:
        unknown = set(a.arms.split(",")) - set(ARMS)
        if unknown:
            ap.error(f"unknown arm(s) {sorted(unknown)}; arms: {', '.join(ARMS)}")
        over["arms"] = tuple(a.arms.split(","))
    return replace(cfg, **over), a


def main(argv=None):
    cfg, a = parse_config(argv)
    if a.detector_only:
        summary = run_detector(a.out, cfg, a.flickr8k)
        print((Path(a.out) / "results" / "detector.md").read_text())
        return summary
    summary = run_experiment(a.out, cfg, a.flickr8k)
    print((Path(a.out) / "results" / "results.md").read_text())
    return summary


if __name__ == "__main__":
    main()
