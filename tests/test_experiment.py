"""The Flickr8k evidence experiment, reduced (`--scale smoke`), end to end with the real Spark filter,
the real distillation job, the LiT feature cache and the trainer; plus the Flickr8k readers."""
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import SHARED_DATA

FLICKR8K = SHARED_DATA / "flickr8k"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, spark, shared_data):
    from experiments.flickr8k import parse_config, run_experiment
    cfg, _ = parse_config(["--scale", "smoke"])
    out = tmp_path_factory.mktemp("experiment")
    summary = run_experiment(out, cfg, FLICKR8K, spark=spark)
    return out, cfg, summary


def test_noise_model_records_every_corruption(smoke):
    out, cfg, summary = smoke
    rows = pq.read_table(out / "work" / "noisy" / "train.parquet").drop(["jpg"]).to_pylist()
    assert len(rows) == 5 * cfg.noise.photos == summary["noise"]["n_pairs"]
    assert len({r["key"] for r in rows}) == len(rows)
    by = {t: [r for r in rows if r["noise"] == t] for t in ("none", "text_shortcut", "misaligned", "low_complexity")}
    assert sum(map(len, by.values())) == len(rows) and all(by.values())
    for r in by["none"] + by["text_shortcut"]:
        assert r["caption"] == r["clean_caption"]
    for r in by["text_shortcut"]:   # 1-4 consecutive words of its own caption were drawn on the photo
        assert 1 <= len(r["rendered_text"].split()) <= 4
        assert r["rendered_text"].lower() in r["clean_caption"].lower()
    for r in by["misaligned"] + by["low_complexity"]:
        assert r["caption"] != r["clean_caption"] and not r["rendered_text"]
    assert all(len(r["caption"].split()) <= 3 for r in by["low_complexity"])


def test_every_train_pair_lands_in_exactly_one_ledger_status_per_filter_run(smoke):
    from experiments.flickr8k import ledger_rows
    out, cfg, summary = smoke
    keys = set(pq.read_table(out / "work" / "noisy" / "train.parquet", columns=["key"]).column(0).to_pylist())
    for name in summary["filter_stats"]:
        ledger = ledger_rows(out / "work" / "filter" / name)
        assert sorted(r["key"] for r in ledger) == sorted(keys), name   # each key once, none missing
        assert {r["status"] for r in ledger} <= {"kept", "dropped", "failed"}
        stats = summary["filter_stats"][name]
        assert stats["n_input"] == stats["n_kept"] + stats["n_dropped"] + stats["n_failed"] == len(keys)


def test_detector_counts_are_consistent_with_the_ledger_and_the_arms(smoke):
    out, cfg, summary = smoke
    full = [r for r in summary["detector"] if r["filter_run"] == "full"]
    assert sum(r["n"] for r in full) == summary["noise"]["n_pairs"]
    for r in full:
        assert r["dropped"] == sum(r["reasons"].values()) <= r["n"]
    kept = summary["noise"]["n_pairs"] - sum(r["dropped"] for r in full)
    assert kept == summary["filter_stats"]["full"]["n_kept"] == summary["arms"]["filtered"]["n_pairs"]
    assert summary["arms"]["random"]["n_pairs"] == summary["arms"]["filtered"]["n_pairs"]
    assert summary["arms"]["noisy"]["n_pairs"] == summary["arms"]["clean"]["n_pairs"] == summary["noise"]["n_pairs"]
    # the caption rules drop every bare noun phrase ("A dog": no action)
    low = next(r for r in full if r["noise"] == "low_complexity")
    assert low["dropped"] == low["n"]


