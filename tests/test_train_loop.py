"""The training loop end to end on coco-mini (model_training/train.py, train_eval.py, models.py).

Sizes are chosen for a 2-core CPU: preset catclip-micro (48 px ViT, 2+2 layers, 64-d), batches of 16-32.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pyarrow.parquet as pq
import pytest

from tests.vocab_util import write_vocab
import torch
from PIL import Image

from model_training.caption_sets import CaptionSet, load_coco, write_shards
from model_training.data import ImageTransform
from model_training.evaluate import chance_recall, evaluate_retrieval
from model_training.models import build_model, get_tokenizer
from model_training.train import TrainConfig, train
from schemas import LABELS

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco-mini"


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Training shards hold captions 0-3 of each of the 80 images; caption 4 is held out."""
    root = tmp_path_factory.mktemp("coco")
    cs = load_coco(COCO / "captions.json", COCO / "images")
    write_shards(cs, root / "shards", n_shards=4, max_side=64, caption_filter=lambda k: k < 4)
    held = CaptionSet(cs.image_paths, cs.captions[4::5], list(range(80)), cs.image_ids)
    keys = [k for p in sorted((root / "shards").glob("*.parquet")) for k in pq.read_table(p).column("key").to_pylist()]
    (root / "labels" / "shards").mkdir(parents=True)
    pq.write_table(LABELS.from_rows([{"key": k, "object_indices": [i % 5], "object_probs": [1.0],
                                      "attribute_indices": [i % 3, 0], "attribute_probs": [0.7, 0.3]}
                                     for i, k in enumerate(keys)]), root / "labels" / "shards" / "00000.parquet")
    write_vocab(root / "labels", list("abcde"), list("xyz"))
    return root, held


