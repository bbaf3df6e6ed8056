"""Masked heads (model_training/masked.py, heads.py): masking ratios, shapes, where gradients go,
and - by inspecting the head's actual inputs - that ConMLM/ConMIM see the other modality's CLS from
the COMPLETE pass and its tokens from the MASKED pass, while the vanilla heads see the complete pass."""
import pytest
import torch

from model_training.heads import EOT_ID, SOT_ID, CorpusWords, patchify, sample_exact, word_positions
from model_training.losses import LossConfig, build_objective
from model_training.models import build_model, get_tokenizer
from model_training.train import Trainee

CAPTIONS = ["a black cat is chasing a small brown bird across the green lawn", "two men riding horses on a beach",
            "a plate of food with a fork and a knife on a wooden table", "a red bus parked by the road"]


def make(loss: LossConfig, seed=0):
    torch.manual_seed(seed)
    model = build_model("catclip-micro")
    tok = get_tokenizer("catclip-micro")
    trainee = Trainee(model, build_objective(loss, model, corpus_words=CorpusWords(tok, CAPTIONS)))
    texts = tok(CAPTIONS)
    images = torch.randn(len(CAPTIONS), 3, 48, 48, generator=torch.Generator().manual_seed(seed))
    return model, trainee, images, texts


def grad_groups(trainee) -> set:
    """Names of the parameter groups that received a non-zero gradient."""
    out = set()
    for name, p in trainee.named_parameters():
        if p.grad is None or not bool(p.grad.abs().sum() > 0):
            continue
        if name.startswith("model.clip.visual."):
            out.add("image_encoder")
        elif name == "model.clip.logit_scale":
            out.add("logit_scale")
        elif name.startswith("model.clip."):
            out.add("text_encoder")
        elif name.startswith("objective.shared."):
            out.add(name.split(".")[-1] if "corruptor" in name else name.split(".")[2])
        else:
            out.add(".".join(name.split(".")[2:4]) if ".ema" in name else name.split(".")[2])
    return out


def record_encoder_calls(model):
    """Wrap the model's encoders (instance attributes shadow the methods) to log every pass."""
    calls = {"image": [], "text": []}
    for kind in ("image", "text"):
        original = getattr(model, f"encode_{kind}")

        def wrapped(*args, _orig=original, _kind=kind, **kwargs):
            result = _orig(*args, **kwargs)
            calls[_kind].append((kwargs, result))
            return result
        setattr(model, f"encode_{kind}", wrapped)
    return calls


def test_sample_exact_hits_the_ratio_per_row_and_only_candidates():
    cand = torch.zeros(3, 40, dtype=torch.bool)
    cand[0, :20], cand[1, 5:15], cand[2, :] = True, True, True
    m = sample_exact(cand, 0.5)
    assert m.sum(1).tolist() == [10, 5, 20] and not bool((m & ~cand).any())
    assert sample_exact(cand, 0.15).sum(1).tolist() == [3, 2, 6]          # round(0.15 n), at least 1
    assert sample_exact(torch.zeros(2, 5, dtype=torch.bool), 0.5).sum() == 0


def test_text_and_image_masks_respect_ratios_and_special_tokens():
    model, trainee, images, texts = make(LossConfig(contrastive="none", mlm_weight=1.0, mim_weight=1.0))
    calls = record_encoder_calls(model)
    trainee(images, texts)
    text_mask = next(k["token_mask"] for k, _ in calls["text"] if k.get("token_mask") is not None)
    patch_mask = next(k["patch_mask"] for k, _ in calls["image"] if k.get("patch_mask") is not None)
    words = word_positions(texts)
    assert not bool((text_mask & ~words).any())                  # never SOT, EOT or padding
    assert not bool(text_mask[texts == SOT_ID].any()) and not bool(text_mask[texts == EOT_ID].any())
    assert text_mask.sum(1).tolist() == [max(1, round(0.15 * int(n))) for n in words.sum(1)]
    assert patch_mask.shape == (4, 36) and patch_mask.sum(1).tolist() == [18] * 4    # 50 % of 6x6 patches
    assert len(calls["image"]) == 2 and len(calls["text"]) == 2   # one complete + one masked pass each, cached


