"""DiHT's PGD few-shot probe (model_training/probe.py) on a toy feature set with known structure.

Toy set: 10 classes, 64-d. Class centres are random unit vectors; each class's "prompt embedding"
is its centre plus noise (so zero-shot is imperfect, ~39 % top-1) and image features are the
centre plus stronger noise (so a single shot is a poor class estimate). Measured (5 seeds,
radius 0.3, 100 Adam steps): k=1 zero-shot 38.6 %, PGD 40.4 %, scratch 25.0 %;
k=16 zero-shot 38.0 %, PGD 53.6 %, scratch 61.1 % (the ball limits PGD once shots are plentiful).
"""
import torch
import torch.nn.functional as F

from model_training.probe import few_shot_comparison, k_shot_split, project_rows


def toy(seed=0, n_classes=10, dim=64, per_class=30, text_noise=2.0, image_noise=3.0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    prompts = F.normalize(centres + text_noise * torch.randn(n_classes, dim, generator=g) / dim ** 0.5, dim=-1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    feats = F.normalize(centres[labels] + image_noise * torch.randn(len(labels), dim, generator=g) / dim ** 0.5, dim=-1)
    return feats, labels, prompts


def test_projection_keeps_rows_within_the_radius():
    center = torch.randn(5, 8)
    w = center + torch.randn(5, 8) * 3
    p = project_rows(w, center, 0.5)
    assert torch.allclose((p - center).norm(dim=1), torch.full((5,), 0.5), atol=1e-5)
    inside = center + 0.01
    assert torch.equal(project_rows(inside, center, 0.5), inside)      # points inside the ball do not move


def test_k_shot_split_draws_k_per_class_and_tests_on_the_rest():
    labels = torch.arange(4).repeat_interleave(6)
    train, test = k_shot_split(labels, 2, seed=0)
    assert torch.bincount(labels[train]).tolist() == [2, 2, 2, 2] and len(test) == 16
    assert not set(train.tolist()) & set(test.tolist())


def test_pgd_probe_at_one_shot_beats_scratch_and_matches_or_beats_zero_shot():
    feats, labels, prompts = toy()
    (row,) = few_shot_comparison(feats, labels, prompts, ks=(1,), seeds=5)
    assert 30 < row["zero_shot"] < 50, row                # the prompts carry real but partial information
    assert row["pgd"] >= row["zero_shot"], row
    assert row["pgd"] > row["scratch"] + 8, row           # one shot from scratch overfits badly
