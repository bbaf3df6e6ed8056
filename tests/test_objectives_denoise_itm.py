"""Denoising objectives, representation targets and ITM (model_training/denoise.py, itm.py)."""
import pytest
import torch

from model_training.heads import CorpusWords, patchify, text_valid, word_positions
from model_training.models import get_tokenizer
from model_training.itm import sample_hard_negatives
from model_training.losses import LossConfig
from tests.test_objectives_masked import CAPTIONS, grad_groups, make, record_encoder_calls


def test_corpus_words_counts_whole_words_of_the_corpus():
    # reference: the corpus's words by whitespace, each one's BPE tokens, counted
    tok = get_tokenizer("catclip-micro")
    corpus = ["a cat chases a bird", "a tabby cat", "bird, bird!"]
    words = CorpusWords(tok, corpus)
    expected = {}
    for caption in corpus:
        for w in caption.replace(",", " ").replace("!", " ").split():
            key = tuple(tok.encode(w))
            expected[key] = expected.get(key, 0) + 1
    assert words.counts == expected                                       # punctuation is not a word
    assert tuple(tok.encode("a")) in words.words[1] and words.counts[tuple(tok.encode("a"))] == 3


def test_text_noise_replaces_whole_words_with_corpus_words_by_frequency():
    model, trainee, images, texts = make(LossConfig(contrastive="none", text_denoise_weight=1.0))
    calls = record_encoder_calls(model)
    seen = {}
    part = trainee.objective.parts["text_denoise"]
    part.detect.register_forward_hook(lambda mod, args, out: seen.update(detect=out))
    terms = trainee(images, texts)
    assert len(calls["text"]) == 2                                         # complete + noisy caption pass
    corruptor = trainee.objective.shared["corruptor"]
    corpus, tok = corruptor.words, get_tokenizer("catclip-micro")
    words, total_replaced = word_positions(texts), 0
    for seed in range(5):
        torch.manual_seed(seed)
        noisy_ids, replaced = corruptor.replace_words(texts)
        assert not bool(((noisy_ids != texts) & ~words).any())             # SOT / EOT / padding untouched
        assert not bool(((noisy_ids != texts) & ~replaced).any())          # every change is marked
        for b in range(len(texts)):
            caption = [int(i) for i in texts[b][words[b]]]
            spans = corpus._spans_of(caption)                              # the caption's words (reference below)
            assert [tuple(caption[s:e]) for s, e in spans] == [tuple(tok.encode(w)) for w in CAPTIONS[b].split()]
            offset = int(words[b].nonzero()[0])
            n_replaced = 0
            for s, e in spans:
                marked = replaced[b, offset + s:offset + e]
                assert bool(marked.all()) or not bool(marked.any())        # whole words only
                if bool(marked.any()):
                    n_replaced += 1
                    new = tuple(int(i) for i in noisy_ids[b, offset + s:offset + e])
                    assert new in corpus.counts and new != tuple(caption[s:e])   # a different corpus word, same length
            assert n_replaced <= max(1, round(0.15 * len(spans)))           # k chosen; a draw equal to the word is no change
            total_replaced += n_replaced
    assert total_replaced >= 10                                            # 5 draws x 4 captions, ~1-2 words each
    # a replacement is drawn by corpus frequency among words of the same token count
    torch.manual_seed(0)
    draws = [corpus.draw(1) for _ in range(3000)]
    total = float(corpus.weights[1].sum())
    for word, count in zip(corpus.words[1], corpus.weights[1].tolist()):
        assert abs(draws.count(word) / 3000 - count / total) < 0.03
    assert seen["detect"].shape == (int(words.sum()), 1)                   # one detection logit per caption token
    assert set(terms) == {"text_denoise_detect", "text_denoise_restore", "loss"}
    terms["loss"].backward()
    assert grad_groups(trainee) == {"image_encoder", "text_encoder", "text_denoise"}