def test_detector_only_reuses_the_filter_runs_and_writes_the_same_table(smoke, spark):
    from experiments.flickr8k import run_detector
    out, cfg, summary = smoke
    done = {p: p.stat().st_mtime for p in (out / "work" / "filter").glob("*/_done/*/*.json")}
    detector = run_detector(out, cfg, FLICKR8K, spark=spark)
    runs = {r["filter_run"] for r in summary["detector"]}   # the smoke arms' runs; it adds the one-stage runs
    assert [r for r in detector["detector"] if r["filter_run"] in runs] == summary["detector"]
    assert {r["filter_run"] for r in detector["detector"]} == runs | {"caption_only", "textspot_only"}
    assert {p: p.stat().st_mtime for p in done} == done, "the smoke arms' filter runs are reused, not rerun"
    assert "| full | text_shortcut |" in (out / "results" / "detector.md").read_text()
    assert (out / "results" / "detector.json").is_file() and (out / "results" / "detector.csv").is_file()


def test_rendered_caption_text_is_dropped_by_the_text_spot_stage(smoke):
    _, _, summary = smoke
    ts = summary["textspot_detector"]
    assert ts["n_rendered"] >= 10
    assert ts["recall"] >= 0.8, ts
    assert ts["precision"] >= 0.8, ts


def test_masked_arm_keeps_the_text_shortcuts_with_their_text_masked(smoke):
    """The masked arm: the full filter run re-decided with --text-action mask; its shards carry masked JPEGs."""
    from experiments.flickr8k import ledger_rows
    out, cfg, summary = smoke
    full, masked = (ledger_rows(out / "work" / "filter" / name) for name in ("full", "masked"))
    n_masked = sum(r["reason"] == "text_masked" for r in masked)
    assert n_masked == sum(r["reason"] == "text_spotted" for r in full) > 0
    assert summary["arms"]["masked"]["n_pairs"] == summary["arms"]["filtered"]["n_pairs"] + n_masked \
        == summary["filter_stats"]["masked"]["n_kept"]
    noisy = {r["key"]: r["jpg"] for r in pq.read_table(out / "work" / "noisy" / "train.parquet",
                                                       columns=["key", "jpg"]).to_pylist()}
    shards = pq.read_table(out / "work" / "filter" / "masked" / "shards", columns=["key", "jpg"]).to_pylist()
    changed = {r["key"] for r in shards if r["jpg"] != noisy[r["key"]]}
    assert changed == {r["key"] for r in masked if r["reason"] == "text_masked"}
    assert "masked - filtered" in summary["comparisons"]


def test_arms_train_the_same_budget_and_are_scored_on_clean_dev(smoke):
    out, cfg, summary = smoke
    for arm, r in summary["arms"].items():
        assert len(r["runs"]) == cfg.seeds
        for run in r["runs"]:
            assert run["samples_seen"] == cfg.steps * cfg.batch_size, arm
            assert 0 <= run["rsum"] <= 600
    assert summary["dev"] == {"n_images": cfg.dev_images, "n_captions": 5 * cfg.dev_images}
    assert summary["arms"]["clean"]["runs"][0]["rsum"] > 0   # learned something above zero on real photos
    res = out / "results"
    for name in ("results.md", "results.csv", "results.json", "recall.png", "detector.md", "detector.csv",
                 "machine.json", "command.txt"):
        assert (res / name).is_file() and (res / name).stat().st_size > 0, name
    assert "filtered - random" in json.loads((res / "results.json").read_text())["comparisons"]


def test_paired_bootstrap_is_zero_for_identical_arms_and_signed_for_better_ones():
    import numpy as np
    from experiments.flickr8k import paired_bootstrap
    t2i = [i for i in range(20) for _ in range(5)]
    good = {"i2t": [np.zeros(20, int)], "t2i": [np.zeros(100, int)]}       # everything at rank 0
    bad = {"i2t": [np.full(20, 50)], "t2i": [np.full(100, 50)]}
    assert paired_bootstrap(good, good, t2i)["rsum_diff"] == 0
    d = paired_bootstrap(good, bad, t2i, n_boot=200)
    assert d["rsum_diff"] == 600 and d["p_two_sided"] == 0


