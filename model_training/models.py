"""Dual encoders (ViT + text transformer) built by open_clip from our JSON configs.

    from model_training.models import build_model, export_open_clip
    model = build_model("catclip-tiny")                 # configs/catclip-tiny.json, random init
    img = model.encode_image(images)                    # L2-normalised [B, D]
    img, patches = model.encode_image(images, return_tokens=True)   # + [B, P, width] patch tokens
    img, patches = model.encode_image(images, return_tokens=True, patch_mask=m, mask_token=t)   # masked pass
    export_open_clip(model, "run/export")               # open_clip.create_model_and_transforms loads it

Why open_clip builds the network: the exported weights are then exactly an open_clip CLIP
state dict, so `open_clip.create_model_and_transforms(name, pretrained=path)` loads them with no
conversion, and open_clip checkpoints can initialise our runs. Our wrapper only adds what the
trainer needs on top: token-level outputs (for the ConMLM/ConMIM/ITM heads of later work) and a
single place that knows the config directory. Configs are open_clip's format:
{"embed_dim", "vision_cfg": {...}, "text_cfg": {...}}; see configs/*.json.
"""
from __future__ import annotations

import functools
import json
import logging
from contextlib import contextmanager
import shutil
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from open_clip.transformer import text_global_pool

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
open_clip.add_model_config(CONFIG_DIR)  # registers our presets under their file stems
PRESETS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


def model_config(name: str) -> dict:
    """The open_clip-format config of a preset (or of any model open_clip knows)."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown model config {name!r}; presets: {', '.join(PRESETS)} "
                         f"(or any name in open_clip.list_models(), or a path to a JSON config)")
    return cfg


BIDIR_SUFFIX = "-bidir"
TEXT_ATTENTION = ("causal", "bidirectional")
_derived_dir: Path | None = None


def bidirectional_config(cfg: dict) -> dict:
    """The same model with a BERT-like text tower: no causal mask (every token attends to the whole
    sequence, as ConLIP's and MAMO's BERT encoders do) and pooling on the first token (SOT, BERT's
    [CLS] position; under a causal mask only the EOT saw the whole caption, now every token does).
    open_clip's CLIP applies no padding mask in this mode, so padding positions are attended too;
    the trainer computes exactly what open_clip computes when it loads the export."""
    return {**cfg, "text_cfg": {**cfg["text_cfg"], "no_causal_mask": True, "pool_type": "first"}}


def _register_derived(name: str, cfg: dict) -> str:
    """Register a config built in code (a JSON file in a per-process folder; open_clip's public API)."""
    global _derived_dir
    if open_clip.get_model_config(name) == cfg:
        return name
    if _derived_dir is None:
        import atexit
        import tempfile
        _derived_dir = Path(tempfile.mkdtemp(prefix="catclip-configs-"))
        atexit.register(shutil.rmtree, _derived_dir, True)
    path = _derived_dir / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=2))
    open_clip.add_model_config(path)
    return name


def register_config(path_or_name: str, text_attention: str = "causal") -> str:
    """Accept a preset name or a path to an open_clip JSON config; return the registered name.
    text_attention="bidirectional" (or a name ending in -bidir, as exports of such runs are named)
    registers <name>-bidir: the same config with bidirectional_config's text tower."""
    if text_attention not in TEXT_ATTENTION:
        raise ValueError(f"text_attention must be causal | bidirectional, got {text_attention!r}")
    p = Path(path_or_name)
    if p.suffix == ".json" and p.is_file():
        open_clip.add_model_config(p)
        name = p.stem
    elif path_or_name.endswith(BIDIR_SUFFIX) and open_clip.get_model_config(path_or_name) is None:
        name = register_config(path_or_name[:-len(BIDIR_SUFFIX)], "bidirectional")
    else:
        model_config(path_or_name)  # raises a clear error for unknown names
        name = path_or_name
    if text_attention == "bidirectional" and not name.endswith(BIDIR_SUFFIX):
        name = _register_derived(name + BIDIR_SUFFIX, bidirectional_config(model_config(name)))
    return name


