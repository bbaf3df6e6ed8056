"""Retrieval (5 captions per image, the papers' protocol) and zero-shot classification.

    .venv/bin/catcurate evaluate --model ViT-B-16 --checkpoint RUN/export/open_clip_model.pt \
        --karpathy-json dataset_coco.json --images coco/ --out RUN/eval_coco5k          # COCO 5k test
    .venv/bin/catcurate evaluate --model ViT-B-16 --checkpoint ... \
        --karpathy-json dataset_flickr30k.json --images flickr30k-images/ --out RUN/eval_f30k   # Flickr 1k
    .venv/bin/catcurate evaluate --model catclip-tiny --checkpoint ... --coco-json captions.json --images DIR
    .venv/bin/catcurate evaluate --model catclip-tiny --checkpoint ... --flickr8k ../shared/data/flickr8k \
        --split dev --out RUN/eval_f8k_dev      # Flickr8k: distributed, dataset_flickr8k.json or Parquet layout
    .venv/bin/catcurate evaluate --model ViT-B-32 --pretrained laion2b_s34b_b79k ...   # needs a model hub
    .venv/bin/catcurate evaluate ... --imagefolder imagenet/val --out RUN/eval_zeroshot

`retrieval_metrics(image_emb, text_emb, text_to_image)` is the one function behind every retrieval
number. Scores are plain dot products of the embeddings as given (pass L2-normalised embeddings for
cosine similarity). Ranking, with ties counted AGAINST the query (pessimistic, so a model that
outputs constant embeddings gets R@k = 0 rather than 100):
- T2I: caption j's rank = number of OTHER images scoring >= its own image; correct at k if rank < k.
- I2T: image i's rank = number of NON-matching captions scoring >= its best matching caption;
  correct at k if rank < k, i.e. any of its captions is in the top k.
Similarities are computed in chunks of rows (chunk x all columns), so 5,000 x 25,000 needs
~chunk x 25,000 floats at a time, never the full matrix.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model_training.caption_sets import CaptionSet, load_coco, load_flickr8k, load_karpathy, open_image
from model_training.data import ImageTransform

KS = (1, 5, 10)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image, chunk_size: int = 1024) -> dict:
    """image_emb [N,D], text_emb [M,D], text_to_image [M] (image index of each caption) ->
    {i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10} in percent, and rsum (their sum)."""
    return recall_from_ranks(*retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size))


def recall_from_ranks(i2t_rank: torch.Tensor, t2i_rank: torch.Tensor) -> dict:
    out = {}
    for name, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in KS:
            out[f"{name}_r{k}"] = 100.0 * int((ranks < k).sum()) / len(ranks)   # exact: counts, not float means
    out["rsum"] = sum(out[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in KS)
    return out


@torch.no_grad()
def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image, chunk_size: int = 1024
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query ranks (0 = correct first): i2t [N] and t2i [M], as defined in the module docstring.
    Kept per query so that two models can be compared query by query (paired tests)."""
    image_emb, text_emb = image_emb.float(), text_emb.float()
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=text_emb.device)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if t2i.shape != (n_txt,) or t2i.min() < 0 or t2i.max() >= n_img:
        raise ValueError(f"text_to_image must map each of the {n_txt} captions to an image index in [0, {n_img})")
    has_caption = torch.bincount(t2i, minlength=n_img) > 0
    if not bool(has_caption.all()):
        raise ValueError(f"{int((~has_caption).sum())} image(s) have no caption; I2T recall would be undefined")

    # T2I: caption rows against all images
    t2i_rank = torch.empty(n_txt, dtype=torch.long)
    for s in range(0, n_txt, chunk_size):
        scores = text_emb[s:s + chunk_size] @ image_emb.T                      # [c, N]
        own = t2i[s:s + chunk_size]
        own_score = scores.gather(1, own[:, None])
        t2i_rank[s:s + chunk_size] = ((scores >= own_score).sum(1) - 1).cpu()   # minus the own image itself

    # I2T: image rows against all captions
    i2t_rank = torch.empty(n_img, dtype=torch.long)
    for s in range(0, n_img, chunk_size):
        scores = image_emb[s:s + chunk_size] @ text_emb.T                      # [c, M]
        rows = torch.arange(s, min(s + chunk_size, n_img), device=scores.device)
        positive = t2i[None, :] == rows[:, None]
        best_pos = scores.masked_fill(~positive, float("-inf")).max(1, keepdim=True).values
        i2t_rank[s:s + chunk_size] = ((scores >= best_pos) & ~positive).sum(1).cpu()
    return i2t_rank, t2i_rank


def chance_recall(n_images: int, captions_per_image: int = 1) -> dict:
    """Expected R@k of random embeddings: T2I k/N; I2T 1 - P(no own caption in the top k)."""
    n_txt = n_images * captions_per_image
    out = {}
    for k in KS:
        out[f"t2i_r{k}"] = 100.0 * min(1.0, k / n_images)
        p_miss = 1.0
        for i in range(min(k, n_txt)):
            p_miss *= max(0.0, (n_txt - captions_per_image - i) / (n_txt - i))
        out[f"i2t_r{k}"] = 100.0 * (1.0 - p_miss)
    return out