@pytest.mark.parametrize("conditioned", [True, False])
def test_mlm_head_inputs_come_from_the_right_passes(conditioned):
    loss = LossConfig(contrastive="none", mlm_weight=1.0, masked_heads="conditioned" if conditioned else "vanilla")
    model, trainee, images, texts = make(loss)
    calls = record_encoder_calls(model)
    seen = {}
    head = trainee.objective.parts["mlm"].head
    head.register_forward_pre_hook(lambda mod, args: seen.update(args=args))
    terms = trainee(images, texts)
    queries, _, cls, kv_tokens = seen["args"][:4]
    (img_kw, (img_emb, img_tok)), *masked_img = calls["image"]
    assert img_kw.get("patch_mask") is None                                  # first call: the complete pass
    masked_txt = [r for k, r in calls["text"] if k.get("token_mask") is not None]
    assert queries is masked_txt[0][1]                                       # queries: masked caption's states
    assert cls is img_emb                                                    # CLS: the COMPLETE image's embedding
    if conditioned:
        (kw, (_, masked_tok)), = masked_img
        assert kv_tokens is masked_tok and kw["patch_mask"].sum() == 4 * 18  # patches: the MASKED image
        assert not torch.allclose(masked_tok, img_tok)
        # recomputing the masked pass with the recorded mask gives exactly the head's key/value tokens
        again = build_model("catclip-micro")
        again.load_state_dict(model.state_dict())
        _, tok = again.encode_image(images, return_tokens=True, patch_mask=kw["patch_mask"],
                                    mask_token=trainee.objective.shared["corruptor"].image_mask_token)
        assert torch.allclose(tok, kv_tokens, atol=1e-6)
    else:
        assert kv_tokens is img_tok and masked_img == []                     # vanilla: complete patches, no masked image pass
    name = "conmlm" if conditioned else "mlm"
    assert terms[name].shape == () and 9.0 < float(terms[name]) < 12.0      # ~ln(49408) = 10.8 at init
    assert 0 < float(terms[f"stat_{name}_attn_cls_mean"]) < 1


@pytest.mark.parametrize("conditioned", [True, False])
def test_mim_head_inputs_come_from_the_right_passes(conditioned):
    loss = LossConfig(contrastive="none", mim_weight=1.0, masked_heads="conditioned" if conditioned else "vanilla")
    model, trainee, images, texts = make(loss)
    calls = record_encoder_calls(model)
    seen = {}
    trainee.objective.parts["mim"].head.register_forward_pre_hook(lambda mod, args: seen.update(args=args))
    trainee(images, texts)
    queries, _, cls, kv_tokens, kv_valid = seen["args"]
    (_, (txt_emb, txt_tok)), *masked_txt = calls["text"]
    (_, (_, masked_patches)), = [c for c in calls["image"] if c[0].get("patch_mask") is not None]
    assert queries is masked_patches and cls is txt_emb
    if conditioned:
        (kw, (_, masked_tok)), = masked_txt
        assert kv_tokens is masked_tok and kw["token_mask"].any()
    else:
        assert kv_tokens is txt_tok and masked_txt == []
    assert kv_valid.sum(1).tolist() == (torch.arange(texts.shape[1]) <= texts.argmax(1)[:, None]).sum(1).tolist()


def test_mim_loss_is_l1_on_masked_patches_only():
    model, trainee, images, texts = make(LossConfig(contrastive="none", mim_weight=1.0, masked_heads="vanilla"))
    mim = trainee.objective.parts["mim"]
    captured = {}
    mim.decoder.register_forward_hook(lambda mod, args, out: captured.update(pred=out))
    calls = record_encoder_calls(model)
    terms = trainee(images, texts)
    patch_mask = next(k["patch_mask"] for k, _ in calls["image"] if k.get("patch_mask") is not None)
    target = patchify(images, 8)
    assert captured["pred"].shape == target.shape == (4, 36, 8 * 8 * 3)
    expected = (captured["pred"] - target).abs().mean(-1)[patch_mask].mean()
    assert torch.allclose(terms["mim"], expected, atol=1e-6)


def test_mim_feature_target_is_l1_to_the_ema_clean_visual_tokens_per_sample():
    # MAMO: the (masked image, clean text) representation predicts the EMA encoder's visual tokens of the
    # CLEAN image at the masked patches, L1. Reference: one image and one masked patch at a time.
    model, trainee, images, texts = make(LossConfig(contrastive="none", mim_weight=1.0, masked_heads="vanilla",
                                                    mim_target="ema_features"))
    mim, ema = trainee.objective.parts["mim"], trainee.objective.shared["ema"].model
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():   # online weights away from the EMA copy: an online target would give another number
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    captured = {}
    mim.decoder.register_forward_hook(lambda mod, args, out: captured.update(pred=out))
    calls = record_encoder_calls(model)
    terms = trainee(images, texts)
    patch_mask = next(k["patch_mask"] for k, _ in calls["image"] if k.get("patch_mask") is not None)
    pred = captured["pred"]
    assert pred.shape == (4, 36, model.clip.visual.transformer.width)

    def reference(encoder):
        errors = []
        for i in range(len(images)):
            _, clean_tokens = encoder.encode_image(images[i][None], return_tokens=True)
            for p in range(patch_mask.shape[1]):
                if patch_mask[i, p]:
                    errors.append((pred[i, p] - clean_tokens[0, p]).abs().mean())
        return sum(errors) / len(errors)

    with torch.no_grad():
        assert torch.allclose(terms["mim"], reference(ema), atol=1e-5)
        assert not torch.allclose(terms["mim"], reference(model), atol=1e-3)
    terms["mim"].backward()
    assert all(p.grad is None for p in ema.parameters())
    assert grad_groups(trainee) == {"image_encoder", "text_encoder", "mim", "image_mask_token"}
    with pytest.raises(ValueError, match="mim_target"):
        build_objective(LossConfig(mim_weight=1.0, mim_target="hog"), model)


