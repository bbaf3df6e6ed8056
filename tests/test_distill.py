"""Concept distillation: teacher, vocabularies, classifiers, top-k labels and the Spark job.

Run: cd /work/main && PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_distill.py
The job tests run distill_labels once on FILTERED-style shards built from ../shared/data/coco-mini
(80 real images x 5 captions, parsed by pipeline.filter.captions, plus two broken rows), then resume it.
"""
import json
from importlib import metadata
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bench.bench_distill import build_coco_filtered
from pipeline.distill.concepts import (ATTRIBUTES, OBJECTS, VocabConfig, build_vocabularies, count_concepts,
                               row_concepts, targets_csr)
from pipeline.distill.labels import (DistillConfig, evaluate_head, is_heldout, split_id_of, sqrt_sampling_weights,
                              topk_labels, train_head)
from pipeline.distill.teacher import load_teacher
from schemas import FAILED, LABELS, LEDGER, R_EMBED_FAILED, SHARD, STAGE_DISTILL
from tests.conftest import COCO_MINI, ROOT

HELDOUT = 0.25   # ~20 of 80 images: enough held-out images for the accuracy checks
CORRUPT_KEY, NO_BYTES_KEY = "corrupt_jpeg", "missing_bytes"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """This process trains the classifiers; on 2 CI cores shared with Spark workers, torch's
    default 2 threads spin against each other (measured 5x slower than 1 thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, shared_data):
    """FILTERED/shards/0000{0,1}.parquet (schemas.SHARD): one row per (COCO image, caption), parsed
    by pipeline.filter.captions, plus a corrupt JPEG and a row without bytes inside shard 00001."""
    root = build_coco_filtered(tmp_path_factory.mktemp("filtered"), captions_per_image=5)
    last = root / "shards" / "00001.parquet"
    rows = pq.read_table(last).to_pylist()
    broken = [dict(rows[0], key=CORRUPT_KEY, jpg=b"\xff\xd8\xff\xe0 this is not a jpeg"),
              dict(rows[1], key=NO_BYTES_KEY, jpg=None)]
    pq.write_table(SHARD.from_rows(rows[:7] + broken + rows[7:]), last, row_group_size=64)
    return root


@pytest.fixture(scope="module")
def run(filtered, tmp_path_factory, spark):
    from jobs.distill_labels import distill_labels
    out = tmp_path_factory.mktemp("labels")
    summary = distill_labels(str(filtered), str(out), k=10, min_count=2, heldout_fraction=HELDOUT, spark=spark)
    return out, summary


def _read(path):
    return pq.read_table(path)


# ------------------------------------------------------------------ unit tests (no Spark)
def test_topk_labels_sorted_normalised_and_typed():
    logits = torch.randn(50, 30, generator=torch.Generator().manual_seed(0)) * 3
    logits[0] = 0.0  # all ties: order must fall back to the index
    idx, probs = topk_labels(logits, 10)
    assert idx.dtype == np.int32 and probs.dtype == np.float32 and idx.shape == probs.shape == (50, 10)
    assert np.all(np.diff(probs, axis=1) <= 0)
    assert np.allclose(probs.sum(1), 1, atol=1e-3)
    assert idx[0].tolist() == list(range(10))
    full = torch.softmax(logits.double(), -1).numpy()
    assert np.array_equal(idx[1:, 0], full[1:].argmax(1))
    assert topk_labels(logits[:, :4], 10)[0].shape == (50, 4)  # vocabulary smaller than k


def test_sqrt_upsampling_favours_rare_concepts():
    offsets, indices = targets_csr([[0], [0], [0], [0], [1], [0, 1]])
    counts = np.bincount(indices, minlength=2)  # concept 0 in 5 rows, concept 1 in 2
    w = sqrt_sampling_weights(offsets, indices, np.arange(6), counts)
    assert w[4] > w[5] > w[0] and np.isclose(w.mean(), 1.0)
    assert np.isclose(w[4] / w[0], np.sqrt(5 / 2))


def test_heldout_split_is_deterministic_and_sized():
    ids = [f"img{i}" for i in range(4000)]
    a = [is_heldout(i, 0.2, seed=0) for i in ids]
    assert a == [is_heldout(i, 0.2, seed=0) for i in ids]
    assert 0.17 < np.mean(a) < 0.23
    assert a != [is_heldout(i, 0.2, seed=1) for i in ids]
    assert split_id_of(b"same", "k1") == split_id_of(b"same", "k2")  # captions of one image stay together


def test_vocabulary_counts_per_row_min_count_and_order():
    table = pa.table({OBJECTS: [["Dog", "dog", "ball"], ["dog"], ["cat"], ["ball"], ["dog"]],
                      ATTRIBUTES: [[{"object": "dog", "values": ["Brown", "small"]}], [], [],
                                   [{"object": "ball", "values": ["red"]}], [{"object": "dog", "values": ["brown"]}]]})
    counts = count_concepts([table])
    assert counts[OBJECTS] == {"dog": 3, "ball": 2, "cat": 1}
    with pytest.raises(ValueError, match="attributes vocabulary"):
        build_vocabularies(counts, VocabConfig(min_count=2))  # only 'brown' reaches 2 attribute rows
    vocabs = build_vocabularies(counts, VocabConfig(min_count=1, max_objects=2))
    assert vocabs[OBJECTS].concepts == ("dog", "ball") and vocabs[OBJECTS].counts == (3, 2)
    assert vocabs[ATTRIBUTES].concepts[0] == "brown"
    assert vocabs[OBJECTS].encode(row_concepts(["cat", "ball", "dog"], [])[0]) == [0, 1]


def test_teacher_is_frozen_deterministic_and_records_preprocessing():
    from PIL import Image
    teacher = load_teacher("efficientnet-lite0", device="cpu")
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    jpgs = [(COCO_MINI / "images" / f).read_bytes() for f in sorted(os.listdir(COCO_MINI / "images"))[:3]]
    e1, err = teacher.embed_bytes(jpgs + [b"garbage"], batch_size=2)
    e2, _ = teacher.embed_bytes(jpgs, batch_size=2)
    assert e1.shape == (3, 1280) and e1.dtype == np.float32 and list(err) == [3]
    assert np.array_equal(e1, e2) and not np.allclose(e1[0], e1[1])
    pre = teacher.describe()["preprocessing"]
    assert pre["image_size"] == 224 and pre["mean"] == (0.5, 0.5, 0.5) and pre["std"] == (0.5, 0.5, 0.5)
    x = teacher.preprocess(Image.new("RGB", (300, 200), (255, 255, 255)))
    assert x.shape == (3, 224, 224) and torch.allclose(x, torch.ones_like(x))  # white -> +1 ([-1, 1] inputs)


def test_timm_and_open_clip_teachers_load_local_checkpoints(tmp_path):
    import open_clip
    import timm
    from safetensors.torch import save_file
    ckpt = tmp_path / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), str(ckpt))
    t = load_teacher(f"timm:test_resnet:{ckpt}", device="cpu")
    assert not any(p.requires_grad for p in t.model.parameters())
    jpg = (COCO_MINI / "images" / sorted(os.listdir(COCO_MINI / "images"))[0]).read_bytes()
    assert t.embed_bytes([jpg])[0].shape == (1, t.embed_dim)

    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "tiny-test-clip.json").write_text(json.dumps({"embed_dim": 16, "vision_cfg": {
        "image_size": 32, "layers": 1, "width": 64, "patch_size": 16}, "text_cfg": {
        "context_length": 8, "vocab_size": 64, "width": 64, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(str(cfg_dir))
    clip_ckpt = tmp_path / "tiny.safetensors"
    save_file(open_clip.create_model("tiny-test-clip").state_dict(), str(clip_ckpt))
    t = load_teacher(f"open_clip:tiny-test-clip:{clip_ckpt}", device="cpu")
    emb = t.embed_bytes([jpg])[0]
    assert emb.shape == (1, 16) and np.isclose(np.linalg.norm(emb), 1, atol=1e-4)
    assert t.describe()["preprocessing"]["image_size"] == 32
    with pytest.raises(FileNotFoundError):
        load_teacher("timm:test_resnet:/nonexistent.safetensors")
    with pytest.raises(ValueError, match="unknown teacher spec"):
        load_teacher("resnet")


def test_classifier_beats_frequency_baseline_on_separable_embeddings():
    # concept c lives in direction c of the embedding; the frequency baseline can only guess "0"
    rng = np.random.default_rng(0)
    labels = rng.choice(8, size=400, p=[0.4] + [0.6 / 7] * 7)
    X = rng.normal(size=(400, 16)).astype(np.float32) * 0.2
    X[np.arange(400), labels] += 3.0
    offsets, indices = targets_csr([[int(c)] for c in labels])
    cfg = DistillConfig(min_steps=300, seed=0)
    head, info = train_head(X, offsets, indices, 8, np.arange(300), cfg)
    report = evaluate_head(head, X, offsets, indices, np.arange(300, 400), info["train_concept_counts"])
    assert report["top1"] > 0.9 and report["baseline_top1"] < 0.6
    again, _ = train_head(X, offsets, indices, 8, np.arange(300), cfg)
    assert np.array_equal(head.weight, again.weight)  # seeded: bit-identical


# ------------------------------------------------------------------ the job on coco-mini
def test_every_row_labelled_with_sorted_normalised_topk(run, filtered):
    out, summary = run
    vocab = json.loads((out / "vocab.json").read_text())
    n_inputs = 0
    for shard in sorted((filtered / "shards").glob("*.parquet")):
        inp, lab = _read(shard), _read(out / "shards" / shard.name)
        assert lab.schema.equals(LABELS.arrow)
        assert lab.column("key").to_pylist() == inp.column("key").to_pylist()  # row-aligned
        n_inputs += inp.num_rows
        for row in lab.to_pylist():
            if row["key"] in (CORRUPT_KEY, NO_BYTES_KEY):
                assert row["object_indices"] is None and row["attribute_probs"] is None
                continue
            for prefix, head in (("object", OBJECTS), ("attribute", ATTRIBUTES)):
                idx, probs = row[f"{prefix}_indices"], np.array(row[f"{prefix}_probs"])
                assert len(idx) == len(probs) == min(10, vocab[head]["size"])
                assert len(set(idx)) == len(idx) and max(idx) < vocab[head]["size"]
                assert np.all(np.diff(probs) <= 0) and abs(probs.sum() - 1) < 1e-3
    assert summary["n_rows"] == n_inputs == 402
    assert summary["n_labelled"] == 400 and summary["n_failed"] == 2
    assert pa.types.is_int32(lab.schema.field("object_indices").type.value_type)


def test_failed_images_get_ledger_rows(run):
    out, _ = run
    ledger = pq.read_table(out / "ledger").to_pylist()
    assert {r["key"] for r in ledger} == {CORRUPT_KEY, NO_BYTES_KEY}
    for r in ledger:
        assert (r["status"], r["stage"], r["reason"]) == (FAILED, STAGE_DISTILL, R_EMBED_FAILED)
        assert r["error_message"] and r["caption"] and r["source_file"] == "00001.parquet"
    assert pq.read_table(out / "ledger").schema.equals(LEDGER.arrow)


def test_vocab_and_teacher_json_record_the_run(run):
    out, _ = run
    vocab = json.loads((out / "vocab.json").read_text())
    objs = vocab[OBJECTS]
    assert vocab["config"]["min_count"] == 2 and min(objs["counts"]) >= 2
    assert objs["counts"] == sorted(objs["counts"], reverse=True)
    assert all(c == c.lower().strip() for c in objs["concepts"]) and "dog" in objs["concepts"]
    assert "dogs" not in objs["concepts"]  # lemmatised
    teacher = json.loads((out / "teacher.json").read_text())
    assert teacher["teacher"]["spec"] == "efficientnet-lite0" and teacher["teacher"]["frozen"]
    assert teacher["teacher"]["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    storage = teacher["labels_storage"]
    assert storage["sparse_bytes_per_sample"] == 160
    assert storage["dense_float32_bytes_per_sample"] == 4 * (objs["size"] + vocab[ATTRIBUTES]["size"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["k"] == 10 and manifest["versions"]["torch"] == metadata.version("torch")
    assert manifest["resume_identity"]["input_fingerprint"]


def test_heldout_object_accuracy_clearly_above_frequency_baseline(run):
    out, _ = run
    objects = json.loads((out / "teacher.json").read_text())["classifiers"][OBJECTS]
    assert objects["n_heldout_rows"] >= 50
    assert objects["top5"] >= objects["baseline_top5"] + 0.1, objects
    assert objects["top1"] > objects["baseline_top1"], objects


def test_heldout_images_top5_labels_name_a_caption_object(run, filtered):
    out, _ = run
    concepts = json.loads((out / "vocab.json").read_text())[OBJECTS]["concepts"]
    per_image = {}  # split id -> (caption objects of all its rows, top-5 labels of its first row)
    for shard in sorted((filtered / "shards").glob("*.parquet")):
        inp = _read(shard).to_pylist()
        lab = _read(out / "shards" / shard.name).to_pylist()
        for r, l in zip(inp, lab):
            sid = split_id_of(r["jpg"], r["key"])
            if l["object_indices"] is None or not is_heldout(sid, HELDOUT, seed=0):
                continue
            objs, top5 = per_image.setdefault(sid, (set(), [concepts[i] for i in l["object_indices"][:5]]))
            objs.update(row_concepts(r["objects"], r["attributes"])[0])
    assert len(per_image) >= 10
    hits = [bool(objs & set(top5)) for objs, top5 in per_image.values()]
    assert np.mean(hits) > 0.5, f"{sum(hits)}/{len(hits)} held-out images"


def test_rerun_is_identical_and_resume_skips_done_shards(run, filtered, spark):
    from jobs.distill_labels import distill_labels
    out, _ = run
    before = {p.name: _read(p) for p in sorted((out / "shards").glob("*.parquet"))}
    kept = out / "_embeddings" / "00000.parquet"
    mtime = kept.stat().st_mtime_ns
    # simulate a job killed after shard 00000: 00001's embedding, labels and markers never happened
    for p in (out / "_done" / "embed" / "00001.json", out / "_done" / "labels" / "00001.json",
              out / "_embeddings" / "00001.parquet", out / "shards" / "00001.parquet"):
        p.unlink()
    summary = distill_labels(str(filtered), str(out), k=10, min_count=2, heldout_fraction=HELDOUT, spark=spark)
    assert summary["shards_embed_skipped"] == ["00000"] and summary["shards_embedded"] == ["00001"]
    assert kept.stat().st_mtime_ns == mtime
    # classifiers retrained on the same embeddings are bit-identical, so 00000's labels stay valid
    assert summary["shards_label_skipped"] == ["00000"] and summary["shards_labelled"] == ["00001"]
    after = {p.name: _read(p) for p in sorted((out / "shards").glob("*.parquet"))}
    assert after.keys() == before.keys() and all(after[n].equals(before[n]) for n in before)
    assert not list(out.rglob(".tmp-*"))


def test_cli_help():
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "distill_labels.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--teacher" in res.stdout and "open_clip:" in res.stdout


def test_refusal_prints_one_line_not_a_traceback(run, filtered, capsys):
    from jobs.distill_labels import main
    out, _ = run
    other = "timm:resnet18:/no/such/checkpoint.safetensors"
    assert main(["--input", str(filtered), "--output", str(out), "--teacher", other]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distill_labels: error: ")
    assert f"teacher: 'efficientnet-lite0' -> '{other}'" in err and "Traceback" not in err
    assert main(["--input", str(filtered / "no_such_folder"), "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith("distill_labels: error: input ")


DISK_FULL_SCRIPT = r'''
set -u
# 40 KB of 4 KB pages: the lock (1 page), the ledger (2), the embeddings (5) and their marker (1) fit, with a
# page to spare; the classifiers (~270 KB) never do, so the disk fills after the embed step, whatever the order
mount -t tmpfs -o size=40k tmpfs "$LABELS"
distill() { "$PY" jobs/distill_labels.py --input "$INPUT" --output "$LABELS" --min-count 1; }
distill > "$LOGS/1.out" 2> "$LOGS/1.err"; echo $? > "$LOGS/1.rc"
ls -aR "$LABELS" > "$LOGS/1.ls"
mount -o remount,size=64m "$LABELS"
distill > "$LOGS/2.out" 2> "$LOGS/2.err"; echo $? > "$LOGS/2.rc"
cp "$LABELS/manifest.json" "$LOGS/2.manifest.json"   # the tmpfs goes with the namespace
'''


def test_disk_full_stops_with_one_line_no_temporaries_and_the_rerun_resumes(filtered, tmp_path):
    """A real full disk: LABELS is a 40 KB tmpfs mounted in a user namespace (`unshare -rm`, no root),
    grown after the failure. Skipped where the kernel forbids user namespaces."""
    labels, logs, inp = tmp_path / "labels", tmp_path / "logs", tmp_path / "input"
    for d in (labels, logs, inp):
        d.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=32k tmpfs "$0"', str(labels)],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no user namespaces here: cannot mount a small tmpfs without root")
    pq.write_table(pq.read_table(filtered / "shards" / "00000.parquet").slice(0, 16), inp / "00000.parquet")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PY": sys.executable, "INPUT": str(inp), "LABELS": str(labels),
           "LOGS": str(logs), "OMP_NUM_THREADS": "1"}
    subprocess.run(["unshare", "-rm", "bash", "-c", DISK_FULL_SCRIPT], cwd=ROOT, env=env, timeout=600, check=True)
    read = lambda name: (logs / name).read_text()  # noqa: E731
    assert read("1.rc").strip() == "2", read("1.err")[-3000:]
    errors = [line for line in read("1.err").splitlines() if line.startswith("distill_labels: error:")]
    assert len(errors) == 1 and "Traceback" not in read("1.err").split("distill_labels: error:")[-1]
    # which file meets the full disk first depends on sizes (measured: classifiers.safetensors, after the embeddings)
    assert f"no space left on device writing {labels}/" in errors[0] and "MB free" in errors[0], errors[0]
    assert ".tmp-" not in read("1.ls")
    assert read("2.rc").strip() == "0", read("2.err")[-3000:]
    summary = json.loads(read("2.manifest.json"))["summary"]
    assert "labelled 16 of 16 rows" in read("2.out"), read("2.out")
    assert summary["n_labelled"] == 16 and summary["shards_embed_skipped"] == ["00000"]   # resumed
