"""DiHT's few-shot linear probe: projected gradient descent (PGD) from the zero-shot classifier.

    .venv/bin/python -m model_training.probe --model catclip-tiny --checkpoint RUN/export/open_clip_model.pt \
        --imagefolder data/fewshot --out RUN/probe [--ks 1,2,4,8] [--seeds 5]
    from model_training.probe import few_shot_comparison
    rows = few_shot_comparison(feats, labels, text_weights, ks=(1, 2, 4, 8))

The classifier is logits = scale * f @ W.T + b on L2-normalised image features f. DiHT (Radenovic et
al. 2023) initialises W at the zero-shot classifier W0 (the class-prompt text embeddings, b0 = 0) and
solves the constrained problem

    min_{W,b} CE(W, b)   s.t.   ||W - W0||_F <= r_W,   ||b - b0||_2 <= r_b

by projected gradient descent: a plain (full-batch) gradient step on the k-shot cross-entropy, then
W and b are each projected onto their ball. A k-shot probe sees k labelled images per class and no
more: for each seed k shots per class are drawn and every remaining image is a test image; the radii
(r_W, r_b) are chosen by CROSS-VALIDATION within the k shots (cv_folds: k >= 2, min(k, 5) folds, each
holding out the same number of shots of every class; k = 1, min(C, 5) folds over the classes, each
holding out those classes' single shots), the grid point with the best pooled held-out accuracy is
then fit on all k shots and tested. Radii are given per class (r_W = rW * sqrt(C), r_b = rb * sqrt(C):
rW is the RMS distance of a row from its prompt), so a grid serves any number of classes.
The logits use the MODEL's own logit scale (exp(logit_scale) of the checkpoint; main passes it), and
the zero-shot classifier W0 is CLIP's prompt ensemble: per class the mean of the L2-normalised text
embeddings of PROMPT_TEMPLATES (CLIP's 7 selected ImageNet templates + "a photo of a {}."),
re-normalised. Reported on the same shots and test images:
    zero_shot      W0, b0 (no training)
    pgd            the constrained probe above
    unconstrained  the same steps from W0 without projection (what the balls buy)
    scratch        the same steps from W = 0, b = 0 with weight decay on W, decay cross-validated the same way
Accuracies are means over seeds. ImageFolder layout: root/<class name>/<images> ('_' -> ' ').
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class ProbeConfig:
    steps: int = 200                 # full-batch gradient steps (shots are few: the whole set is one batch)
    lr: float = 0.05                 # plain gradient step; PGD is defined with it (no Adam, no momentum)
    scale: float = 20.0              # logit scale on cosine similarities; main uses the model's own exp(logit_scale)
    max_folds: int = 5               # cross-validation folds within the k shots
    weight_radii: tuple = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)   # rW per class; the ball is ||W - W0||_F <= rW sqrt(C)
    bias_radii: tuple = (0.0, 0.25, 1.0, 4.0)           # rb per class; ||b||_2 <= rb sqrt(C), in logit units
    weight_decays: tuple = (0.0, 1e-3, 1e-2, 1e-1)      # scratch baseline's L2 penalty on W


def project_ball(x: torch.Tensor, center: torch.Tensor, radius) -> torch.Tensor:
    """Closest point to x within `radius` of `center`, L2 over all entries of each item (Frobenius for
    a matrix). Batched: x, center [G, ...] with radius [G] projects G problems at once (inf = no ball)."""
    radius = torch.as_tensor(radius, dtype=x.dtype)
    delta = x - center
    norm = delta.flatten(start_dim=delta.dim() - (center.dim() - radius.dim())).norm(dim=-1).clamp(min=1e-12)
    shrink = torch.clamp(radius / norm, max=1.0)
    return center + delta * shrink.reshape(shrink.shape + (1,) * (delta.dim() - shrink.dim()))


def train_probe(feats, labels, init_w: torch.Tensor, cfg: ProbeConfig, weight_radius=float("inf"),
                bias_radius=float("inf"), weight_decay=0.0):
    """Gradient descent on CE + weight_decay/2 ||W||^2 from (init_w, 0), then W projected onto
    ||W - init_w||_F <= weight_radius and b onto ||b||_2 <= bias_radius after every step (absolute radii).
    Radii and decay may be tensors [G]: G probes (a grid) are trained at once -> W [G,C,D], b [G,C].
    The CE gradient is written out (dCE/dlogits = softmax - onehot, averaged over the shots): few
    shots and a full batch make this a tiny problem whose cost is the per-step overhead."""
    grid = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float32)
                                     for v in (weight_radius, bias_radius, weight_decay)))
    r_w, r_b, decay = (v.reshape(-1) for v in grid)
    g = len(r_w)
    w0 = init_w.float().expand(g, -1, -1)
    w, b = w0.clone(), torch.zeros(g, init_w.shape[0])
    onehot = F.one_hot(labels, init_w.shape[0]).float()
    for _ in range(cfg.steps):
        probs = torch.softmax(cfg.scale * torch.einsum("nd,gcd->gnc", feats, w) + b[:, None], dim=-1)
        err = (probs - onehot) / len(labels)                                     # [G, N, C]
        grad_w = cfg.scale * torch.einsum("gnc,nd->gcd", err, feats) + decay[:, None, None] * w
        w = project_ball(w - cfg.lr * grad_w, w0, r_w)
        b = project_ball(b - cfg.lr * err.sum(1), torch.zeros_like(b), r_b)
    return (w, b) if grid[0].dim() else (w[0], b[0])


def accuracy(feats, labels, w, b=None, scale: float = 20.0):
    """Top-1 accuracy in %; a float for one probe, a tensor [G] for a batch of probes."""
    logits = scale * feats @ w.transpose(-1, -2) + (0 if b is None else b[..., None, :])
    acc = 100.0 * (logits.argmax(-1) == labels).float().mean(-1)
    return float(acc) if acc.dim() == 0 else acc


# CLIP's prompt ensemble for ImageNet (the 7 templates its notebook selected) + the plain "a photo of a {}."
PROMPT_TEMPLATES = ("a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                    "a photo of the large {}.", "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


def ensemble_prompts(embed_texts_fn, class_names: list[str], templates=PROMPT_TEMPLATES) -> torch.Tensor:
    """Zero-shot classifier [C, D]: per class the mean of the L2-normalised embeddings of its prompts,
    re-normalised (CLIP's prompt ensembling). embed_texts_fn(list of str) -> [N, D]."""
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = F.normalize(embed_texts_fn(prompts).float(), dim=-1).reshape(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def cv_folds(labels: torch.Tensor, k: int, seed: int = 0, max_folds: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fit, held-out) index pairs over k shots per class (labels: the shots' classes). k >= 2: min(k,
    max_folds) folds; each class's shots, in a seeded order, are dealt round-robin to the folds, so every
    fold holds out the same number of shots of every class and fits on the rest (k - k/folds per class).
    k = 1: a class's single shot cannot be split, so the classes are dealt to min(C, max_folds) folds; a
    fold holds out those classes' shots and fits on the others (the radius then decides how far the
    probe may move the held-out classes' prompts by training on other classes)."""
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    fold_of = torch.empty(len(labels), dtype=torch.long)
    if k >= 2:
        n = min(k, max_folds)
        for c in classes.tolist():
            idx = (labels == c).nonzero().squeeze(1)
            fold_of[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx)) % n
    else:
        n = min(len(classes), max_folds)
        order = classes[torch.randperm(len(classes), generator=g)]
        for f, c in enumerate(order.tolist()):
            fold_of[labels == c] = f % n
    return [((fold_of != f).nonzero().squeeze(1), (fold_of == f).nonzero().squeeze(1)) for f in range(n)]


def cv_scores(feats, labels, init_w, cfg: "ProbeConfig", folds, **grid) -> torch.Tensor:
    """Pooled held-out accuracy (%) of every grid point over the folds (each held-out shot counts once)."""
    correct, total = 0.0, 0
    for fit, held in folds:
        w, b = train_probe(feats[fit], labels[fit], init_w, cfg, **grid)
        correct = correct + accuracy(feats[held], labels[held], w, b, cfg.scale) * len(held)
        total += len(held)
    return correct / total


def k_shot_split(labels: torch.Tensor, k: int, seed: int, held_out: bool = False):
    """Per class k training shots (and, only with held_out=True, k more validation shots: the old protocol,
    which used 2k labels for a "k-shot" probe); the rest is the test set."""
    g = torch.Generator().manual_seed(seed)
    need = 2 * k if held_out else k
    train, val = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) <= need:
            raise ValueError(f"class {c} has {len(idx)} images; {need} shots need at least {need + 1} (one to test)")
        picked = idx[torch.randperm(len(idx), generator=g)[:need]]
        train.append(picked[:k])
        val.append(picked[k:])
    train, val = torch.cat(train), torch.cat(val)
    test = torch.ones(len(labels), dtype=torch.bool)
    test[train] = False
    test[val] = False
    return train, val, test.nonzero().squeeze(1)