class DualEncoder(nn.Module):
    """open_clip's CLIP plus token-level outputs. `self.clip` is what gets exported."""

    def __init__(self, name: str, clip: open_clip.CLIP):
        super().__init__()
        if not isinstance(clip, open_clip.CLIP):
            raise TypeError(f"{name}: only open_clip.CLIP (ViT + built-in text transformer) is supported, "
                            f"got {type(clip).__name__}")
        self.name = name
        self.clip = clip
        self.embed_dim = clip.text_projection.shape[1]
        self.image_size = clip.visual.image_size[0]
        self.context_length = clip.context_length

    @property
    def logit_scale(self) -> nn.Parameter:
        """log(1/temperature), learnable; exported with the weights as open_clip expects."""
        return self.clip.logit_scale

    def encode_image(self, images: torch.Tensor, normalize: bool = True, return_tokens: bool = False,
                     patch_mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None):
        """[B,3,H,W] -> embedding [B,D] (and patch tokens [B,P,width] after ln_post if asked).

        Spells out open_clip's VisionTransformer.forward so the tokens come from the same pass.
        `patch_mask` [B,P] bool with `mask_token` [width]: masked patches' embeddings are replaced by
        the (learnable, owned by the caller) mask token before positions are added (SimMIM/ConLIP).
        """
        visual = self.clip.visual
        x = visual._embeds(images) if patch_mask is None else self._masked_patch_embeds(images, patch_mask, mask_token)
        x = visual.transformer(x)
        pooled, tokens = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        emb = F.normalize(pooled, dim=-1) if normalize else pooled
        return (emb, tokens) if return_tokens else emb

    def _masked_patch_embeds(self, images, patch_mask, mask_token):
        """open_clip's VisionTransformer._embeds with masked patch embeddings swapped for `mask_token`."""
        visual = self.clip.visual
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)            # [B, P, width]
        if patch_mask.shape != x.shape[:2]:
            raise ValueError(f"patch_mask must be [B, P] = {tuple(x.shape[:2])}, got {tuple(patch_mask.shape)}")
        x = torch.where(patch_mask[..., None], mask_token.to(x.dtype), x)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(visual.patch_dropout(x))

    def encode_text(self, text: torch.Tensor, normalize: bool = True, return_tokens: bool = False,
                    token_mask: torch.Tensor | None = None, mask_embedding: torch.Tensor | None = None):
        """[B,L] token ids -> embedding [B,D] (and all token states [B,L,width] after ln_final).

        Same computation as open_clip.CLIP.encode_text, keeping the token states. `token_mask` [B,L]
        bool with `mask_embedding` [width]: those positions' token embeddings are replaced (CLIP's BPE
        vocabulary has no [MASK] token); pooling still finds the EOT by id, so it is unaffected.
        """
        c = self.clip
        cast_dtype = c.transformer.get_cast_dtype()
        x = c.token_embedding(text).to(cast_dtype)
        if token_mask is not None:
            x = torch.where(token_mask[..., None], mask_embedding.to(cast_dtype), x)
        x = x + c.positional_embedding.to(cast_dtype)
        tokens = c.ln_final(c.transformer(x, attn_mask=c.attn_mask))
        pooled = text_global_pool(tokens, text, c.text_pool_type, eos_token_id=getattr(c, "text_eos_id", None))
        if c.text_projection is not None:
            pooled = c.text_projection(pooled) if isinstance(c.text_projection, nn.Linear) else pooled @ c.text_projection
        emb = F.normalize(pooled, dim=-1) if normalize else pooled
        return (emb, tokens) if return_tokens else emb

    def forward(self, images: torch.Tensor, text: torch.Tensor):
        return self.encode_image(images), self.encode_text(text), self.logit_scale.exp()


class LockedImageDualEncoder(DualEncoder):
    """LiT: images arrive as cached features of a frozen teacher (model_training.features); only a
    FeatureHead maps them to the joint space. The config's own vision tower is kept, frozen and
    unused, so the text side stays an open_clip CLIP that exports and loads as usual."""

    def __init__(self, name: str, clip: open_clip.CLIP, feature_dim: int, glyph_side: int = 0, ocr_tokens: int = 0):
        from model_training.features import FeatureHead
        super().__init__(name, clip)
        self.feature_head = FeatureHead(feature_dim, self.embed_dim, glyph_side=glyph_side, ocr_tokens=ocr_tokens,
                                        token_width=clip.token_embedding.weight.shape[1])
        self.clip.visual.requires_grad_(False)

    def encode_image(self, images: torch.Tensor, normalize: bool = True, return_tokens: bool = False,
                     patch_mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None):
        if patch_mask is not None or images.dim() != 2:
            raise ValueError("a locked image tower takes [B, feature_dim] features: objectives that mask or "
                             "noise pixels (MIM, image denoising) need the full image tower")
        emb = self.feature_head(images, self.clip.token_embedding.weight)
        emb = F.normalize(emb, dim=-1) if normalize else emb
        return (emb, None) if return_tokens else emb


