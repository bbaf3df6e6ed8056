"""Numerics of the training objectives (model_training/losses.py)."""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from model_training.losses import (ConceptDistillation, LossConfig, MomentumQueueContrastive, build_objective, dcl,
                                   hn_nce, info_nce)
from model_training.models import build_model


def _pair(n=8, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(n, d, generator=g, dtype=dtype), dim=-1)   # correlated pairs
    return img, txt


def test_hn_nce_special_cases():
    img, txt = _pair()
    scale = torch.tensor(14.0)
    assert torch.allclose(hn_nce(img, txt, scale, alpha=1.0, beta=0.0), info_nce(img, txt, scale), atol=1e-5)
    assert torch.allclose(hn_nce(img, txt, scale, alpha=0.0, beta=0.0), dcl(img, txt, scale), atol=1e-5)
    # DCL drops the positive from the denominator, so it is strictly below InfoNCE
    assert dcl(img, txt, scale) < info_nce(img, txt, scale)


def test_hn_nce_upweights_hard_negatives():
    # weights w_ij grow with s_ij and average 1, so sum_j w_ij e^{s_ij} >= sum_j e^{s_ij} (Chebyshev's sum
    # inequality): any beta > 0 can only raise the loss, and it rises with beta
    img, txt = _pair(n=16)
    scale = torch.tensor(10.0)
    values = [float(hn_nce(img, txt, scale, 1.0, b)) for b in (0.0, 0.25, 0.5, 1.0)]
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_info_nce_is_twice_open_clip_cliploss():
    # open_clip's ClipLoss returns the MEAN of the two directions; info_nce the SUM: factor 2
    img, txt = _pair(n=12)
    scale = torch.tensor(1 / 0.07)
    ref = ClipLoss()(img, txt, scale)
    assert torch.allclose(info_nce(img, txt, scale), 2 * ref, atol=1e-5)


@pytest.mark.parametrize("fn", [
    lambda i, t, s: info_nce(i, t, s),
    lambda i, t, s: dcl(i, t, s),
    lambda i, t, s: hn_nce(i, t, s, alpha=0.7, beta=0.5),
])
def test_gradcheck_float64(fn):
    img, txt = _pair(n=5, d=6, dtype=torch.float64)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (img, txt, scale), eps=1e-6, atol=1e-5)


def test_losses_reject_single_pair():
    img, txt = _pair(n=1)
    with pytest.raises(ValueError, match="N >= 2"):
        info_nce(img, txt, 10.0)


def test_concept_soft_ce_matches_dense_cross_entropy():
    head = ConceptDistillation(embed_dim=8, n_objects=10, n_attributes=6)
    emb = F.normalize(torch.randn(3, 8), dim=-1)
    idx = torch.tensor([[2, 7, -1], [0, 1, 9], [4, -1, -1]])
    probs = torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    mask = torch.tensor([1.0, 0.0, 1.0])       # second sample unlabelled: must not count
    logits = head.object_head(emb)
    dense = torch.zeros(3, 10)
    for i in range(3):
        for j in range(3):
            if idx[i, j] >= 0:
                dense[i, idx[i, j]] = probs[i, j]
    per_sample = -(dense * logits.log_softmax(-1)).sum(-1)
    expected = (per_sample[0] + per_sample[2]) / 2
    assert torch.allclose(head.soft_ce(logits, idx, probs, mask), expected, atol=1e-6)


def test_momentum_queue_is_independent_of_batch_and_ema_moves():
    torch.manual_seed(0)
    model = build_model("catclip-micro")
    mq = MomentumQueueContrastive(model, model.embed_dim, queue_size=10, momentum=0.9, temperature=0.05)
    images, texts = torch.randn(4, 3, 48, 48), torch.randint(1, 1000, (4, 24))
    texts[:, -1] = 49407
    for step in range(3):   # 3 batches of 4 into a queue of 10: wraps around
        out = {"images": images, "texts": texts, "image_emb": model.encode_image(images),
               "text_emb": model.encode_text(texts)}
        loss = mq(out)["momentum_dcl"]
        assert torch.isfinite(loss)
        if step == 0:   # empty queue: only in-batch momentum keys serve as negatives
            loss.backward()
            assert model.clip.visual.conv1.weight.grad is not None
    assert int(mq.queue_filled) == 10 and int(mq.queue_ptr) == 12 % 10
    assert torch.allclose(mq.image_queue.norm(dim=1), torch.ones(10), atol=1e-5)
    # EMA: after an update the momentum weights move (1 - m) of the way to the online weights
    p_online = model.clip.text_projection
    with torch.no_grad():
        p_online.add_(1.0)
    before = mq.ema.clip.text_projection.clone()
    mq.momentum_update(model)
    assert torch.allclose(mq.ema.clip.text_projection, before + 0.1 * (p_online - before), atol=1e-6)
    assert not any(p.requires_grad for p in mq.ema.parameters())


