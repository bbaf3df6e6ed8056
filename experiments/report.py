"""Tables and the chart of the Flickr8k experiment (experiments/flickr8k.py writes the summary).

    .venv/bin/python -m experiments.report out/experiment/results/results.json   # rewrite md/csv/png from the json
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def arm_stats(arm: dict) -> dict:
    out = {"n_pairs": arm["n_pairs"], "seeds": len(arm["runs"])}
    for m in METRICS:
        vals = np.array([r[m] for r in arm["runs"]], dtype=float)
        out[f"{m}_mean"] = round(float(vals.mean()), 2)
        out[f"{m}_std"] = round(float(vals.std(ddof=1)), 2) if len(vals) > 1 else 0.0
    secs = [r["train_seconds"] for r in arm["runs"] if r.get("train_seconds") is not None]
    out["train_seconds_mean"] = round(float(np.mean(secs)), 1) if secs else None
    return out


def write_results(summary: dict, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    rows = [{"arm": a, **arm_stats(r)} for a, r in summary["arms"].items()]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_detector_csv(summary["detector"], out / "detector.csv")
    (out / "machine.json").write_text(json.dumps(summary["machine"], indent=2))
    (out / "command.txt").write_text(summary["command"] + "\n")
    (out / "results.md").write_text(markdown(summary, rows))
    (out / "detector.md").write_text(detector_markdown(summary))
    plot(rows, summary, out / "recall.png")


def write_detector_csv(detector: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filter_run", "noise", "n", "dropped", "drop_rate", "reasons", "masked"])
        w.writeheader()
        for r in detector:
            w.writerow({**r, "reasons": json.dumps(r["reasons"])})


def markdown(summary: dict, rows: list[dict]) -> str:
    cfg, m = summary["config"], summary["machine"]
    lines = [f"# Flickr8k experiment: {summary['noise']['n_pairs']} noisy train pairs "
             f"({summary['noise']['n_photos']} photos), dev {summary['dev']['n_images']} photos x 5 captions",
             "",
             f"Model: {cfg['model']} text tower, image tower {cfg['image_tower']}; {cfg['steps']} steps x batch "
             f"{cfg['batch_size']} in every arm; {cfg['seeds']} seeds; machine: {m['cpu']} ({m['cores']} cores), "
             f"{m['date']}; total {summary['timings_s']['total'] / 60:.1f} min.", "",
             "| arm | train pairs | R@1 i2t | R@5 i2t | R@10 i2t | R@1 t2i | R@5 t2i | R@10 t2i | RSUM |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[f'{k}_mean']:.1f} ± {r[f'{k}_std']:.1f}" for k in METRICS]
        lines.append(f"| {r['arm']} | {r['n_pairs']} | " + " | ".join(cells) + " |")
    lines += ["", "Paired comparisons (RSUM difference, seeds averaged; 95% CI and p from a paired bootstrap "
              "over dev images):", "", "| comparison | RSUM diff | 95% CI | p |", "|---|---|---|---|"]
    for name, c in summary["comparisons"].items():
        lines.append(f"| {name} | {c['rsum_diff']:+.1f} | [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] | "
                     f"{c['p_two_sided']:.3f} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()), "",
              f"Command: `{summary['command']}`", ""]
    return "\n".join(lines)


def detector_markdown(summary: dict) -> str:
    lines = ["# The filter as a detector of each noise type", "",
             "| filter run | noise | pairs | dropped | drop rate | reasons | kept masked |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["detector"]:
        reasons = ", ".join(f"{k} {v}" for k, v in r["reasons"].items()) or "-"
        rate = f"{100 * r['drop_rate']:.1f}%" if r["drop_rate"] is not None else "-"
        lines.append(f"| {r['filter_run']} | {r['noise']} | {r['n']} | {r['dropped']} | {rate} | {reasons} | "
                     f"{r.get('masked', 0)} |")
    ts = summary.get("textspot_detector")
    if ts:
        lines += ["", f"Text-spot stage on rendered caption text ({ts['filter_run']} run, "
                      f"{ts['n_spotted_images']} pairs spotted, {ts['n_rendered']} with caption words drawn on): "
                      f"recall {ts['recall']}, precision {ts['precision']}.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    arms = [r["arm"] for r in rows]
    x = np.arange(len(arms))
    axes[0].bar(x, [r["rsum_mean"] for r in rows], yerr=[r["rsum_std"] for r in rows], capsize=4, color="#4a7")
    axes[0].set_xticks(x, arms, rotation=30, ha="right")
    axes[0].set_ylabel("dev RSUM (mean ± std over seeds)")
    for i, r in enumerate(rows):
        axes[0].text(i, r["rsum_mean"], f"{r['n_pairs']}", ha="center", va="bottom", fontsize=7)
    w = 0.13
    for j, k in enumerate(("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")):
        axes[1].bar(x + (j - 2.5) * w, [r[f"{k}_mean"] for r in rows], w, yerr=[r[f"{k}_std"] for r in rows],
                    capsize=2, label=k)
    axes[1].set_xticks(x, arms, rotation=30, ha="right")
    axes[1].set_ylabel("recall (%)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Flickr8k dev retrieval by training arm ({summary['config']['seeds']} seeds; "
                 f"numbers on bars: train pairs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    p = Path(sys.argv[1])
    write_results(json.loads(p.read_text()), p.parent)