def grid_search(val_scores: torch.Tensor) -> int:
    """Index of the grid point with the best held-out score (the first one on ties)."""
    return int(torch.nonzero(val_scores == val_scores.max())[0])


def few_shot_comparison(feats, labels, text_weights, ks=(1, 2, 4, 8), seeds: int = 5,
                        cfg: ProbeConfig | None = None) -> list[dict]:
    """feats [N,D] and text_weights [C,D] (normalised here); labels [N] in [0, C). Mean test accuracies
    over seeds, and per seed the radii (per class) and the scratch weight decay the search chose."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # [G,N,C] problems this small run 10x slower when threads must sync per op
    try:
        return _comparison(feats, labels, text_weights, ks, seeds, cfg or ProbeConfig())
    finally:
        torch.set_num_threads(threads)


def _comparison(feats, labels, text_weights, ks, seeds: int, cfg: ProbeConfig) -> list[dict]:
    feats, text_weights = F.normalize(feats.float(), dim=-1), F.normalize(text_weights.float(), dim=-1)
    labels = torch.as_tensor(labels, dtype=torch.long)
    per_class = text_weights.shape[0] ** 0.5
    radii = list(itertools.product(cfg.weight_radii, cfg.bias_radii))
    r_w, r_b = (torch.tensor([r[i] for r in radii]) * per_class for i in (0, 1))
    decays = torch.tensor(cfg.weight_decays)
    rows = []
    for k in ks:
        acc = {"zero_shot": [], "pgd": [], "unconstrained": [], "scratch": []}
        chosen = {"pgd_radii": [], "scratch_weight_decay": []}
        for seed in range(seeds):
            tr, _, te = k_shot_split(labels, k, seed)
            f_tr, l_tr = feats[tr], labels[tr]
            folds = cv_folds(l_tr, k, seed, cfg.max_folds)
            best = grid_search(cv_scores(f_tr, l_tr, text_weights, cfg, folds, weight_radius=r_w, bias_radius=r_b))
            chosen["pgd_radii"].append(list(radii[best]))
            w, b = train_probe(f_tr, l_tr, text_weights, cfg, r_w[best], r_b[best])   # refit on all k shots
            zeros = torch.zeros_like(text_weights)
            best_s = grid_search(cv_scores(f_tr, l_tr, zeros, cfg, folds, weight_decay=decays))
            chosen["scratch_weight_decay"].append(cfg.weight_decays[best_s])
            w_s, b_s = train_probe(f_tr, l_tr, zeros, cfg, weight_decay=cfg.weight_decays[best_s])
            w_u, b_u = train_probe(f_tr, l_tr, text_weights, cfg)

            def test(weights, bias):
                return accuracy(feats[te], labels[te], weights, bias, cfg.scale)
            acc["zero_shot"].append(test(text_weights, None))
            acc["pgd"].append(test(w, b))
            acc["unconstrained"].append(test(w_u, b_u))
            acc["scratch"].append(test(w_s, b_s))
        rows.append({"k": k, **{name: round(sum(v) / len(v), 2) for name, v in acc.items()}, "seeds": seeds,
                     "labels_per_class": k, "logit_scale": round(cfg.scale, 3), **chosen})
    return rows


def plot_probe(rows: list[dict], out_png: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ks = [r["k"] for r in rows]
    for name, style in (("pgd", "o-"), ("unconstrained", "^-"), ("scratch", "s-"), ("zero_shot", "k:")):
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
    ap.add_argument("--ks", default="1,2,4,8", help="shots per class (each class needs k + 1 images: one to test)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=ProbeConfig.steps, help="gradient steps per probe")
    ap.add_argument("--lr", type=float, default=ProbeConfig.lr, help="gradient step size")
    ap.add_argument("--templates", default="", help="file of prompt templates, one per line with {} for the class "
                                                     "(default: CLIP's ImageNet ensemble, PROMPT_TEMPLATES)")
    ap.add_argument("--scale", type=float, default=0.0, help="logit scale (default: the model's own exp(logit_scale))")
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
    templates = ([t for t in Path(a.templates).read_text().splitlines() if "{}" in t] if a.templates
                 else list(PROMPT_TEMPLATES))
    tok = get_tokenizer(model.name)
    text = ensemble_prompts(lambda prompts: embed_texts(model, tok, prompts), [c.replace("_", " ") for c in classes],
                            templates)
    ks = [int(k) for k in a.ks.split(",")]
    smallest = min(labels.count(c) for c in range(len(classes)))
    usable = [k for k in ks if k < smallest]
    if usable != ks:
        print(f"[probe] skipping k={sorted(set(ks) - set(usable))}: the smallest class has {smallest} images")
    scale = a.scale or float(model.logit_scale.detach().exp())   # the model's own temperature
    cfg = ProbeConfig(steps=a.steps, lr=a.lr, scale=scale)
    rows = few_shot_comparison(feats, torch.tensor(labels), text, usable, a.seeds, cfg)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"classes": classes, "n_images": len(paths), "probe": asdict(cfg),
                                                "templates": templates, "rows": rows}, indent=2))
    plot_probe(rows, out / "probe.png", f"few-shot probe ({len(classes)} classes)")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
