"""Every objective preset trains a few steps at toy size on coco-mini shards; preset CLI semantics;
the export drops every head; data subsets for scaling runs; the ablation runner end to end (tiny)."""
import csv
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from model_training.caption_sets import load_coco, write_shards
from model_training.data import in_subset
from model_training.models import build_model
from model_training.presets import list_presets, load_preset
from model_training.train import TrainConfig, parse_args, train
from schemas import LABELS
from tests.vocab_util import write_vocab

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco-mini"
PRESETS = ["cl", "clip", "conlip", "conlip-vanilla", "denoise", "diht", "masked"]
EXPECTED_TERMS = {"clip": {"infonce"}, "diht": {"hn_nce", "concept_objects", "concept_attributes"},
                  "cl": {"momentum_dcl"}, "conlip": {"momentum_dcl", "conmlm", "conmim"},
                  "conlip-vanilla": {"momentum_dcl", "mlm", "mim"},
                  "denoise": {"infonce", "itm", "text_denoise_detect", "text_denoise_restore", "image_denoise",
                              "repr_noise"},
                  "masked": {"infonce", "itm", "mlm", "mim", "repr_mask"}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    cs = load_coco(COCO / "captions.json", COCO / "images")
    write_shards(cs, root / "shards", n_shards=2, max_side=48, caption_filter=lambda k: k < 2)
    keys = [k for p in sorted((root / "shards").glob("*.parquet")) for k in pq.read_table(p).column("key").to_pylist()]
    (root / "labels" / "shards").mkdir(parents=True)
    pq.write_table(LABELS.from_rows([{"key": k, "object_indices": [i % 4], "object_probs": [1.0],
                                      "attribute_indices": [i % 3], "attribute_probs": [1.0]}
                                     for i, k in enumerate(keys)]), root / "labels" / "shards" / "00000.parquet")
    write_vocab(root / "labels", list("abcd"), list("xyz"))
    return root


def test_all_presets_exist_and_load():
    assert list_presets() == PRESETS
    for p in PRESETS:
        assert load_preset(p)["description"]
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("nope")
    # the papers' targets: MAMO predicts EMA features, ConLIP pixels; the proposal denoises against the EMA model
    assert load_preset("masked")["loss"]["mim_target"] == "ema_features"
    assert load_preset("conlip")["loss"]["mim_target"] == "pixels"
    assert load_preset("denoise")["loss"]["image_denoise_target"] == "ema"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_a_few_steps(preset, data, tmp_path):
    argv = ["--shards", str(data / "shards"), "--run-dir", str(tmp_path / preset), "--preset", preset,
            "--model", "catclip-micro", "--batch-size", "8", "--max-steps", "3", "--warmup-steps", "1",
            "--num-workers", "0", "--log-every", "1", "--shuffle-buffer", "16", "--queue-size", "32"]
    if load_preset(preset)["needs_labels"]:
        argv += ["--labels", str(data / "labels")]
    summary = train(parse_args(argv))
    terms = set(summary["final_terms"])
    assert EXPECTED_TERMS[preset] <= terms and "loss" in terms
    losses = [summary["final_terms"][t] for t in EXPECTED_TERMS[preset]]
    assert all(v == v and abs(v) < 1e3 for v in losses)              # finite
    with open(tmp_path / preset / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    exported = torch.load(summary["export"], weights_only=True)
    assert set(exported) == set(build_model("catclip-micro").clip.state_dict())   # heads and EMA copies dropped
    ckpt = torch.load(tmp_path / preset / "checkpoints" / "step_0000003.pt", weights_only=True)
    assert "rng" in ckpt   # masks / noise continue the same random stream on resume


def test_preset_values_are_defaults_that_explicit_flags_override():
    cfg = parse_args(["--shards", "x", "--preset", "conlip", "--mlm-weight", "0.5"])
    assert cfg.preset == "conlip" and cfg.loss.contrastive == "none" and cfg.loss.momentum_weight == 1.0
    assert cfg.loss.mlm_weight == 0.5 and cfg.loss.mim_weight == 1.0 and cfg.loss.masked_heads == "conditioned"
    assert parse_args(["--shards", "x"]).loss.mlm_weight == 0.0 and isinstance(parse_args(["--shards", "x"]), TrainConfig)


def test_train_fraction_subsets_are_nested_and_sized():
    keys = [f"k{i}" for i in range(4000)]
    sizes = {f: sum(in_subset(k, f) for k in keys) for f in (0.1, 0.25, 0.5, 1.0)}
    assert sizes[1.0] == 4000 and all(abs(sizes[f] - 4000 * f) < 4000 * 0.03 for f in (0.1, 0.25, 0.5))
    assert {k for k in keys if in_subset(k, 0.1)} <= {k for k in keys if in_subset(k, 0.25)}


def test_ablate_runner_writes_table_and_charts(data, tmp_path):
    from model_training.ablate import main
    out = tmp_path / "ablate"
    main(["--shards", str(data / "shards"), "--out", str(out), "--presets", "clip,conlip", "--fractions", "0.5,1.0",
          "--max-steps", "2", "--batch-size", "8", "--num-workers", "0", "--holdout-fraction", "0.25"])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["preset"], float(r["fraction"])) for r in rows] == [("clip", 0.5), ("conlip", 0.5), ("clip", 1.0),
                                                                   ("conlip", 1.0)]
    for r in rows:
        assert 0 <= float(r["rsum"]) <= 600 and {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"} <= set(r)
    conlip = rows[1]
    assert 0 < float(conlip["attn_conmlm_attn_cls_mean"]) < 1 and float(conlip["attn_conmim_attn_cls_std"]) >= 0
    for name in ("results.md", "results.json", "ablate_recall.png", "scaling.png"):
        assert (out / name).is_file(), name
    assert "| clip | 0.5 |" in (out / "results.md").read_text()
    # toy runs keep ConLIP's queue-to-batch ratio (3x), not the paper's 12,288 entries
    ckpt = torch.load(out / "f1" / "conlip" / "checkpoints" / "step_0000002.pt", weights_only=True)
    assert ckpt["config"]["loss"]["queue_size"] == 3 * 8