def _perturb(module, seed=5, size=0.05):
    """Move the online weights away from their EMA copies, so a target taken from the online model
    instead of the EMA one would give a different number."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(size * torch.randn(p.shape, generator=g))


def _capture_noise(trainee):
    corruptor, seen = trainee.objective.shared["corruptor"], {}
    original = corruptor.add_noise

    def add_noise(images):
        seen["noisy"], seen["noise"] = original(images)
        return seen["noisy"], seen["noise"]
    corruptor.add_noise = add_noise
    return seen


def test_image_denoising_matches_the_definition_per_sample():
    # the proposal: a light linear head decodes patch states (attending to the CLEAN text) to pixels.
    # anchor: the CLEAN image's reconstruction vs the clean patches (L1); denoising: the NOISY image's
    # reconstruction vs the EMA model's reconstruction from (clean image, clean text) (L1).
    # Reference: one sample at a time.
    model, trainee, images, texts = make(LossConfig(contrastive="none", image_denoise_weight=1.0))
    part, ema = trainee.objective.parts["image_denoise"], trainee.objective.shared["ema"].model
    assert part.decoder.out_features == 8 * 8 * 3                          # patch x patch x 3 pixels
    _perturb(model)
    _perturb(part.head, seed=6)
    _perturb(part.decoder, seed=7)
    seen = _capture_noise(trainee)
    terms = trainee(images, texts)
    assert set(terms) == {"image_denoise", "image_denoise_anchor", "stat_image_denoise_target_std", "loss"}

    def reconstruct(enc, head, decoder, image, text):
        _, patches = enc.encode_image(image[None], return_tokens=True)
        text_emb, text_tokens = enc.encode_text(text[None], return_tokens=True)
        valid = text_valid(text[None])
        hidden, _ = head(patches, torch.ones(patches.shape[:2], dtype=torch.bool), text_emb, text_tokens, valid)
        return decoder(hidden)[0]

    def reference(target_encoder, target_head, target_decoder):
        total, anchor = 0.0, 0.0
        for i in range(len(images)):
            pred = reconstruct(model, part.head, part.decoder, seen["noisy"][i], texts[i])   # online, noisy image
            target = reconstruct(target_encoder, target_head, target_decoder, images[i], texts[i])
            total = total + (pred - target).abs().mean()
            clean = reconstruct(model, part.head, part.decoder, images[i], texts[i])       # online, clean image
            pixels = images[i].reshape(3, 6, 8, 6, 8).permute(1, 3, 2, 4, 0).reshape(36, 192)   # patch (r, c): rows, cols, rgb
            anchor = anchor + (clean - pixels).abs().mean()
        return total / len(images), anchor / len(images)

    with torch.no_grad():
        expected, expected_anchor = reference(ema, part.ema_head, part.ema_decoder)
        from_online, _ = reference(model, part.head, part.decoder)
    assert torch.allclose(terms["image_denoise"], expected, atol=1e-5)
    assert torch.allclose(terms["image_denoise_anchor"], expected_anchor, atol=1e-5)
    assert not torch.allclose(terms["image_denoise"], from_online, atol=1e-3)   # the target is the EMA model's
    assert torch.allclose(terms["loss"], expected + expected_anchor, atol=1e-5)
    terms["loss"].backward()
    # the text encoder is in the graph (the head reads the clean text); no gradient into any EMA copy
    assert grad_groups(trainee) == {"image_encoder", "text_encoder", "image_denoise"}
    assert all(p.grad is None for p in list(part.ema_head.parameters()) + list(ema.parameters()))
    # after the step the EMA head and the EMA encoder move towards the online ones
    before = part.ema_head.ln_out.weight.clone()
    trainee.objective.after_step(model)
    m = part.momentum
    assert torch.allclose(part.ema_head.ln_out.weight, m * before + (1 - m) * part.head.ln_out.weight, atol=1e-6)


def test_a_zero_decoder_is_not_a_fixed_point_of_image_denoising():
    # pure self-distillation had one: online and EMA decoders at zero -> zero loss, zero gradient.
    # The pixel anchor makes the clean patches the goal, so the loss and the decoder's gradient are not zero.
    model, trainee, images, texts = make(LossConfig(contrastive="none", image_denoise_weight=1.0))
    part = trainee.objective.parts["image_denoise"]
    with torch.no_grad():
        for dec in (part.decoder, part.ema_decoder):
            dec.weight.zero_()
            dec.bias.zero_()
    terms = trainee(images, texts)
    assert float(terms["image_denoise"]) == 0.0                            # the EMA term alone would be stuck here
    assert torch.allclose(terms["image_denoise_anchor"], images.abs().mean(), atol=1e-6)   # L1 of 0 vs the pixels
    terms["loss"].backward()
    assert float(part.decoder.weight.grad.abs().sum()) > 0 and float(part.decoder.bias.grad.abs().sum()) > 0


@pytest.mark.parametrize("target", ["clean", "noise"])
def test_unimodal_pixel_denoising_variant_is_named_as_such(target):
    model, trainee, images, texts = make(LossConfig(contrastive="none", image_denoise_weight=1.0,
                                                    image_denoise_target=target, image_noise_std=0.5))
    calls = record_encoder_calls(model)
    part = trainee.objective.parts["image_denoise"]
    assert "ema" not in trainee.objective.shared                           # no EMA model for this variant
    seen = _capture_noise(trainee)
    part.decoder.register_forward_hook(lambda mod, args, out: seen.update(pred=out))
    terms = trainee(images, texts)
    name = f"image_denoise_unimodal_{target}"
    assert set(terms) == {name, "loss"}
    assert len(calls["image"]) == 2                                        # complete + noisy image pass
    pred = seen["pred"]
    assert pred.shape == (4, 36, 192)
    goal = patchify(images, 8) if target == "clean" else patchify(seen["noise"], 8)
    expected = (pred - goal).abs().mean() if target == "clean" else (pred - goal).pow(2).mean()
    assert torch.allclose(terms[name], expected, atol=1e-6)
    assert abs(float(seen["noise"].std()) - 0.5) < 0.03 and abs(float(seen["noise"].mean())) < 0.03
    terms["loss"].backward()
    assert grad_groups(trainee) == {"image_encoder", "image_denoise"}     # the text encoder is not involved


@pytest.mark.parametrize("corruption", ["noise", "mask"])
def test_representation_target_gets_no_gradient_and_follows_the_ema(corruption):
    loss = LossConfig(contrastive="none", repr_weight=1.0, repr_corruption=corruption, repr_momentum=0.9)
    model, trainee, images, texts = make(loss)
    part, ema = trainee.objective.parts["representation"], trainee.objective.shared["ema"]
    assert not any(p.requires_grad for p in list(part.parameters()) + list(ema.parameters()))
    terms = trainee(images, texts)
    value = terms[f"repr_{corruption}"]
    assert float(value.detach()) > 0
    value.backward()
    assert all(p.grad is None for p in list(part.parameters()) + list(ema.parameters()))
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
    pairs = [(ema.model, model), (part.ema_fusion, trainee.objective.shared["fusion"])]
    before = [[p.clone() for p in e.parameters()] for e, _ in pairs]
    trainee.objective.after_step(model)
    for old, (e, online) in zip(before, pairs):
        for b, p_ema, p in zip(old, e.parameters(), online.parameters()):
            assert torch.allclose(p_ema, 0.9 * b + 0.1 * p, atol=1e-6)


@pytest.mark.parametrize("target", ["tokens", "pooled_cosine"])
def test_representation_denoising_regresses_the_ema_targets_multimodal_tokens(target):
    # MAMO: the fusion module's token representations of (noisy image, clean text) and (clean image, noisy
    # text) are regressed onto the EMA encoder + EMA fusion's tokens for (clean image, clean text) with plain
    # L2 (squared error per coordinate, averaged over the joint token and the valid text positions).
    # "pooled_cosine" is the named option: 2 - 2 cos of the joint embeddings. Reference: per sample and position.
    loss = LossConfig(contrastive="none", repr_weight=1.0, repr_corruption="noise", repr_target=target)
    model, trainee, images, texts = make(loss)
    part, ema, fusion = (trainee.objective.parts["representation"], trainee.objective.shared["ema"].model,
                         trainee.objective.shared["fusion"])
    _perturb(model)
    _perturb(fusion, seed=3)
    corruptor, seen = trainee.objective.shared["corruptor"], {}
    noise_fn, words_fn = corruptor.add_noise, corruptor.replace_words
    corruptor.add_noise = lambda x: seen.setdefault("noise", noise_fn(x))
    corruptor.replace_words = lambda ids: seen.setdefault("words", words_fn(ids))
    terms = trainee(images, texts)
    name = "repr_noise" if target == "tokens" else "repr_noise_pooled_cosine"
    assert set(terms) == {name, "loss"}

    def tokens(enc, fuse, image, text, valid_text):
        img_emb, img_tok = enc.encode_image(image[None], return_tokens=True)
        _, txt_tok = enc.encode_text(text[None], return_tokens=True)
        return fuse(img_emb, img_tok, txt_tok, text_valid(valid_text[None]), return_tokens=True)[0]

    noisy_images, noisy_texts = seen["noise"][0], seen["words"][0]
    expected = 0.0
    with torch.no_grad():
        for corrupted in ("image", "text"):
            errors, cosine_terms = [], []                # per (sample, valid position): mean squared error
            for i in range(len(images)):
                goal = tokens(ema, part.ema_fusion, images[i], texts[i], texts[i])
                pred = (tokens(model, fusion, noisy_images[i], texts[i], texts[i]) if corrupted == "image"
                        else tokens(model, fusion, images[i], noisy_texts[i], texts[i]))
                n_valid = 1 + int(text_valid(texts[i][None]).sum())     # joint token + SOT..EOT
                errors += [float(((pred[t] - goal[t]) ** 2).mean()) for t in range(n_valid)]
                cosine_terms.append(2 - 2 * float(torch.nn.functional.cosine_similarity(pred[0], goal[0], dim=0)))
            expected += (sum(errors) / len(errors) if target == "tokens"
                         else sum(cosine_terms) / len(cosine_terms))
    assert abs(float(terms[name]) - expected) < 1e-4


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


def test_itm_is_binary_with_b_positives_and_2b_hard_negatives():
    # ALBEF / MAMO: label 1 for the B matched pairs, 0 for the B (image, hard negative text) and the B
    # (hard negative image, text) pairs; CE on a 2-way head. Reference: a loop over the pairs.
    model, trainee, images, texts = make(LossConfig(contrastive="none", itm_weight=1.0, fusion_layers=2))
    fusion, itm = trainee.objective.shared["fusion"], trainee.objective.parts["itm"]
    seen = {}
    fusion.register_forward_hook(lambda mod, args, out: seen.update(io=(args, out)))
    terms = trainee(images, texts)
    (img_emb, img_tok, txt_tok, txt_valid), joint = seen["io"]
    b = 4
    assert img_emb.shape[0] == txt_tok.shape[0] == 3 * b and joint.shape == (3 * b, 64)
    assert itm.classifier.out_features == 2
    # which negatives were drawn: identify them by their tokens among the complete pass's
    full_img, full_txt = img_tok[:b], txt_tok[:b]
    neg_image = [next(j for j in range(b) if torch.equal(img_tok[b + i], full_img[j])) for i in range(b)]
    neg_text = [next(j for j in range(b) if torch.equal(txt_tok[2 * b + i], full_txt[j])) for i in range(b)]
    assert all(neg_image[i] != i and neg_text[i] != i for i in range(b))        # never the positive
    assert torch.equal(txt_tok[b:2 * b], full_txt) and torch.equal(img_tok[2 * b:], full_img)
    pairs = ([(i, i, 1) for i in range(b)] + [(neg_image[i], i, 0) for i in range(b)]
             + [(i, neg_text[i], 0) for i in range(b)])                           # (image, text, matched?)
    total, correct = 0.0, 0
    with torch.no_grad():
        for image, text, label in pairs:
            one = fusion(img_emb[image][None], full_img[image][None], full_txt[text][None], txt_valid[text][None])
            log_p = itm.classifier(one)[0].log_softmax(-1)
            total -= float(log_p[label])
            correct += int(log_p.argmax()) == label
    assert abs(float(terms["itm"].detach()) - total / (3 * b)) < 1e-5
    assert abs(float(terms["stat_itm_accuracy"]) - correct / (3 * b)) < 1e-6
    terms["itm"].backward()
    assert grad_groups(trainee) == {"image_encoder", "text_encoder", "fusion", "itm"}
