"""DiHT's few-shot linear probe with projected gradient descent (PGD), against a probe from scratch.

    python -m model_training.probe --model catclip-tiny --checkpoint RUN/export/open_clip_model.pt \
        --imagefolder data/fewshot --out RUN/probe [--ks 1,2,4,8,16] [--radius 0.3] [--seeds 5]
    from model_training.probe import few_shot_comparison
    rows = few_shot_comparison(feats, labels, text_weights, ks=(1, 2, 4, 8, 16))

The classifier W [C, D] (logits = scale * f @ W.T + b on L2-normalised image features f) starts at
the zero-shot classifier: the class-prompt text embeddings. Each gradient step on the k-shot
cross-entropy is followed by a projection of every row back into the ball of radius `radius`
around its initial value, so with one or two shots per class the probe can only correct the text
prompts a little instead of overfitting the shots (Radenovic et al. 2023, Sec. few-shot). The
scratch probe is the same classifier started at zero with weight decay and no projection.
For each k and seed, k training images per class are drawn; all remaining images are the test set;
accuracies are means over seeds. ImageFolder layout: root/<class name>/<images> ('_' -> ' ').
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def project_rows(weights: torch.Tensor, center: torch.Tensor, radius: float) -> torch.Tensor:
    """Closest point (row by row, L2) within `radius` of `center`."""
    delta = weights - center
    norm = delta.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return center + delta * torch.clamp(radius / norm, max=1.0)


def train_probe(feats, labels, n_classes: int, init: torch.Tensor | None, radius: float | None,
                steps: int = 100, lr: float = 0.01, weight_decay: float = 0.0, scale: float = 20.0):
    """Full-batch Adam on CE; `init` None = zeros (scratch). With `radius`, PGD around `init`."""
    center = init.clone() if init is not None else torch.zeros(n_classes, feats.shape[1])
    w = center.clone().requires_grad_(True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(scale * feats @ w.T + b, labels).backward()
        opt.step()
        if radius is not None:
            with torch.no_grad():
                w.copy_(project_rows(w, center, radius))
    return w.detach(), b.detach()


def accuracy(feats, labels, w, b=None, scale: float = 20.0) -> float:
    logits = scale * feats @ w.T + (0 if b is None else b)
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def k_shot_split(labels: torch.Tensor, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    train = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) <= k:
            raise ValueError(f"class {c} has {len(idx)} images; k={k} shots need at least {k + 1} (one to test)")
        train.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    train = torch.cat(train)
    test = torch.ones(len(labels), dtype=torch.bool)
    test[train] = False
    return train, test.nonzero().squeeze(1)


def few_shot_comparison(feats, labels, text_weights, ks=(1, 2, 4, 8, 16), seeds: int = 5, radius: float = 0.3,
                        steps: int = 100, lr: float = 0.01, scratch_weight_decay: float = 1e-3) -> list[dict]:
    """feats [N,D] and text_weights [C,D] L2-normalised; labels [N] in [0, C). Mean accuracies over seeds."""
    feats, text_weights = F.normalize(feats.float(), dim=-1), F.normalize(text_weights.float(), dim=-1)
    labels = torch.as_tensor(labels, dtype=torch.long)
    n_classes = text_weights.shape[0]
    rows = []
    for k in ks:
        acc = {"zero_shot": [], "pgd": [], "scratch": []}
        for seed in range(seeds):
            tr, te = k_shot_split(labels, k, seed)
            acc["zero_shot"].append(accuracy(feats[te], labels[te], text_weights))
            w, b = train_probe(feats[tr], labels[tr], n_classes, text_weights, radius, steps, lr)
            acc["pgd"].append(accuracy(feats[te], labels[te], w, b))
            w, b = train_probe(feats[tr], labels[tr], n_classes, None, None, steps, lr, scratch_weight_decay)
            acc["scratch"].append(accuracy(feats[te], labels[te], w, b))
        rows.append({"k": k, **{name: round(sum(v) / len(v), 2) for name, v in acc.items()}, "seeds": seeds})
    return rows


def plot_probe(rows: list[dict], out_png: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ks = [r["k"] for r in rows]
    for name, style in (("pgd", "o-"), ("scratch", "s-"), ("zero_shot", "k:")):
        ax.plot(ks, [r[name] for r in rows], style, label=name)
    ax.set_xscale("log", base=2), ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("shots per class"), ax.set_ylabel("top-1 accuracy (%)"), ax.legend(), ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv=None):
    from model_training.evaluate import embed_images, embed_texts
    from model_training.models import build_model, get_tokenizer
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--checkpoint", default="", help="open_clip state dict (RUN/export/open_clip_model.pt)")
    ap.add_argument("--imagefolder", required=True, help="root/<class name>/<images>")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--radius", type=float, default=0.3, help="PGD ball radius around each class's prompt embedding")
    ap.add_argument("--template", default="a photo of a {}.")
    a = ap.parse_args(argv)
    model = build_model(a.model, a.checkpoint or None).eval()
    root = Path(a.imagefolder)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for c, name in enumerate(classes):
        for p in sorted((root / name).iterdir()):
            if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"}:
                paths.append(p)
                labels.append(c)
    feats = embed_images(model, paths, model.image_size)
    text = embed_texts(model, get_tokenizer(model.name), [a.template.format(c.replace("_", " ")) for c in classes])
    ks = [int(k) for k in a.ks.split(",")]
    smallest = min(labels.count(c) for c in range(len(classes)))
    usable = [k for k in ks if k < smallest]
    if usable != ks:
        print(f"[probe] skipping k={sorted(set(ks) - set(usable))}: the smallest class has {smallest} images")
    rows = few_shot_comparison(feats, torch.tensor(labels), text, usable, a.seeds, a.radius)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"classes": classes, "n_images": len(paths), "radius": a.radius,
                                                "rows": rows}, indent=2))
    plot_probe(rows, out / "probe.png", f"few-shot probe ({len(classes)} classes)")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