class _RandomInitFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_init():
    """open_clip logs "No pretrained weights loaded ... initialized randomly" for every model built with
    pretrained=None; from scratch that is the intent (train.py says "random initial weights" once)."""
    root, quiet = logging.getLogger(), _RandomInitFilter()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def build_model(name: str, init_checkpoint: str | None = None, device: str | torch.device = "cpu",
                image_feature_dim: int = 0, text_attention: str = "causal", glyph_side: int = 0,
                ocr_tokens: int = 0) -> DualEncoder:
    """Build a preset (or open_clip model name, or JSON config path) with random weights, or
    initialise from a local open_clip checkpoint (a state dict, or a dict with 'state_dict').
    image_feature_dim > 0 builds the LiT variant over cached frozen image features (glyph_side > 0: the
    features end in a glyph thumbnail read by a trainable CNN, model_training.features.GlyphCNN; ocr_tokens > 0:
    in the token ids of the words the text spotter read, model_training.features.TokenReader).
    text_attention="bidirectional" builds <name>-bidir (see bidirectional_config); the weights have the
    same shapes, so a causal checkpoint can initialise it."""
    name = register_config(name, text_attention)
    with _quiet_random_init():   # random weights are what pretrained=None asks for, not a warning
        clip = open_clip.create_model(name, pretrained=None, device=device)
    if init_checkpoint:
        if not Path(init_checkpoint).is_file():
            raise FileNotFoundError(f"init checkpoint {init_checkpoint} does not exist (a local path is required: "
                                    "nothing is downloaded at run time)")
        open_clip.load_checkpoint(clip, str(init_checkpoint), weights_only=True)
    if image_feature_dim:
        return LockedImageDualEncoder(name, clip, image_feature_dim, glyph_side, ocr_tokens).to(device)
    return DualEncoder(name, clip)


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str):
    """open_clip's bundled BPE tokenizer with the config's context length (offline), remembering the token
    rows of recent captions; one per name in a process, so runs after runs share what it remembers."""
    return CachedTokenizer(open_clip.get_tokenizer(register_config(name)))


class CachedTokenizer:
    """open_clip's tokenizer with a bounded per-caption cache of its [context_length] rows.

    Why: with cached image features a step of a small model spends a quarter of its time re-tokenizing
    captions it has tokenized before (every epoch, every evaluation of the same dev set); open_clip only
    caches BPE per word, not the regex/cleaning per caption. Bounded so a LAION-scale stream (each caption
    seen once) cannot grow it without limit. Everything else (encode, decoder, ...) is the wrapped one's.
    """

    def __init__(self, tokenizer, max_entries: int = 1 << 17):
        self.tokenizer, self.max_entries, self._rows = tokenizer, max_entries, {}

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if context_length is not None and context_length != self.tokenizer.context_length:
            return self.tokenizer(texts, context_length)
        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if len(missing) > self.max_entries:
            return self.tokenizer(texts)
        if missing:
            if len(self._rows) + len(missing) > self.max_entries:
                self._rows.clear()     # crude but O(1): a stream of unseen captions gains nothing from keeping
            self._rows.update(zip(missing, self.tokenizer(missing)))
        return torch.stack([self._rows[t] for t in texts])

    def __getattr__(self, name):
        if name == "tokenizer":    # while unpickling in a loader worker, before __init__'s attributes exist
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def export_open_clip(model: DualEncoder, out_dir: str | Path) -> Path:
    """Write OUT/open_clip_model.pt (plain fp32 CLIP state dict) and OUT/<name>.json (its config).

    Load with: open_clip.add_model_config("OUT/<name>.json");
               open_clip.create_model_and_transforms("<name>", pretrained="OUT/open_clip_model.pt")
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().clone() for k, v in model.clip.state_dict().items()}
    path = out_dir / "open_clip_model.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    if isinstance(model, LockedImageDualEncoder):   # images go through the teacher's features + this head
        head = {k: v.detach().float().cpu().clone() for k, v in model.feature_head.state_dict().items()}
        torch.save(head, out_dir / "feature_head.pt")
    src = CONFIG_DIR / f"{model.name}.json"
    cfg_path = out_dir / f"{model.name}.json"
    if src.is_file():
        shutil.copyfile(src, cfg_path)
    else:
        cfg_path.write_text(json.dumps(model_config(model.name), indent=2))
    return path