@pytest.mark.parametrize("which,conditioned,expected", [
    ("mlm", True, {"image_encoder", "text_encoder", "mlm", "text_mask_embedding", "image_mask_token"}),
    ("mlm", False, {"image_encoder", "text_encoder", "mlm", "text_mask_embedding"}),
    ("mim", True, {"image_encoder", "text_encoder", "mim", "text_mask_embedding", "image_mask_token"}),
    ("mim", False, {"image_encoder", "text_encoder", "mim", "image_mask_token"}),
])
def test_gradients_reach_exactly_the_intended_parameters(which, conditioned, expected):
    # both heads exist; only one is weighted into the loss: the other head and the temperature stay untouched
    loss = LossConfig(contrastive="none", mlm_weight=1.0, mim_weight=1.0,
                      masked_heads="conditioned" if conditioned else "vanilla")
    model, trainee, images, texts = make(loss)
    terms = trainee(images, texts)
    name = ("con" if conditioned else "") + which
    terms[name].backward()
    assert grad_groups(trainee) == expected


def test_heads_are_not_exported_and_bad_settings_fail_clearly(tmp_path):
    from model_training.models import export_open_clip
    model, trainee, _, _ = make(LossConfig(mlm_weight=1.0, mim_weight=1.0))
    state = torch.load(export_open_clip(model, tmp_path), weights_only=True)
    assert set(state) == set(model.clip.state_dict())
    assert not any("mask" in k or "head" in k or "decoder" in k for k in state)
    with pytest.raises(ValueError, match="masked_heads"):
        build_objective(LossConfig(mlm_weight=1.0, masked_heads="both"), model)
    with pytest.raises(ValueError, match="text_mask_ratio"):
        build_objective(LossConfig(mlm_weight=1.0, text_mask_ratio=1.5), model)


def test_bidirectional_text_tower_sees_both_sides_pools_sot_and_its_export_loads_in_open_clip(tmp_path):
    # BERT-like text tower (ConLIP, MAMO): no causal mask, so a token's state depends on the tokens AFTER
    # it; pooled on the first token (SOT). Reference: open_clip's own blocks run by hand with no mask.
    import open_clip
    from model_training.models import export_open_clip
    torch.manual_seed(0)
    bidir, causal = build_model("catclip-micro", text_attention="bidirectional"), build_model("catclip-micro")
    assert bidir.name == "catclip-micro-bidir" and bidir.clip.attn_mask is None and bidir.clip.text_pool_type == "first"
    texts = get_tokenizer("catclip-micro")(CAPTIONS)
    later = texts.clone()
    later[:, 4] = 1000                                    # change the 4th word
    for model, leaks in ((bidir, True), (causal, False)):
        with torch.no_grad():
            _, a = model.encode_text(texts, return_tokens=True)
            _, b = model.encode_text(later, return_tokens=True)
        assert bool((a[:, :4] - b[:, :4]).abs().max() > 1e-4) == leaks      # earlier positions see later ones
    c = bidir.clip
    with torch.no_grad():
        x = c.token_embedding(texts) + c.positional_embedding
        for block in c.transformer.resblocks:
            x = block(x, attn_mask=None)
        expected = torch.nn.functional.normalize(c.ln_final(x)[:, 0] @ c.text_projection, dim=-1)
        assert torch.allclose(bidir.encode_text(texts), expected, atol=1e-5)
    path = export_open_clip(bidir, tmp_path / "export")
    open_clip.add_model_config(tmp_path / "export" / "catclip-micro-bidir.json")
    loaded, _, _ = open_clip.create_model_and_transforms("catclip-micro-bidir", pretrained=str(path))
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(texts, normalize=True), bidir.encode_text(texts), atol=1e-5)
    rebuilt = build_model("catclip-micro-bidir", str(path))   # an export's name rebuilds the same tower
    with torch.no_grad():
        assert torch.allclose(rebuilt.encode_text(texts), bidir.encode_text(texts), atol=1e-5)
    from model_training.presets import load_preset
    for name in ("conlip", "conlip-vanilla", "masked", "denoise", "cl"):
        assert load_preset(name)["train"]["text_attention"] == "bidirectional"
    for name in ("clip", "diht"):
        assert "text_attention" not in load_preset(name)["train"]
    with pytest.raises(ValueError, match="text_attention"):
        build_model("catclip-micro", text_attention="sideways")