def _write_distributed_layout(root: Path, n: int = 3) -> list[str]:
    """Flickr8k as the archive ships it, built from the shared Parquet copy."""
    images = pq.read_table(FLICKR8K / "images.parquet", columns=["image", "split", "jpg"]).to_pylist()
    dev = [r for r in images if r["split"] == "dev"][:n]
    caps = pq.read_table(FLICKR8K / "captions.parquet").to_pylist()
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    for r in dev:
        (root / "Flicker8k_Dataset" / r["image"]).write_bytes(r["jpg"])
    names = {r["image"] for r in dev}
    lines = [f"{c['image']}#{c['n']}\t{c['caption']}" for c in caps if c["image"] in names]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(r["image"] for r in dev) + "\n")
    return sorted(names)


def test_flickr8k_reads_the_distributed_the_karpathy_and_the_parquet_layouts(tmp_path, shared_data):
    from model_training.caption_sets import load_flickr8k
    names = _write_distributed_layout(tmp_path / "dist")
    dist = load_flickr8k(tmp_path / "dist", "dev")
    assert sorted(dist.image_ids) == names and len(dist.captions) == 15
    karpathy = {"images": [{"filename": n, "split": "val",
                            "sentences": [{"raw": c} for c, i in zip(dist.captions, dist.text_to_image)
                                          if dist.image_ids[i] == n]} for n in names]}
    (tmp_path / "dist" / "dataset_flickr8k.json").write_text(json.dumps(karpathy))
    kp = load_flickr8k(tmp_path / "dist" / "dataset_flickr8k.json", "dev")   # Karpathy calls dev "val"
    assert sorted(kp.image_ids) == names and kp.image_bytes(0) == (tmp_path / "dist" / "Flicker8k_Dataset" /
                                                                    kp.image_ids[0]).read_bytes()
    parquet = load_flickr8k(FLICKR8K, "dev")
    assert len(parquet.image_ids) == 1000 and len(parquet.captions) == 5000
    by_name = dict(zip(parquet.image_ids, range(1000)))
    i = by_name[dist.image_ids[0]]   # the same photo and captions whichever layout it came from
    assert parquet.image_bytes(i) == dist.image_bytes(0)
    assert [c for c, j in zip(parquet.captions, parquet.text_to_image) if j == i] == dist.captions[:5]
    with pytest.raises(FileNotFoundError, match="no Flickr8k layout"):
        load_flickr8k(tmp_path, "dev")


def test_evaluate_cli_reads_flickr8k(tmp_path, shared_data):
    from model_training.evaluate import main
    _write_distributed_layout(tmp_path / "f8k", n=4)
    main(["--model", "catclip-micro", "--flickr8k", str(tmp_path / "f8k"), "--split", "dev",
          "--out", str(tmp_path / "eval")])
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["n_images"] == 4 and m["n_captions"] == 20 and m["task"] == "flickr8k_dev"
    assert 0 <= m["rsum"] <= 600


def test_feature_cache_embeds_each_distinct_image_once_and_refuses_pixel_objectives(tmp_path, shared_data):
    import pyarrow as pa
    from model_training.features import FeatureCache, cache_features
    from model_training.losses import LossConfig
    from model_training.train import TrainConfig, train
    jpgs = pq.read_table(FLICKR8K / "images.parquet", columns=["jpg"]).slice(0, 3).column(0).to_pylist()
    rows = {"key": ["a", "b", "c", "d"], "caption": ["a dog runs"] * 4, "jpg": jpgs + [jpgs[0]]}
    pq.write_table(pa.table(rows), tmp_path / "00000.parquet")
    first = cache_features(str(tmp_path / "00000.parquet"), tmp_path / "feats")
    assert first["rows"] == 4 and first["embedded"] == 3          # the repeated photo once
    again = cache_features(str(tmp_path / "00000.parquet"), tmp_path / "feats")
    assert again["embedded"] == 0 and again["already_cached"] == 3
    cache = FeatureCache(tmp_path / "feats")
    assert len(cache) == 3 and cache.get(jpgs[0]).shape == (1280,) and cache.get(b"not cached") is None
    with pytest.raises(ValueError, match="mim-weight need the full tower"):
        train(TrainConfig(shards=str(tmp_path / "00000.parquet"), run_dir=str(tmp_path / "run"), model="catclip-micro",
                          image_features=str(tmp_path / "feats"), num_workers=0, loss=LossConfig(mim_weight=0.5)))