# ------------------------------------------------------------------ embedding with a model
@torch.no_grad()
def embed_images(model, images, image_size: int, batch_size: int = 128, device="cpu") -> torch.Tensor:
    """`images`: paths, encoded image bytes or PIL images; open_clip's eval preprocessing (resize shorter side, center crop)."""
    tf = ImageTransform(image_size, train=False)
    out = []
    for s in range(0, len(images), batch_size):
        batch = []
        for im in images[s:s + batch_size]:
            batch.append(tf(open_image(im)))
        out.append(model.encode_image(torch.stack(batch).to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], batch_size: int = 512, device="cpu") -> torch.Tensor:
    return torch.cat([model.encode_text(tokenizer(texts[s:s + batch_size]).to(device)).float().cpu()
                      for s in range(0, len(texts), batch_size)])


def plot_recalls(metrics: dict, out_png: Path, title: str, chance: dict | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, marker in (("i2t", "o"), ("t2i", "s")):
        ax.plot(KS, [metrics[f"{name}_r{k}"] for k in KS], marker=marker, label=name.upper())
        if chance:
            ax.plot(KS, [chance[f"{name}_r{k}"] for k in KS], linestyle=":", color="gray")
    ax.set_xlabel("k"), ax.set_ylabel("recall@k (%)"), ax.set_xticks(KS), ax.set_ylim(0, 100)
    ax.set_title(f"{title} (rsum {metrics['rsum']:.1f}; dotted: chance)" if chance else title)
    ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def evaluate_retrieval(model, tokenizer, cs: CaptionSet, out_dir: str | Path, name: str = "retrieval",
                       device="cpu") -> dict:
    """Embed a CaptionSet, compute the metrics, write OUT/metrics.json and OUT/recall.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    img = embed_images(model, cs.image_paths, model.image_size, device=device)
    txt = embed_texts(model, tokenizer, cs.captions, device=device)
    metrics = retrieval_metrics(img, txt, cs.text_to_image)
    per_image = len(cs.captions) / len(cs.image_paths)
    chance = chance_recall(len(cs.image_paths), round(per_image))
    result = {"task": name, **metrics, "chance": chance, **cs.summary()}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    plot_recalls(metrics, out_dir / "recall.png", name, chance)
    return result


@torch.no_grad()
def zero_shot_classify(model, tokenizer, image_folder: str | Path, out_dir: str | Path,
                       templates=("a photo of a {}.",), device="cpu") -> dict:
    """ImageFolder layout (root/<class name>/<image>): class names from folder names ('_' -> ' '),
    one text classifier per class = mean of its normalised prompt embeddings. Top-1/top-5 accuracy."""
    root = Path(image_folder)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root} needs >= 2 class sub-folders, found {classes}")
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    paths, labels = [], []
    for c, name in enumerate(classes):
        for p in sorted((root / name).iterdir()):
            if p.suffix.lower() in exts:
                paths.append(p)
                labels.append(c)
    weights = []
    for name in classes:
        e = embed_texts(model, tokenizer, [t.format(name.replace("_", " ")) for t in templates], device=device)
        weights.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
    logits = embed_images(model, paths, model.image_size, device=device) @ torch.stack(weights).T
    labels_t = torch.tensor(labels)
    topk = logits.topk(min(5, len(classes)), dim=1).indices
    result = {"task": "zero_shot", "n_images": len(paths), "n_classes": len(classes),
              "top1": 100.0 * float((topk[:, 0] == labels_t).float().mean()),
              "top5": 100.0 * float((topk == labels_t[:, None]).any(1).float().mean()),
              "chance_top1": 100.0 / len(classes), "templates": list(templates)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None):
    from model_training.models import build_model, get_tokenizer
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="preset / open_clip model name / JSON config path")
    ap.add_argument("--checkpoint", default="", help="open_clip state dict (e.g. RUN/export/open_clip_model.pt)")
    ap.add_argument("--pretrained", default="", help="open_clip pretrained tag (downloads from the hub: unset "
                                                   "HF_HUB_OFFLINE and have network), instead of --checkpoint")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--coco-json", help="COCO captions json (all its images)")
    src.add_argument("--karpathy-json", help="Karpathy split json (dataset_coco.json / dataset_flickr30k.json)")
    src.add_argument("--flickr8k", help="Flickr8k folder (Flickr8k.token.txt + split lists + images, "
                                        "dataset_flickr8k.json, or images.parquet + captions.parquet)")
    src.add_argument("--imagefolder", help="zero-shot classification on root/<class>/<images>")
    ap.add_argument("--images", help="image folder for --coco-json / --karpathy-json")
    ap.add_argument("--split", default="test", help="Karpathy split (test: COCO 5k / Flickr 1k); Flickr8k: dev | test")
    ap.add_argument("--out", required=True, help="folder for metrics.json (+ recall.png)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    if a.pretrained:
        import open_clip
        from model_training.models import DualEncoder
        model = DualEncoder(a.model, open_clip.create_model(a.model, pretrained=a.pretrained)).to(a.device)
    else:
        model = build_model(a.model, a.checkpoint or None).to(a.device)
    tok = get_tokenizer(model.name)
    if a.imagefolder:
        result = zero_shot_classify(model, tok, a.imagefolder, a.out, device=a.device)
    elif a.flickr8k:
        result = evaluate_retrieval(model, tok, load_flickr8k(a.flickr8k, a.split), a.out,
                                    name=f"flickr8k_{a.split}", device=a.device)
    else:
        if not a.images:
            ap.error("--images is required with --coco-json / --karpathy-json")
        cs = load_coco(a.coco_json, a.images) if a.coco_json else load_karpathy(a.karpathy_json, a.images, a.split)
        result = evaluate_retrieval(model, tok, cs, a.out, name=Path(a.coco_json or a.karpathy_json).stem,
                                    device=a.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
