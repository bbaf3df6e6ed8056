"""Denoising objectives, representation targets and ITM (model_training/denoise.py, itm.py)."""
import pytest
import torch

from model_training.heads import patchify, word_positions
from model_training.itm import sample_hard_negatives
from model_training.losses import LossConfig
from tests.test_objectives_masked import grad_groups, make, record_encoder_calls


def test_text_noise_replaces_the_ratio_with_corpus_tokens_and_detection_targets_are_exact():
    model, trainee, images, texts = make(LossConfig(contrastive="none", text_denoise_weight=1.0))
    calls = record_encoder_calls(model)
    seen = {}
    part = trainee.objective.parts["text_denoise"]
    part.detect.register_forward_hook(lambda mod, args, out: seen.update(detect=out))
    terms = trainee(images, texts)
    assert len(calls["text"]) == 2                                         # complete + noisy caption pass
    words = word_positions(texts)
    corruptor = trainee.objective.shared["corruptor"]
    torch.manual_seed(1)
    noisy_ids, replaced = corruptor.replace_tokens(texts)
    changed = noisy_ids != texts
    assert torch.equal(changed, replaced)                                  # the target is exactly "token changed"
    assert not bool((changed & ~words).any())                              # SOT / EOT / padding untouched
    assert (replaced.sum(1) <= torch.clamp((0.15 * words.sum(1)).round(), min=1)).all()
    assert set(noisy_ids[replaced].tolist()) <= set(texts[words].tolist())  # replacements are corpus tokens
    assert seen["detect"].shape == (int(words.sum()), 1)                   # one detection logit per caption token
    assert set(terms) == {"text_denoise_detect", "text_denoise_restore", "loss"}
    terms["loss"].backward()
    assert grad_groups(trainee) == {"image_encoder", "text_encoder", "text_denoise"}


@pytest.mark.parametrize("target", ["clean", "noise"])
def test_image_denoising_targets_and_noise_level(target):
    model, trainee, images, texts = make(LossConfig(contrastive="none", image_denoise_weight=1.0,
                                                    image_denoise_target=target, image_noise_std=0.5))
    calls = record_encoder_calls(model)
    part = trainee.objective.parts["image_denoise"]
    seen = {}
    part.pixels.register_forward_hook(lambda mod, args, out: seen.update(pred=out))
    terms = trainee(images, texts)
    assert len(calls["image"]) == 2                                        # complete + noisy image pass
    pred = seen["pred"]
    assert pred.shape == (4, 36, 192)
    if target == "clean":
        assert torch.allclose(terms["image_denoise"], (pred - patchify(images, 8)).abs().mean(), atol=1e-6)
    torch.manual_seed(3)
    _, noise = trainee.objective.shared["corruptor"].add_noise(images)
    assert abs(float(noise.std()) - 0.5) < 0.02 and abs(float(noise.mean())) < 0.02
    terms["loss"].backward()
    assert grad_groups(trainee) == {"image_encoder", "image_denoise"}     # the text encoder is not involved


@pytest.mark.parametrize("corruption", ["noise", "mask"])
def test_representation_target_gets_no_gradient_and_follows_the_ema(corruption):
    loss = LossConfig(contrastive="none", repr_weight=1.0, repr_corruption=corruption, repr_momentum=0.9)
    model, trainee, images, texts = make(loss)
    part = trainee.objective.parts["representation"]
    assert not any(p.requires_grad for p in part.parameters())
    terms = trainee(images, texts)
    value = terms[f"repr_{corruption}"]
    assert 0 < float(value) < 8.0                                # two squared distances of unit vectors: [0, 8]
    assert not part.target(images, texts).requires_grad
    value.backward()
    assert all(p.grad is None for p in part.parameters())
    groups = grad_groups(trainee)
    assert {"image_encoder", "text_encoder", "fusion"} <= groups and not any("ema" in g for g in groups)
    if corruption == "mask":
        assert {"text_mask_embedding", "image_mask_token"} <= groups
    # EMA: ema <- m * ema + (1 - m) * online, for the encoder and the fusion module
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
        for p in trainee.objective.shared["fusion"].parameters():
            p.add_(0.1)
    pairs = [(part.ema_model, model), (part.ema_fusion, trainee.objective.shared["fusion"])]
    before = [[p.clone() for p in ema.parameters()] for ema, _ in pairs]
    trainee.objective.after_step(model)
    for old, (ema, online) in zip(before, pairs):
        for b, e, p in zip(old, ema.parameters(), online.parameters()):
            assert torch.allclose(e, 0.9 * b + 0.1 * p, atol=1e-6)


def test_hard_negatives_never_pick_the_positive_and_prefer_similar_items():
    torch.manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[:, 2] = 1.0                        # item 2 looks like everyone
    sim[2, 1] = 1.0
    picks = torch.stack([sample_hard_negatives(sim, 20.0) for _ in range(200)])
    assert not bool((picks == torch.arange(4)).any())
    assert float((picks[:, 0] == 2).float().mean()) > 0.95 and float((picks[:, 2] == 1).float().mean()) > 0.95
    with pytest.raises(ValueError):
        sample_hard_negatives(torch.zeros(1, 1), 1.0)


def test_itm_three_way_with_hard_negatives():
    model, trainee, images, texts = make(LossConfig(contrastive="none", itm_weight=1.0, fusion_layers=2))
    seen = {}
    trainee.objective.shared["fusion"].register_forward_hook(lambda mod, args, out: seen.update(io=(args, out)))
    terms = trainee(images, texts)
    (img_emb, img_tok, txt_tok, txt_valid), joint = seen["io"]
    assert img_emb.shape[0] == txt_tok.shape[0] == 12 and joint.shape == (12, 64)   # B positives + B + B negatives
    b = 4
    # block 0: matched pairs; block 1: same texts, other images; block 2: same images, other texts
    assert torch.equal(txt_tok[b:2 * b], txt_tok[:b]) and torch.equal(img_tok[2 * b:], img_tok[:b])
    for i in range(b):
        assert not torch.equal(img_tok[b + i], img_tok[i]) and not torch.equal(txt_tok[2 * b + i], txt_tok[i])
    assert 0.5 < float(terms["itm"]) < 2.5 and 0.0 <= float(terms["stat_itm_accuracy"]) <= 1.0   # ~ln 3 at init
    terms["itm"].backward()
    assert grad_groups(trainee) == {"image_encoder", "text_encoder", "fusion", "itm"}