def _losses(run_dir):
    with open(Path(run_dir) / "log.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def _cfg(root, run_dir, **kw):
    base = dict(shards=str(root / "shards"), run_dir=str(run_dir), model="catclip-micro", batch_size=16,
                num_workers=2, max_steps=8, warmup_steps=2, log_every=1, checkpoint_every=100, shuffle_buffer=64)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_follows_the_same_trajectory_and_export_loads_in_open_clip(coco, tmp_path):
    root, _ = coco
    full = train(_cfg(root, tmp_path / "full"))
    # interrupted after step 3 (odd: the DataLoader's worker round robin must be rotated on resume)
    part = train(_cfg(root, tmp_path / "part", stop_after=3))
    assert not part["finished"] and (tmp_path / "part/checkpoints/step_0000003.json").is_file()
    resumed = train(_cfg(root, tmp_path / "part", resume="latest"))
    assert resumed["finished"] and resumed["samples_seen"] == full["samples_seen"] == 8 * 16
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4 * max(1.0, abs(a[step])), (step, a[step], b[step])
    assert a[8] != a[1]   # the loss actually moved

    # open_clip loads the exported weights and gives the same embeddings as our model
    export = Path(full["export"])
    oc_model, _, preprocess = open_clip.create_model_and_transforms("catclip-micro", pretrained=str(export))
    oc_model.eval()
    ours = build_model("catclip-micro")
    state = torch.load(tmp_path / "full/checkpoints/step_0000008.pt", weights_only=True)["trainee"]
    ours.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    ours.eval()
    with Image.open(next((COCO / "images").iterdir())) as im:
        pixels = preprocess(im.convert("RGB"))[None]
        assert torch.allclose(pixels[0], ImageTransform(48, train=False)(im.convert("RGB")), atol=1e-5)
    text = get_tokenizer("catclip-micro")(["a man riding a horse on a beach"])
    with torch.no_grad():
        img, patches = ours.encode_image(pixels, return_tokens=True)
        txt, tokens = ours.encode_text(text, return_tokens=True)
        assert torch.allclose(img, oc_model.encode_image(pixels, normalize=True), atol=1e-5)
        assert torch.allclose(txt, oc_model.encode_text(text, normalize=True), atol=1e-5)
    assert patches.shape == (1, 36, 64) and tokens.shape == (1, 24, 64)   # 6x6 patches; context 24


def test_tiny_model_retrieves_held_out_captions_far_above_chance(coco, tmp_path):
    # 80 images, each trained with 4 captions; the 5th caption of every image is never seen in training.
    # Held-out T2I: 80 unseen captions against the 80 images, chance R@1 = 1/80 = 1.25 %, R@5 = 6.25 %.
    root, held = coco
    summary = train(_cfg(root, tmp_path / "learn", num_workers=1, batch_size=32, max_steps=STEPS, lr=1e-3,
                         warmup_steps=20, log_every=25, shuffle_buffer=320))
    model = build_model("catclip-micro", summary["export"])
    r = evaluate_retrieval(model, get_tokenizer("catclip-micro"), held, tmp_path / "learn/eval")
    chance = chance_recall(80, 1)
    assert chance["t2i_r1"] == 1.25
    assert r["t2i_r1"] >= MIN_R1, r      # MIN_R1 = 8x chance
    assert r["t2i_r5"] >= 4 * chance["t2i_r5"], r
    assert (tmp_path / "learn/eval/metrics.json").is_file() and (tmp_path / "learn/eval/recall.png").is_file()


STEPS, MIN_R1 = 150, 10.0   # measured on coco-mini: 200 steps -> T2I R@1 30 %, 300 steps -> 40 %


def test_train_eval_with_labels_momentum_queue_and_hn_nce(coco, tmp_path):
    root, _ = coco
    from model_training.train_eval import main
    run = tmp_path / "te"
    main(["--shards", str(root / "shards"), "--labels", str(root / "labels"), "--run", str(run),
          "--model", "catclip-micro", "--max-steps", "4", "--batch-size", "16", "--log-every", "2",
          "--contrastive", "hn_nce", "--momentum-weight", "0.5", "--queue-size", "40", "--holdout-fraction", "0.2"])
    metrics = json.loads((run / "metrics.json").read_text())
    held = metrics["holdout_retrieval"]
    assert metrics["labels_used"] and 30 < held["n_pairs"] < 110
    assert {"i2t_r1", "t2i_r10", "rsum", "chance"} <= set(held)
    with open(run / "log.csv") as f:
        row = next(csv.DictReader(f))
    assert {"hn_nce", "momentum_dcl", "concept_objects", "concept_attributes", "loss"} <= set(row)
    for name in ("loss_curve.png", "recall.png", "export/open_clip_model.pt", "export/catclip-micro.json"):
        assert (run / name).is_file(), name


DDP_SCRIPT = r'''
import copy, json, os, sys
import torch, torch.distributed as dist, torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from model_training.losses import gather_with_grad, info_nce
from model_training.train import TrainConfig, train

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
net = nn.ModuleDict({"i": nn.Linear(6, 4), "t": nn.Linear(5, 4)})
x, y = torch.randn(8, 6), torch.randn(8, 5)          # identical on both ranks (same seed)
ref = copy.deepcopy(net)                             # reference: one process, the whole batch
info_nce(F.normalize(ref["i"](x), dim=-1), F.normalize(ref["t"](y), dim=-1), 10.0).backward()

class Pair(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
    def forward(self, x, y):
        return info_nce(gather_with_grad(F.normalize(self.net["i"](x), dim=-1)),
                        gather_with_grad(F.normalize(self.net["t"](y), dim=-1)), 10.0)

ddp = DDP(Pair(net))
ddp(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]).backward()
err = max(float((p.grad - q.grad).abs().max()) for p, q in zip(net.parameters(), ref.parameters()))
summary = train(TrainConfig(shards=sys.argv[1], run_dir=sys.argv[2], model="catclip-micro", batch_size=8,
                            num_workers=1, max_steps=3, warmup_steps=1, log_every=1, shuffle_buffer=16))
json.dump({"grad_err": err, "summary": summary}, open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w"))
'''


def test_ddp_two_cpu_ranks_under_torchrun(coco, tmp_path):
    root, _ = coco
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_SCRIPT)
    run = tmp_path / "ddp"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", str(script), str(root / "shards"), str(run)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        out = json.loads((run / f"rank{rank}.json").read_text())
        # gathered-with-grad loss under DDP == single-process loss on the whole batch
        assert out["grad_err"] < 1e-6, out["grad_err"]
        assert out["summary"]["world_size"] == 2 and out["summary"]["samples_seen"] == 3 * 8 * 2
    state = torch.load(run / "checkpoints/step_0000003.pt", weights_only=True)
    assert len(state["data_positions"]) == 2          # both ranks' stream positions saved for resume
    assert len(_losses(run)) == 3
