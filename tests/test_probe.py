"""DiHT's PGD few-shot probe (model_training/probe.py): the constrained problem against a reference
written from its definition, the held-out grid search, and a toy feature set with known structure.

Toy set: 10 classes, 64-d, 30 images each. Class centres are random unit vectors; each class's
"prompt embedding" is its centre plus noise (so zero-shot is imperfect, ~39 % top-1) and image
features are the centre plus stronger noise (so a single shot is a poor class estimate).
"""
import math

import torch
import torch.nn.functional as F

from model_training.probe import (PROMPT_TEMPLATES, ProbeConfig, accuracy, cv_folds, ensemble_prompts, few_shot_comparison,
                                  grid_search, k_shot_split, project_ball, train_probe)


def toy(seed=0, n_classes=10, dim=64, per_class=30, text_noise=2.0, image_noise=3.0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    prompts = F.normalize(centres + text_noise * torch.randn(n_classes, dim, generator=g) / dim ** 0.5, dim=-1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    feats = F.normalize(centres[labels] + image_noise * torch.randn(len(labels), dim, generator=g) / dim ** 0.5, dim=-1)
    return feats, labels, prompts


def reference_pgd(feats, labels, w0, steps, lr, scale, r_w, r_b):
    """min CE(W, b) s.t. ||W - W0||_F <= r_W, ||b||_2 <= r_b by projected gradient descent, with the
    softmax cross-entropy gradient written out sample by sample (dL/dz = p - onehot(y))."""
    w, b = w0.clone().double(), torch.zeros(w0.shape[0], dtype=torch.float64)
    w0, feats = w0.double(), feats.double()
    n = len(labels)
    for _ in range(steps):
        grad_w, grad_b = torch.zeros_like(w), torch.zeros_like(b)
        for f, y in zip(feats, labels.tolist()):
            z = scale * (w @ f) + b
            p = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
            p[y] -= 1.0
            grad_w += scale * torch.outer(p, f) / n
            grad_b += p / n
        w, b = w - lr * grad_w, b - lr * grad_b
        dist_w = math.sqrt(float(((w - w0) ** 2).sum()))
        if dist_w > r_w:
            w = w0 + (w - w0) * (r_w / dist_w)
        norm_b = math.sqrt(float((b ** 2).sum()))
        if norm_b > r_b:
            b = b * (r_b / norm_b)
    return w, b


def test_pgd_matches_the_constrained_problem_stepped_by_hand():
    feats, labels, prompts = toy(n_classes=4, dim=8, per_class=3)
    cfg = ProbeConfig(steps=15, lr=0.1, scale=20.0)
    for r_w, r_b in ((0.3, 0.5), (5.0, 0.0), (1e9, 1e9)):
        w, b = train_probe(feats, labels, prompts, cfg, weight_radius=r_w, bias_radius=r_b)
        ref_w, ref_b = reference_pgd(feats, labels, prompts, 15, 0.1, 20.0, r_w, r_b)
        assert torch.allclose(w.double(), ref_w, atol=1e-4) and torch.allclose(b.double(), ref_b, atol=1e-4)
        assert float((w - prompts).norm()) <= r_w + 1e-4 and float(b.norm()) <= r_b + 1e-4
    # the ball is on the whole W (Frobenius), not per row: one row may move further than r_W / sqrt(C)
    w, _ = train_probe(feats, labels, prompts, cfg, weight_radius=0.3, bias_radius=0.0)
    assert abs(float((w - prompts).norm()) - 0.3) < 1e-4


def test_projection_is_onto_the_whole_ball():
    center = torch.randn(5, 8)
    w = center + torch.randn(5, 8) * 3
    p = project_ball(w, center, 0.5)
    assert abs(float((p - center).norm()) - 0.5) < 1e-5
    assert torch.allclose((p - center) / (p - center).norm(), (w - center) / (w - center).norm(), atol=1e-6)
    inside = center + 0.01
    assert torch.equal(project_ball(inside, center, 0.5), inside)      # points inside the ball do not move


def test_k_shot_split_uses_k_labels_per_class_and_tests_on_the_rest():
    labels = torch.arange(4).repeat_interleave(6)
    train, val, test = k_shot_split(labels, 2, seed=0)
    assert torch.bincount(labels[train]).tolist() == [2, 2, 2, 2] and len(val) == 0   # no extra validation shots
    assert len(test) == 16 and len(set(train.tolist()) | set(test.tolist())) == 24


def test_cv_folds_split_the_k_shots_only():
    labels = torch.arange(3).repeat_interleave(4)                   # 4 shots of 3 classes
    folds = cv_folds(labels, 4, seed=1, max_folds=5)
    assert len(folds) == 4
    held = torch.cat([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(12))                 # every shot held out exactly once
    for fit, h in folds:
        assert torch.bincount(labels[h], minlength=3).tolist() == [1, 1, 1]   # stratified
        assert set(fit.tolist()) == set(range(12)) - set(h.tolist())
    one = cv_folds(torch.arange(7), 1, seed=0, max_folds=5)         # k = 1: folds over classes
    assert len(one) == 5 and sorted(torch.cat([h for _, h in one]).tolist()) == list(range(7))


def test_radii_are_chosen_by_cross_validation_within_the_k_shots_and_refit_on_all_of_them():
    # reference written from the protocol: k shots per class; for every grid point the pooled held-out
    # accuracy over the folds; the best one refit on all k shots; tested on every other image. The model's
    # logit scale is used throughout (here 37, not the old fixed 20).
    feats, labels, prompts = toy(n_classes=4, dim=16, per_class=8)
    cfg = ProbeConfig(steps=20, scale=37.0, weight_radii=(0.05, 0.4, 1.6), bias_radii=(0.0, 1.0), weight_decays=(0.0, 0.1))
    rows = few_shot_comparison(feats, labels, prompts, ks=(2,), seeds=1, cfg=cfg)
    tr, _, te = k_shot_split(labels, 2, 0)
    scores = []
    for r_w in cfg.weight_radii:
        for r_b in cfg.bias_radii:
            correct = 0
            for fit, held in cv_folds(labels[tr], 2, 0, cfg.max_folds):
                w, b = train_probe(feats[tr][fit], labels[tr][fit], prompts, cfg, r_w * 2.0, r_b * 2.0)  # sqrt(4 classes)
                z = 37.0 * feats[tr][held] @ w.T + b
                correct += int((z.argmax(1) == labels[tr][held]).sum())
            scores.append(correct)
    best = scores.index(max(scores))
    r_w, r_b = cfg.weight_radii[best // 2], cfg.bias_radii[best % 2]
    assert rows[0]["pgd_radii"] == [[r_w, r_b]] and rows[0]["labels_per_class"] == 2 and rows[0]["logit_scale"] == 37.0
    w, b = train_probe(feats[tr], labels[tr], prompts, cfg, r_w * 2.0, r_b * 2.0)
    assert abs(rows[0]["pgd"] - round(accuracy(feats[te], labels[te], w, b, 37.0), 2)) < 1e-6


def test_zero_shot_classifier_is_the_prompt_ensemble():
    # CLIP's ensembling: mean of the normalised prompt embeddings per class, re-normalised
    table = {}

    def embed(prompts):
        return torch.stack([table.setdefault(p, torch.randn(8)) for p in prompts])
    w = ensemble_prompts(embed, ["cat", "dog"])
    assert len(PROMPT_TEMPLATES) >= 5 and "a photo of a {}." in PROMPT_TEMPLATES
    for c, name in enumerate(["cat", "dog"]):
        mean = torch.stack([F.normalize(table[t.format(name)], dim=0) for t in PROMPT_TEMPLATES]).mean(0)
        assert torch.allclose(w[c], F.normalize(mean, dim=0), atol=1e-6)


def test_grid_search_picks_the_best_held_out_score_and_batched_probes_equal_single_ones():
    assert grid_search(torch.tensor([10.0, 30.0, 20.0, 30.0])) == 1            # best; the first one on ties
    feats, labels, prompts = toy(n_classes=4, dim=8, per_class=3)
    cfg = ProbeConfig(steps=10)
    w, b = train_probe(feats, labels, prompts, cfg, torch.tensor([0.2, 1.0]), torch.tensor([0.0, 0.5]))
    for i, (r_w, r_b) in enumerate(((0.2, 0.0), (1.0, 0.5))):
        w_one, b_one = train_probe(feats, labels, prompts, cfg, r_w, r_b)
        assert torch.allclose(w[i], w_one, atol=1e-6) and torch.allclose(b[i], b_one, atol=1e-6)


def test_probe_reports_zero_shot_pgd_unconstrained_and_scratch_on_the_same_shots():
    feats, labels, prompts = toy()
    rows = few_shot_comparison(feats, labels, prompts, ks=(1, 8), seeds=5)
    one, eight = rows
    assert {"zero_shot", "pgd", "unconstrained", "scratch", "pgd_radii", "scratch_weight_decay"} <= set(one)
    assert 30 < one["zero_shot"] < 50, one                 # the prompts carry real but partial information
    assert one["pgd"] >= one["zero_shot"] - 1, one         # the ball keeps one shot from undoing the prompts
    assert one["pgd"] > one["scratch"] + 8, one            # one shot from scratch overfits badly
    assert eight["pgd"] > eight["zero_shot"], eight        # with more shots the search widens the ball
    cfg = ProbeConfig()
    assert all(r in [[a, b] for a in cfg.weight_radii for b in cfg.bias_radii] for r in one["pgd_radii"])