@pytest.mark.parametrize("kind", ["dcl", "infonce"])
def test_queue_term_matches_the_definition_per_query(kind):
    # ConLIP: query q_i (online), positive k_i (momentum key of the same pair), negatives: the other keys of
    # the batch and every queued key; DCL leaves e^{pos} out of the denominator, InfoNCE keeps it in.
    torch.manual_seed(0)
    model = build_model("catclip-micro")
    mq = MomentumQueueContrastive(model, model.embed_dim, queue_size=6, momentum=0.9, temperature=0.05, kind=kind)
    images, texts = torch.randn(4, 3, 48, 48), torch.randint(1, 1000, (4, 24))
    texts[:, -1] = 49407
    with torch.no_grad():
        for p in model.parameters():   # online != momentum encoder, so queries and keys differ
            p.add_(0.02 * torch.randn(p.shape))
    mq.eval()    # no enqueue: fill the queue by hand with unit vectors
    mq.image_queue.copy_(F.normalize(torch.randn(6, model.embed_dim), dim=-1))
    mq.text_queue.copy_(F.normalize(torch.randn(6, model.embed_dim), dim=-1))
    mq.queue_filled.fill_(5)           # the sixth slot is unfilled: it must not act as a negative
    out = {"images": images, "texts": texts, "image_emb": model.encode_image(images), "text_emb": model.encode_text(texts)}
    value = mq(out)[f"momentum_{kind}"]
    with torch.no_grad():
        keys = {"image": mq.ema.encode_image(images), "text": mq.ema.encode_text(texts)}
        expected = 0.0
        for query_side, key_side in (("image", "text"), ("text", "image")):
            queries, queue = out[f"{query_side}_emb"], getattr(mq, f"{key_side}_queue")[:5]
            per_query = []
            for i in range(4):
                pos = math.exp(float(queries[i] @ keys[key_side][i]) / 0.05)
                neg = sum(math.exp(float(queries[i] @ keys[key_side][j]) / 0.05) for j in range(4) if j != i)
                neg += sum(math.exp(float(queries[i] @ q) / 0.05) for q in queue)
                per_query.append(-math.log(pos / ((pos if kind == "infonce" else 0.0) + neg)))
            expected += sum(per_query) / 4
    assert math.isclose(float(value.detach()), expected, rel_tol=1e-4)


def test_conlip_presets_use_the_papers_queue_and_both_queue_losses_build():
    from model_training.presets import CONLIP_QUEUE_TO_BATCH, load_preset
    for name in ("cl", "conlip", "conlip-vanilla"):
        loss = load_preset(name)["loss"]
        assert loss["queue_size"] == 12288 == CONLIP_QUEUE_TO_BATCH * 4096 and loss["queue_loss"] == "dcl"
    model = build_model("catclip-micro")
    assert build_objective(LossConfig(contrastive="none", momentum_weight=1.0, queue_loss="infonce"),
                           model).parts["momentum"].kind == "infonce"
    with pytest.raises(ValueError, match="queue_loss"):
        build_objective(LossConfig(contrastive="none", momentum_weight=1.0, queue_loss="nce"), model)


def test_objective_composes_weighted_terms():
    model = build_model("catclip-micro")
    obj = build_objective(LossConfig(contrastive="hn_nce", contrastive_weight=0.5, concept_weight=2.0),
                          model, n_objects=5, n_attributes=4)
    img, txt = _pair(n=4, d=model.embed_dim)
    concepts = {"has_labels": torch.tensor([True, True, False, True]),
                "object_indices": torch.tensor([[0, 1]] * 4), "object_probs": torch.tensor([[0.6, 0.4]] * 4),
                "attribute_indices": torch.tensor([[3, -1]] * 4), "attribute_probs": torch.tensor([[1.0, 0.0]] * 4)}
    terms = obj({"image_emb": img, "text_emb": txt, "logit_scale": torch.tensor(10.0), "image_emb_local": img,
                 "concepts": concepts})
    assert set(terms) == {"hn_nce", "concept_objects", "concept_attributes", "loss"}
    expected = 0.5 * terms["hn_nce"] + 2.0 * (terms["concept_objects"] + terms["concept_attributes"])
    assert math.isclose(float(terms["loss"].detach()), float(expected.detach()), rel_tol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        build_objective(LossConfig(concept_weight=1.0), model)