def test_glyph_cache_copies_the_teacher_vectors_and_appends_a_thumbnail_the_head_reads(tmp_path, shared_data):
    """The reading tower's cache: the teacher's part is the locked cache's vector (copied, not recomputed),
    the rest the 96-px grayscale thumbnail; a FeatureHead built from it has a GlyphCNN whose gradient is
    non-zero (the part that can learn to read trains)."""
    import pyarrow as pa
    import torch
    from model_training.features import FeatureCache, FeatureHead, cache_features, glyph_thumbnails
    jpgs = pq.read_table(FLICKR8K / "images.parquet", columns=["jpg"]).slice(0, 3).column(0).to_pylist()
    pq.write_table(pa.table({"jpg": jpgs + [b"not a jpeg"]}), tmp_path / "imgs.parquet")
    cache_features(str(tmp_path / "imgs.parquet"), tmp_path / "feats")
    stats = cache_features(str(tmp_path / "imgs.parquet"), tmp_path / "glyphs", glyph_side=96, reuse=tmp_path / "feats")
    assert stats["undecodable"] == 1 and len(FeatureCache(tmp_path / "glyphs")) == 3
    locked, glyphs = FeatureCache(tmp_path / "feats"), FeatureCache(tmp_path / "glyphs")
    assert glyphs.glyph_side == 96 and glyphs.dim == locked.dim + 96 * 96
    v = glyphs.get(jpgs[1])
    assert np.array_equal(v[:locked.dim], locked.get(jpgs[1]))
    assert np.array_equal(v[locked.dim:], glyph_thumbnails([jpgs[1]], 96)[0][0].astype(np.float16))
    with pytest.raises(ValueError, match="glyphs"):     # one folder, one kind of vector
        cache_features(str(tmp_path / "imgs.parquet"), tmp_path / "feats", glyph_side=96)
    head = FeatureHead(glyphs.dim, 32, glyph_side=96)
    head(glyphs.lookup(jpgs)).pow(2).sum().backward()
    assert head.glyphs is not None and head.glyphs.convs[0].weight.grad.abs().sum() > 0


