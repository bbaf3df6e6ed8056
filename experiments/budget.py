"""When does CAT filtering pay? The Flickr8k experiment swept over the training budget (samples seen).

    make experiment                                             # the whole pool, every budget, 3 seeds, locked tower
    .venv/bin/catcurate experiment-budget --out out/experiment [--budgets 0.125,0.5,2,8 --seeds 3]
    .venv/bin/catcurate experiment-budget --out out/budget-tiny --scale smoke    # what `make test` runs
    make experiment-reading                                     # a tower that reads (--scale reading: --tower ocr)

The pool is made once (experiments.flickr8k.prepare_pool: noise model, the real filter job, distillation,
the LiT feature cache) and reused by every budget, arm and seed; a rerun reuses finished runs. A budget
is a multiple of the noisy pool's size in samples seen (steps = budget x pairs / batch), the same in
every arm, so small budgets see each filtered pair about once and large ones many times (Goyal et al.,
CVPR 2024: filtering wins while kept data is seen few times and loses once it is repeated).

Every model is scored on clean dev and on two probe variants of it (the reading probe): each dev photo
with 1-4 words of one of its own captions drawn on it (the noise model's renderer), and with words of
an unrelated dev caption drawn on it (a typographic attack). A model that reads gains on the first and
loses on the second; the two differences to clean dev, with paired-bootstrap CIs, are its reading index.

OUT/results/: budget.{csv,json} (arm, budget, seed, samples seen, metrics on clean / own_text /
unrelated_text dev), budget.md (mean and 95% band per arm and budget, filtered - noisy per budget with
its bootstrap CI, the crossover budget with an interval or a plain statement that there is none, the
reading index), budget.png (RSUM against samples seen, log x, 95% bands).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from experiments.flickr8k import (ExperimentConfig, _jsonable, _map_runs, cache_tower_features, evaluate_run, machine,
                                  paired_bootstrap, prepare_pool, train_arm)
from experiments.webnoise import DEFAULT_FLICKR8K, NoiseConfig, caption_phrase, encode_jpeg

PROBES = ("own_text", "unrelated_text")
# one pool (noise, filter runs, distillation, teacher features) serves both towers; their runs and results don't mix
RUNS = {"locked": "runs", "glyphs": "runs-glyphs", "ocr": "runs-ocr", "full": "runs-full"}
RESULTS = {"locked": "results", "glyphs": "results-glyphs", "ocr": "results-ocr", "full": "results-full"}
# paired differences reported per budget beside filtered - noisy: which pairs vs how many, mask vs drop,
# what distillation adds
COMPARISONS = (("filtered", "random"), ("masked", "filtered"), ("masked", "noisy"), ("filtered_distill", "filtered"),
               ("textspot_only", "noisy"))
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


@dataclass(frozen=True)
class BudgetConfig:
    base: ExperimentConfig = field(default_factory=lambda: ExperimentConfig(
        noise=NoiseConfig(photos=0), arms=("clean", "noisy", "filtered", "random", "filtered_distill", "masked")))
    # x the noisy pool's pairs, in samples seen: 1/8 sees each filtered pair once at most, 8 about 17
    # times; factor-4 steps span Goyal et al.'s regimes at a cost 2 cores can pay (each doubling of the top
    # budget doubles the training time)
    budgets: tuple = (0.125, 0.5, 2.0, 8.0)
    # arms run at three budgets spanning the range only (their question is "does it add to filtered", not
    # where a crossover lies); the others run at every budget
    side_arms: tuple = ("filtered_distill", "masked")
    side_budgets: tuple = (0.125, 2.0, 8.0)
    probe: bool = True


SCALES = {
    "cpu": {},
    # a tower that reads (the text spotter's words beside the locked features; --tower glyphs: a CNN that may
    # learn to read, and on 2 cores does not): does the noisy arm's model read, and what do text spotting, its
    # mask and the whole filter do then
    "reading": {"base": ExperimentConfig(noise=NoiseConfig(photos=0), image_tower="ocr",
                                         arms=("noisy", "filtered", "textspot_only", "masked")),
                "side_arms": ()},   # the default's four budgets: where reading starts to pay, and what 8x repeats do
    "smoke": {"base": ExperimentConfig(noise=NoiseConfig(photos=40, text_shortcut=0.3, misaligned=0.2,
                                                         low_complexity=0.15),
                                       arms=("noisy", "filtered", "random"), seeds=1, batch_size=32,
                                       warmup_steps=2, rows_per_part=100, dev_images=40, parallel_runs=1),
              "budgets": (0.5, 2.0), "side_budgets": (2.0,)},
}


# ------------------------------------------------------------------ the reading probe
def probe_sets(dev, seed: int = 0) -> dict:
    """dev with words of one of each photo's own captions drawn on it, and with words of an unrelated
    dev caption (the photo half the set away) drawn on it; captions and their order stay dev's."""
    from PIL import Image

    from model_training.caption_sets import CaptionSet
    from pipeline.media.render import render_text
    rng, noise = random.Random(f"reading-probe-{seed}"), NoiseConfig()
    captions_of = defaultdict(list)
    for c, i in zip(dev.captions, dev.text_to_image):
        captions_of[i].append(c)
    n = len(dev.image_ids)
    images = {name: [] for name in PROBES}
    for i in range(n):
        photo = Image.open(io.BytesIO(dev.image_bytes(i))).convert("RGB")
        for name, source in (("own_text", i), ("unrelated_text", (i + n // 2) % n)):
            text = caption_phrase(rng.choice(captions_of[source]), rng, noise)
            images[name].append(encode_jpeg(render_text(photo, text, rng), noise.jpeg_quality))
    return {name: CaptionSet(imgs, list(dev.captions), list(dev.text_to_image), list(dev.image_ids))
            for name, imgs in images.items()}


def _write_images(cs, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    if not path.is_file():
        pq.write_table(pa.table({"jpg": pa.array(cs.image_paths, pa.binary())}), path)
    return path


# ------------------------------------------------------------------ runs
def steps_for(budget: float, n_pairs: int, batch_size: int) -> int:
    return max(1, round(budget * n_pairs / batch_size))


def _budget_job(job):
    cfg, budget, arm, spec, seed, run_dir, sets, features = job
    summary = train_arm(cfg, spec, seed, run_dir, features)
    loaded = {}
    scores = {name: _scores(cfg, run_dir, name, cs, features, loaded) for name, cs in sets.items()}
    return budget, arm, seed, summary, scores


def _scores(cfg, run_dir: Path, name: str, cs, features, loaded: dict):
    """evaluate_run, kept beside the run (metrics and ranks): a rerun that changes only the report re-reads
    them instead of evaluating every model again. `loaded`: the run's model, loaded by evaluate_run on first need."""
    path = run_dir / f"eval_{name}.npz"
    if path.is_file():
        with np.load(path) as z:
            if len(z["t2i"]) == len(cs.captions):
                return json.loads(str(z["metrics"])), z["i2t"], z["t2i"]
    metrics, i2t, t2i = evaluate_run(cfg, run_dir, cs, features, loaded)
    tmp = run_dir / f"eval_{name}.tmp.npz"
    np.savez(tmp, metrics=json.dumps(metrics), i2t=i2t, t2i=t2i)
    tmp.replace(path)
    return metrics, i2t, t2i


def run_budget_sweep(out: str | Path, bcfg: BudgetConfig = BudgetConfig(), flickr8k: str | Path = DEFAULT_FLICKR8K,
                     spark=None) -> dict:
    out, cfg = Path(out), bcfg.base
    t_start = time.time()
    pool = prepare_pool(out, cfg, flickr8k, spark)
    n_pool = json.loads(pool.info_path.read_text())["n_pairs"]
    sets = {"clean": pool.dev}
    if bcfg.probe:
        t = time.time()
        sets.update(probe_sets(pool.dev, cfg.noise.seed))
        if cfg.image_tower != "full":
            cache_tower_features([str(_write_images(sets[p], out / "work" / f"probe_{p}.parquet")) for p in PROBES],
                                 out / "work", cfg.image_tower)
        pool.timings["probe_sets"] = round(time.time() - t, 1)
    jobs = []
    for budget in bcfg.budgets:
        steps = steps_for(budget, n_pool, cfg.batch_size)
        run_cfg = replace(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, max(1, steps // 5)))
        for seed in range(cfg.seeds):
            for arm, spec in pool.arms.items():
                if arm in bcfg.side_arms and budget not in bcfg.side_budgets:
                    continue
                jobs.append((run_cfg, budget, arm, spec, seed,
                             out / "work" / RUNS[cfg.image_tower] / f"budget{budget:g}" / arm / f"seed{seed}", sets,
                             pool.features))
    rows, ranks = [], defaultdict(lambda: defaultdict(lambda: {"i2t": [], "t2i": []}))
    t = time.time()
    for budget, arm, seed, summary, scores in _map_runs(_budget_job, jobs, cfg.parallel_runs):
        row = {"arm": arm, "budget": budget, "seed": seed, "steps": steps_for(budget, n_pool, cfg.batch_size),
               "samples_seen": summary["samples_seen"],
               "train_pairs": pool.arms[arm]["n_pairs"], "train_seconds": summary.get("train_seconds")}
        for name, (metrics, i2t, t2i) in scores.items():
            prefix = "" if name == "clean" else f"{name}_"
            row.update({f"{prefix}{k}": v for k, v in metrics.items()})
            ranks[(arm, budget)][name]["i2t"].append(i2t)
            ranks[(arm, budget)][name]["t2i"].append(t2i)
        rows.append(row)
        probes = "".join(f", {p} {row[p + '_rsum']:.1f}" for p in PROBES if p + "_rsum" in row)
        print(f"[budget] x{budget:g} {arm} seed {seed}: rsum {row['rsum']:.1f}{probes}", flush=True)
    pool.timings["training_and_eval"] = round(time.time() - t, 1)
    t2i_dev = pool.dev.text_to_image
    def paired(a, b):
        return [{"budget": budget, **paired_bootstrap(ranks[(a, budget)]["clean"], ranks[(b, budget)]["clean"], t2i_dev)}
                for budget in bcfg.budgets if (a, budget) in ranks and (b, budget) in ranks]
    diffs = paired("filtered", "noisy")
    comparisons = {f"{a} - {b}": pairs for a, b in COMPARISONS if (pairs := paired(a, b))}
    reading = []
    if bcfg.probe:
        for (arm, budget), by_set in sorted(ranks.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            reading.append({"arm": arm, "budget": budget, **{
                name: paired_bootstrap(by_set[name], by_set["clean"], t2i_dev) for name in PROBES},
                # drawn words cover pixels either way: own - unrelated is what reading alone adds
                "own_minus_unrelated": paired_bootstrap(by_set["own_text"], by_set["unrelated_text"], t2i_dev)})
    pool.timings["total"] = round(time.time() - t_start, 1)
    summary = {"config": _jsonable(asdict(bcfg)), "n_pool_pairs": n_pool,
               "arm_pairs": {a: s["n_pairs"] for a, s in pool.arms.items()},
               "noise": json.loads(pool.info_path.read_text()), "runs": rows, "bands": bands(rows),
               "filtered_minus_noisy": diffs, "crossover": crossover(diffs), "comparisons": comparisons,
               "reading_index": reading,
               "dev": {"n_images": len(pool.dev.image_ids), "n_captions": len(pool.dev.captions)},
               "timings_s": pool.timings, "machine": machine(), "command": " ".join(sys.argv)}
    write_budget_results(summary, out / RESULTS[cfg.image_tower])
    return summary


# ------------------------------------------------------------------ statistics
def bands(rows: list[dict], metric: str = "rsum") -> list[dict]:
    """Mean and 95% t-interval over seeds per (arm, budget)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["arm"], r["budget"])].append(r)
    out = []
    for (arm, budget), runs in sorted(groups.items()):
        vals = np.array([r[metric] for r in runs], dtype=float)
        half = (T975.get(len(vals), 1.96) * vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else 0.0
        out.append({"arm": arm, "budget": budget, "samples_seen": runs[0]["samples_seen"], "seeds": len(vals),
                    "mean": round(float(vals.mean()), 2), "lo": round(float(vals.mean() - half), 2),
                    "hi": round(float(vals.mean() + half), 2)})
    return out


def crossover(diffs: list[dict]) -> dict:
    """Where filtered - noisy changes sign along the budget axis: a log-linear interpolation of the mean
    difference, bracketed by the nearest budgets on each side whose bootstrap CI excludes zero."""
    pts = sorted(diffs, key=lambda d: d["budget"])
    for a, b in zip(pts, pts[1:]):
        if a["rsum_diff"] == 0 or a["rsum_diff"] * b["rsum_diff"] < 0:
            la, lb = math.log(a["budget"]), math.log(b["budget"])
            frac = a["rsum_diff"] / (a["rsum_diff"] - b["rsum_diff"]) if a["rsum_diff"] else 0.0
            estimate = math.exp(la + (lb - la) * frac)
            wins_first = a["rsum_diff"] > 0 or (a["rsum_diff"] == 0 and b["rsum_diff"] < 0)
            # the nearest budgets on each side where the CI excludes zero, with that side's sign
            before = [d["budget"] for d in pts if d["budget"] < estimate
                      and (d["ci95"][0] > 0 if wins_first else d["ci95"][1] < 0)]
            after = [d["budget"] for d in pts if d["budget"] > estimate
                     and (d["ci95"][1] < 0 if wins_first else d["ci95"][0] > 0)]
            lo, hi = (max(before) if before else None), (min(after) if after else None)
            side = "filtering wins below it and loses above" if wins_first else "filtering loses below it and wins above"
            return {"estimate": round(estimate, 4), "interval": [lo, hi],
                    "statement": f"filtered - noisy changes sign near {estimate:.3g}x the pool ({side}); the CI "
                                 f"excludes zero at {lo if lo is not None else 'no budget'} below and "
                                 f"{hi if hi is not None else 'no budget'} above"}
    if not pts:
        return {"estimate": None, "interval": [None, None], "statement": "no filtered/noisy pair of runs"}
    sign = "wins" if pts[0]["rsum_diff"] > 0 else "loses"
    return {"estimate": None, "interval": [None, None],
            "statement": f"no crossover in {pts[0]['budget']:g}x-{pts[-1]['budget']:g}x the pool: filtering {sign} "
                         f"at every budget measured"}


# ------------------------------------------------------------------ results
def write_budget_results(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.json").write_text(json.dumps(summary, indent=2))
    rows = summary["runs"]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "budget.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    (out / "budget.md").write_text(budget_markdown(summary))
    plot_budget(summary, out / "budget.png")


def _ci(d: dict) -> str:
    return f"[{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]"


def _diff_table(rows: list[dict]) -> list[str]:
    """Paired differences per budget as markdown rows."""
    return ["| budget | RSUM diff | 95% CI | p |", "|---|---|---|---|"] + [
        f"| {d['budget']:g} | {d['rsum_diff']:+.1f} | {_ci(d)} | {d['p_two_sided']:.3f} |" for d in rows]


def budget_markdown(summary: dict) -> str:
    m, cfg = summary["machine"], summary["config"]["base"]
    lines = [f"# When does filtering pay? {summary['n_pool_pairs']:,} noisy Flickr8k pairs, budgets in samples seen",
             "", f"Model {cfg['model']} (image tower {cfg['image_tower']}), batch {cfg['batch_size']}, "
             f"{cfg['seeds']} seed(s); train pairs per arm: " + ", ".join(
                 f"{a} {n:,}" for a, n in summary["arm_pairs"].items()) + f"; machine {m['cpu']} ({m['cores']} cores), "
             f"{m['date']}; total {summary['timings_s']['total'] / 60:.1f} min.", "",
             "Dev RSUM, mean [95% band over seeds]:", "",
             "| budget (x pool) | samples seen | " + " | ".join(summary["arm_pairs"]) + " |",
             "|---|---|" + "---|" * len(summary["arm_pairs"])]
    by = {(b["arm"], b["budget"]): b for b in summary["bands"]}
    for budget in summary["config"]["budgets"]:
        cells = [f"{by[(a, budget)]['mean']:.1f} [{by[(a, budget)]['lo']:.1f}, {by[(a, budget)]['hi']:.1f}]"
                 if (a, budget) in by else "-" for a in summary["arm_pairs"]]
        seen = next((b["samples_seen"] for b in summary["bands"] if b["budget"] == budget), "-")
        lines.append(f"| {budget:g} | {seen:,} | " + " | ".join(cells) + " |")
    lines += ["", "filtered - noisy (paired bootstrap over dev images, seeds averaged):", ""]
    lines += _diff_table(summary["filtered_minus_noisy"])
    lines += ["", f"Crossover: {summary['crossover']['statement']}.", ""]
    for name, rows in summary.get("comparisons", {}).items():
        lines += [f"{name} (paired bootstrap):", ""] + _diff_table(rows) + [""]
    if summary["reading_index"]:
        lines += ["Reading index (RSUM on dev with text drawn on the photos minus clean dev; own caption's words: a "
                  "reader gains; an unrelated caption's words: a reader loses; both lose the covered pixels, so own - "
                  "unrelated > 0 is the sign of reading):", "",
                  "| arm | budget | own text - clean [95% CI] | unrelated text - clean [95% CI] | own - unrelated [95% CI] |",
                  "|---|---|---|---|---|"]
        for r in summary["reading_index"]:
            cells = [f"{d['rsum_diff']:+.1f} {_ci(d)}" for d in (r["own_text"], r["unrelated_text"], r["own_minus_unrelated"])]
            lines.append(f"| {r['arm']} | {r['budget']:g} | " + " | ".join(cells) + " |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()), "",
              f"Command: `{summary['command']}`", ""]
    return "\n".join(lines)


def plot_budget(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in summary["arm_pairs"]:
        pts = sorted((b for b in summary["bands"] if b["arm"] == arm), key=lambda b: b["samples_seen"])
        if not pts:
            continue
        x = [b["samples_seen"] for b in pts]
        ax.plot(x, [b["mean"] for b in pts], marker="o", label=arm)
        ax.fill_between(x, [b["lo"] for b in pts], [b["hi"] for b in pts], alpha=0.2)
    ax.axvline(summary["n_pool_pairs"], color="#999", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("samples seen (dashed: one pass over the noisy pool)")
    ax.set_ylabel("dev RSUM")
    ax.set_title("RSUM against training budget (mean, 95% band)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_config(argv=None) -> tuple[BudgetConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/budget", help="output folder (default: %(default)s)")
    ap.add_argument("--flickr8k", default=str(DEFAULT_FLICKR8K), help="Flickr8k folder (default: %(default)s)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="preset (default: %(default)s)")
    ap.add_argument("--budgets", default=None, help="comma-separated multiples of the noisy pool "
                                                   f"(default: {','.join(f'{b:g}' for b in BudgetConfig.budgets)})")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm and budget (default: 3)")
    ap.add_argument("--photos", type=int, default=None, help="train photos, x5 pairs (default: 0 = all 6,000)")
    ap.add_argument("--arms", default=None, help="comma-separated arms (default: "
                    f"{','.join(BudgetConfig().base.arms)})")
    ap.add_argument("--side-budgets", default=None, help="budgets at which the side arms ("
                    f"{','.join(BudgetConfig.side_arms)}) run (default: "
                    f"{','.join(f'{b:g}' for b in BudgetConfig.side_budgets)})")
    ap.add_argument("--tower", choices=sorted(RUNS), default=None,
                    help="image tower: locked (LiT, cannot read), glyphs (+ a CNN over 96-px thumbnails: may learn "
                         "to read), ocr (+ the words the text spotter reads: learns whether to trust them), full "
                         "(from scratch; a GPU) (default: the scale's: locked for cpu, ocr for reading)")
    ap.add_argument("--no-probe", action="store_true", help="skip the reading probe's two dev variants")
    a = ap.parse_args(argv)
    bcfg = replace(BudgetConfig(), **SCALES[a.scale])
    base = bcfg.base
    if a.seeds is not None:
        base = replace(base, seeds=a.seeds)
    if a.photos is not None:
        base = replace(base, noise=replace(base.noise, photos=a.photos))
    if a.arms:
        base = replace(base, arms=tuple(a.arms.split(",")))
    if a.tower:
        base = replace(base, image_tower=a.tower)
    budgets = tuple(float(b) for b in a.budgets.split(",")) if a.budgets else bcfg.budgets
    side = tuple(float(b) for b in a.side_budgets.split(",")) if a.side_budgets else bcfg.side_budgets
    return replace(bcfg, base=base, budgets=budgets, side_budgets=side, probe=not a.no_probe), a


def main(argv=None):
    bcfg, a = parse_config(argv)
    run_budget_sweep(a.out, bcfg, a.flickr8k)
    print((Path(a.out) / RESULTS[bcfg.base.image_tower] / "budget.md").read_text())


if __name__ == "__main__":
    main()
