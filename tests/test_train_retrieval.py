"""retrieval_metrics against a brute-force reference; caption-set loaders (model_training/evaluate.py)."""
import json
import math
from pathlib import Path

import pytest
import torch

from model_training.caption_sets import load_coco, load_karpathy
from model_training.evaluate import chance_recall, retrieval_metrics

COCO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"


def brute_force(image_emb, text_emb, t2i):
    """Sort every ranking list explicitly; ties are broken AGAINST the query (matches go last)."""
    s = (image_emb.double() @ text_emb.double().T).tolist()
    n_img, n_txt = len(s), len(t2i)
    out = {}
    first_hit = []
    for i in range(n_img):
        order = sorted(range(n_txt), key=lambda j: (-s[i][j], t2i[j] == i))
        first_hit.append(min(pos for pos, j in enumerate(order) if t2i[j] == i))
    own_pos = []
    for j in range(n_txt):
        order = sorted(range(n_img), key=lambda i: (-s[i][j], i == t2i[j]))
        own_pos.append(order.index(t2i[j]))
    for k in (1, 5, 10):
        out[f"i2t_r{k}"] = 100.0 * sum(p < k for p in first_hit) / n_img
        out[f"t2i_r{k}"] = 100.0 * sum(p < k for p in own_pos) / n_txt
    out["rsum"] = sum(out[k] for k in list(out))
    return out


@pytest.mark.parametrize("kind", ["float", "ties"])
def test_matches_brute_force_five_captions_per_image(kind):
    g = torch.Generator().manual_seed(1)
    n_img, per, d = 30, 5, 8
    t2i = [i for i in range(n_img) for _ in range(per)]
    if kind == "float":
        img = torch.nn.functional.normalize(torch.randn(n_img, d, generator=g), dim=-1)
        txt = torch.nn.functional.normalize(img[t2i] + 1.2 * torch.randn(n_img * per, d, generator=g), dim=-1)
    else:   # small integers: dot products are exact and ties are everywhere (incl. duplicate images)
        img = torch.randint(-1, 2, (n_img, 3), generator=g).float()
        img[7] = img[3]
        txt = torch.randint(-1, 2, (n_img * per, 3), generator=g).float()
    got = retrieval_metrics(img, txt, t2i, chunk_size=7)   # odd chunk: rows split across chunks
    ref = brute_force(img, txt, t2i)
    assert got.keys() == ref.keys()
    for key in ref:
        assert math.isclose(got[key], ref[key], abs_tol=1e-9), (key, got[key], ref[key])
    if kind == "ties":   # pessimistic ties: constant embeddings retrieve nothing
        zero = retrieval_metrics(torch.ones(20, 2), torch.ones(100, 2), [i // 5 for i in range(100)])
        assert zero["rsum"] == 0.0


def test_perfect_embeddings_and_chance():
    img = torch.eye(6)
    t2i = [i for i in range(6) for _ in range(5)]
    assert retrieval_metrics(img, img[t2i], t2i)["rsum"] == 600.0
    ch = chance_recall(1000, 5)
    # 1,000 images x 5 captions: R@1 is 1/1000 both ways; I2T R@5 = 1 - C(4995,5)/C(5000,5)
    assert math.isclose(ch["t2i_r1"], 0.1) and math.isclose(ch["i2t_r1"], 0.1, rel_tol=1e-9)
    assert math.isclose(ch["i2t_r5"], 100 * (1 - math.comb(4995, 5) / math.comb(5000, 5)), rel_tol=1e-9)


def test_rejects_bad_mapping():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(2, 4), [0, 1])
    with pytest.raises(ValueError, match="image index"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(2, 4), [0, 5])


def test_caption_set_loaders(tmp_path):
    cs = load_coco(COCO / "captions.json", COCO / "images")
    assert len(cs.image_paths) == 80 and len(cs.captions) == 400
    assert cs.text_to_image[:6] == [0, 0, 0, 0, 0, 1] and all(p.is_file() for p in cs.image_paths)
    # the same data in the Karpathy layout (Flickr style: no filepath), one image with 6 captions
    images = [{"filename": p.name, "split": "test" if i < 10 else "train", "imgid": i,
               "sentences": [{"raw": c} for c, j in zip(cs.captions, cs.text_to_image) if j == i]}
              for i, p in enumerate(cs.image_paths)]
    images[0]["sentences"].append({"raw": "a sixth caption is dropped by the 5-caption protocol"})
    images[1]["sentences"] = images[1]["sentences"][:4]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    ks = load_karpathy(tmp_path / "dataset_flickr30k.json", COCO / "images", split="test")
    assert len(ks.image_paths) == 10 and len(ks.captions) == 49
    assert ks.notes and "fewer than 5" in ks.notes[0]
    with pytest.raises(ValueError, match="split"):
        load_karpathy(tmp_path / "dataset_flickr30k.json", COCO / "images", split="val")