def test_ocr_cache_appends_the_words_read_and_the_head_embeds_them_with_the_text_towers_table(tmp_path, shared_data):
    """The ocr tower's cache: the teacher's part copied from the locked cache, then the token ids of the words
    the real text spotter reads (float16-safe split); detections the filter stored for the same bytes are
    reused instead of spotted again. The head reads them through the text tower's token table: gradients
    reach the reader and that table, and an image with nothing read gets no offset."""
    import pyarrow as pa
    import torch
    from open_clip.tokenizer import SimpleTokenizer

    from experiments.webnoise import NoiseConfig, encode_jpeg
    from model_training.features import (FeatureCache, FeatureHead, cache_features, join_token_ids,
                                         split_token_ids)
    from pipeline.media.images import image_digest
    from pipeline.media.render import render_text
    from PIL import Image
    import random
    ids = np.array([[0, 255, 256, 49407, -1], [-1, -1, -1, -1, -1]])
    assert torch.equal(join_token_ids(torch.from_numpy(split_token_ids(ids)).half().float()), torch.from_numpy(ids))
    photos = pq.read_table(FLICKR8K / "images.parquet", columns=["jpg"]).slice(0, 3).column(0).to_pylist()
    photo = Image.open(io.BytesIO(photos[0])).convert("RGB")
    drawn = encode_jpeg(render_text(photo, "yellow submarine", random.Random(3)), NoiseConfig().jpeg_quality)
    jpgs = [drawn, photos[1], photos[2]]
    pq.write_table(pa.table({"jpg": jpgs + [b"not a jpeg"]}), tmp_path / "imgs.parquet")
    cache_features(str(tmp_path / "imgs.parquet"), tmp_path / "feats")
    # a filter output's OCR store, as the image stage writes it: photos[2] "read" as STOP (not spotted again)
    (tmp_path / "filter" / "ocr").mkdir(parents=True)
    stop = [{"text": "STOP", "conf": 0.97, "x0": 5.0, "y0": 5.0, "x1": 40.0, "y1": 20.0, "line": 0},
            {"text": "faint", "conf": 0.3, "x0": 50.0, "y0": 5.0, "x1": 90.0, "y1": 20.0, "line": 0}]
    pq.write_table(pa.table({"key": ["k"], "detections": [stop], "digest": [image_digest(photos[2])]}),
                   tmp_path / "filter" / "ocr" / "p.parquet")
    stats = cache_features(str(tmp_path / "imgs.parquet"), tmp_path / "ocr", ocr_tokens=8, reuse=tmp_path / "feats",
                           ocr_from=[tmp_path / "filter"])
    assert stats["undecodable"] == 1
    locked, ocr = FeatureCache(tmp_path / "feats"), FeatureCache(tmp_path / "ocr")
    assert ocr.ocr_tokens == 8 and ocr.dim == locked.dim + 16 and len(ocr) == 3
    assert np.array_equal(ocr.get(drawn)[:locked.dim], locked.get(drawn))
    tok = SimpleTokenizer()
    read = [tok.decode([int(i) for i in row if i >= 0]).strip() for row in join_token_ids(ocr.lookup(jpgs)[:, locked.dim:])]
    assert "submarine" in read[0].replace(" ", "")      # the rendered words, read by the real spotter
    assert read[2] == "stop"                             # the stored reading; the unconfident word left out
    with pytest.raises(ValueError, match="ocr tokens"):
        cache_features(str(tmp_path / "imgs.parquet"), tmp_path / "ocr", ocr_tokens=4)
    table = torch.nn.Parameter(torch.randn(49408, 24))
    head = FeatureHead(ocr.dim, 32, ocr_tokens=8, token_width=24)
    x = ocr.lookup(jpgs)
    blank = x.clone()
    blank[:, locked.dim:] = -1                           # nothing read
    assert torch.equal(head(x, table), head.net(x[:, :locked.dim]))     # the reader starts silent...
    head(x, table).sum().backward()
    assert head.reader.net[-1].weight.grad.abs().sum() > 0              # ... and learns
    torch.nn.init.normal_(head.reader.net[-1].weight)
    assert torch.equal(head(blank, table), head.net(blank[:, :locked.dim]))  # trained or not: nothing read, no offset
    assert not torch.equal(head(x, table), head.net(x[:, :locked.dim]))
    head.zero_grad()
    head(x, table).pow(2).sum().backward()
    assert head.reader.net[1].weight.grad.abs().sum() > 0 and table.grad.abs().sum() > 0


# ---------------------------------------------------------------- the budget sweep and the reading probe

@pytest.fixture(scope="module")
def budget(smoke, spark):
    """The sweep at smoke scale on the same pool as `smoke` (noise set, filter run and feature cache are
    reused, as a rerun reuses them): 2 budgets, 1 seed, noisy / filtered / random, the probe on."""
    from experiments.budget import parse_config, run_budget_sweep
    out, _, _ = smoke
    bcfg, _ = parse_config(["--scale", "smoke"])
    return out, bcfg, run_budget_sweep(out, bcfg, FLICKR8K, spark=spark)


def test_budget_sweep_runs_every_arm_at_every_budget(budget):
    out, bcfg, summary = budget
    cfg = bcfg.base
    runs = summary["runs"]
    assert len(runs) == len(cfg.arms) * len(bcfg.budgets) * cfg.seeds
    steps = {b: {r["steps"] for r in runs if r["budget"] == b} for b in bcfg.budgets}
    assert all(len(s) == 1 for s in steps.values())       # the same samples seen in every arm
    lo, hi = (steps[b].pop() for b in bcfg.budgets)
    assert hi == round(bcfg.budgets[1] * summary["n_pool_pairs"] / cfg.batch_size) and hi > lo
    for r in runs:
        assert r["samples_seen"] == r["steps"] * cfg.batch_size
    assert [d["budget"] for d in summary["filtered_minus_noisy"]] == list(bcfg.budgets)
    assert summary["crossover"]["statement"]
    assert (out / "results" / "budget.png").stat().st_size > 0
    assert len((out / "results" / "budget.csv").read_text().strip().splitlines()) == len(runs) + 1


