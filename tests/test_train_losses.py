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
    assert torch.allclose(hn_nce(img, txt, scale, alpha=0.0, beta=0.0, allow_dcl=True), dcl(img, txt, scale), atol=1e-5)
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


def test_momentum_queue_starts_with_random_unit_keys_wraps_and_ema_moves():
    torch.manual_seed(0)
    model = build_model("catclip-micro")
    mq = MomentumQueueContrastive(model, model.embed_dim, queue_size=10, momentum=0.9, temperature=0.05)
    # MoCo's initialisation: the queue holds random unit keys from the start, so the term is defined at step 0
    assert torch.allclose(mq.image_queue.norm(dim=1), torch.ones(10), atol=1e-5)
    assert float((mq.image_queue @ mq.image_queue.T - torch.eye(10)).abs().max()) < 0.9   # not one repeated key
    images, texts = torch.randn(4, 3, 48, 48), torch.randint(1, 1000, (4, 24))
    texts[:, -1] = 49407
    for step in range(3):   # 3 batches of 4 into a queue of 10: wraps around
        out = {"images": images, "texts": texts, "image_emb": model.encode_image(images),
               "text_emb": model.encode_text(texts)}
        loss = mq(out)["momentum_dcl"]
        assert torch.isfinite(loss)
        if step == 0:
            loss.backward()
            assert model.clip.visual.conv1.weight.grad is not None
    assert int(mq.queue_ptr) == 12 % 10
    with torch.no_grad():   # the last batch's keys sit in slots 8, 9, 0, 1
        keys = mq.ema.encode_image(images)
    assert torch.allclose(mq.image_queue[[8, 9, 0, 1]], keys, atol=1e-5)
    # EMA: after an update the momentum weights move (1 - m) of the way to the online weights
    p_online = model.clip.text_projection
    with torch.no_grad():
        p_online.add_(1.0)
    before = mq.ema.clip.text_projection.clone()
    mq.momentum_update(model)
    assert torch.allclose(mq.ema.clip.text_projection, before + 0.1 * (p_online - before), atol=1e-6)
    assert not any(p.requires_grad for p in mq.ema.parameters())


@pytest.mark.parametrize("kind", ["dcl", "infonce"])
def test_queue_term_matches_conlip_eq_9_to_11_per_query(kind):
    # ConLIP eq. 9-11: query x_i (online), positive k_i (the momentum key of the same pair), negatives: the
    # entries q_j of the other modality's QUEUE only (not the batch's other momentum keys). DCL leaves
    # e^{pos} out of the denominator, InfoNCE keeps it in. Reference: a loop over queries.
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
    out = {"images": images, "texts": texts, "image_emb": model.encode_image(images), "text_emb": model.encode_text(texts)}
    value = mq(out)[f"momentum_{kind}"]
    with torch.no_grad():
        keys = {"image": mq.ema.encode_image(images), "text": mq.ema.encode_text(texts)}
        expected, with_batch = 0.0, 0.0
        for query_side, key_side in (("image", "text"), ("text", "image")):
            queries, queue = out[f"{query_side}_emb"], getattr(mq, f"{key_side}_queue")
            per_query, per_query_batch = [], []
            for i in range(4):
                pos = math.exp(float(queries[i] @ keys[key_side][i]) / 0.05)
                neg = sum(math.exp(float(queries[i] @ q) / 0.05) for q in queue)
                per_query.append(-math.log(pos / ((pos if kind == "infonce" else 0.0) + neg)))
                batch = sum(math.exp(float(queries[i] @ keys[key_side][j]) / 0.05) for j in range(4) if j != i)
                per_query_batch.append(-math.log(pos / ((pos if kind == "infonce" else 0.0) + neg + batch)))
            expected += sum(per_query) / 4
            with_batch += sum(per_query_batch) / 4
    assert math.isclose(float(value.detach()), expected, rel_tol=1e-4)
    assert not math.isclose(float(value.detach()), with_batch, rel_tol=1e-3)   # the old batch+queue negatives


def test_queue_defaults_to_three_global_batches_and_presets_leave_it_to_the_run():
    from model_training.config import TrainConfig, effective_queue_size, with_effective_queue
    from model_training.presets import load_preset
    for name in ("cl", "conlip", "conlip-vanilla"):
        loss = load_preset(name)["loss"]
        assert loss["queue_size"] == 0 and loss["queue_loss"] == "dcl"    # 0 = 3 x the global batch
    # ConLIP: 12,288 = 3 x 4,096 = 3 x (batch per rank x ranks x accumulation steps)
    assert effective_queue_size(TrainConfig(batch_size=256, accum_steps=2), world_size=8) == 12288
    assert effective_queue_size(TrainConfig(batch_size=64), world_size=1) == 192
    explicit = TrainConfig(batch_size=64, loss=LossConfig(queue_size=500))
    assert effective_queue_size(explicit, world_size=4) == 500                # --queue-size wins
    resolved = with_effective_queue(TrainConfig(batch_size=8, accum_steps=3), world_size=2)
    assert resolved.loss.queue_size == 144 and TrainConfig().loss.queue_size == 0
    model = build_model("catclip-micro")
    with pytest.raises(ValueError, match="3 x the global batch"):
        build_objective(LossConfig(contrastive="none", momentum_weight=1.0), model)
    assert build_objective(LossConfig(contrastive="none", momentum_weight=1.0, queue_size=12, queue_loss="infonce"),
                           model).parts["momentum"].kind == "infonce"
    with pytest.raises(ValueError, match="queue_loss"):
        build_objective(LossConfig(contrastive="none", momentum_weight=1.0, queue_size=12, queue_loss="nce"), model)


def test_hn_nce_checks_its_arguments():
    img, txt = _pair()
    for alpha in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            hn_nce(img, txt, 10.0, alpha=alpha, beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        hn_nce(img, txt, 10.0, alpha=1.0, beta=-0.1)
    with pytest.raises(ValueError, match="alpha"):   # at build time, before any training
        build_objective(LossConfig(contrastive="hn_nce", hn_alpha=0.0), build_model("catclip-micro"))
    # DCL asked for by name: alpha = 0 allowed
    assert torch.allclose(hn_nce(img, txt, 10.0, alpha=0.0, beta=0.0, allow_dcl=True), dcl(img, txt, 10.0), atol=1e-5)


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


def test_old_checkpoints_that_no_longer_fit_are_refused_in_one_line_naming_the_change():
    from model_training.losses import OBJECTIVE_FORMAT, check_objective_format
    from model_training.train import Trainee
    model = build_model("catclip-micro")
    trainee = Trainee(model, build_objective(LossConfig(contrastive="none", momentum_weight=1.0, queue_size=8), model))
    old = {k: v for k, v in trainee.state_dict().items()}
    old["objective.parts.momentum.queue_filled"] = torch.tensor(8)        # what format 1 wrote
    with pytest.raises(ValueError) as e:
        check_objective_format("step_0000100.pt", {"trainee": old}, trainee)
    message = str(e.value)
    assert "\n" not in message and "issue #24" in message and "queue_filled" in message and "step_0000100.pt" in message
    check_objective_format("x.pt", {"trainee": trainee.state_dict()}, trainee)   # an old one that still fits loads
    check_objective_format("x.pt", {"trainee": old, "objective_format": OBJECTIVE_FORMAT}, trainee)   # current: not checked here