def test_reading_probe_draws_text_and_scores_every_model(budget):
    from experiments.budget import PROBES, probe_sets
    from model_training.caption_sets import load_flickr8k
    from experiments.flickr8k import subset_images
    out, bcfg, summary = budget
    dev = subset_images(load_flickr8k(FLICKR8K, "dev"), bcfg.base.dev_images)
    sets = probe_sets(dev, bcfg.base.noise.seed)
    for name in PROBES:
        assert sets[name].captions == dev.captions and sets[name].text_to_image == dev.text_to_image
        assert all(sets[name].image_bytes(i) != dev.image_bytes(i) for i in range(len(dev.image_ids)))
    assert sets["own_text"].image_paths != sets["unrelated_text"].image_paths
    for r in summary["runs"]:
        assert {"rsum", "own_text_rsum", "unrelated_text_rsum"} <= set(r)
    assert len(summary["reading_index"]) == len(summary["runs"])   # one seed: one row per arm and budget
    for r in summary["reading_index"]:
        for name in PROBES + ("own_minus_unrelated",):
            assert r[name]["ci95"][0] <= r[name]["rsum_diff"] <= r[name]["ci95"][1]


def test_crossover_is_interpolated_and_bracketed():
    from experiments.budget import crossover
    diffs = [{"budget": 0.125, "rsum_diff": 5.0, "ci95": [2.0, 8.0]},
             {"budget": 0.5, "rsum_diff": 1.0, "ci95": [-1.0, 3.0]},
             {"budget": 2.0, "rsum_diff": -3.0, "ci95": [-5.0, -1.0]},
             {"budget": 8.0, "rsum_diff": -9.0, "ci95": [-12.0, -6.0]}]
    c = crossover(diffs)
    assert 0.5 < c["estimate"] < 2.0 and abs(c["estimate"] - 0.5 * 4 ** 0.25) < 1e-3   # a quarter of the log way
    assert c["interval"] == [0.125, 2.0] and "wins below" in c["statement"]
    none = crossover([{**d, "rsum_diff": -abs(d["rsum_diff"]) - 1} for d in diffs])
    assert none["estimate"] is None and "loses at every budget" in none["statement"]


def test_reading_tower_sweep_runs_beside_the_locked_one_on_the_same_pool(budget, spark):
    """The ocr tower (the reading preset's) reuses the pool (noise, filter runs and their OCR, teacher
    features), writes its own runs and results, and every model is scored on clean dev and both probe
    variants - whose drawn words it reads."""
    from experiments.budget import parse_config, run_budget_sweep
    from model_training.features import FeatureCache, join_token_ids
    out, _, _ = budget
    bcfg, _ = parse_config(["--scale", "smoke", "--tower", "ocr", "--arms", "noisy,masked", "--budgets", "2"])
    summary = run_budget_sweep(out, bcfg, FLICKR8K, spark=spark)
    assert {(r["arm"], r["budget"]) for r in summary["runs"]} == {("noisy", 2.0), ("masked", 2.0)}
    assert (out / "work" / "runs-ocr" / "budget2" / "masked" / "seed0" / "train_summary.json").is_file()
    assert (out / "results-ocr" / "budget.md").is_file() and (out / "results" / "budget.md").is_file()
    assert summary["config"]["base"]["image_tower"] == "ocr"
    cache = FeatureCache(out / "work" / "features-ocr16")
    own = pq.read_table(out / "work" / "probe_own_text.parquet").column("jpg").to_pylist()
    words_read = (join_token_ids(cache.lookup(own)[:, -32:]) >= 0).any(dim=1)
    assert words_read.float().mean() > 0.8, "the spotter reads the probe's drawn words"
    assert "masked - noisy" in summary["comparisons"] and len(summary["reading_index"]) == 2
