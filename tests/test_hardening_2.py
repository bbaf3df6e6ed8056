"""Hardening, part 2 (issue 25): content identity for resume and re-decide, outputs apart from inputs,
webdataset keys every reader takes, labels from another run, one-line errors, zombie lock holders,
over-long CSV fields. Small real inputs; the Spark session of conftest where a job must run."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cat_filter import cat_filter, main as filter_main
from pipeline.store import partitions as P
from tests.conftest import ROOT

CAPTIONS = ["A dog chasing a red ball on the grass", "Stainless Steel Water Bottle 750ml",
            "A young girl riding a white horse", "A man is throwing a blue frisbee"]


def small_input(folder, name="in.parquet") -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    pq.write_table(pa.table({"URL": [f"http://x/{i}" for i in range(len(CAPTIONS))], "TEXT": CAPTIONS}), path)
    return path


def tree(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


# ---------------------------------------------------------------- 2: outputs apart from inputs

def test_output_equal_to_inside_or_around_the_input_is_refused_naming_both(tmp_path, capsys):
    inp = small_input(tmp_path / "in")
    (tmp_path / "in" / "sub").mkdir()
    os.symlink(tmp_path / "in", tmp_path / "link")
    cases = [(str(tmp_path / "in"), str(tmp_path / "in")),                       # OUTPUT == INPUT folder
             (str(tmp_path / "in"), str(tmp_path / "in" / "out")),               # inside it
             (str(tmp_path / "in"), str(tmp_path / "link" / "sub" / ".." / "out")),  # via a symlink and '..'
             (inp, inp),                                                         # the INPUT file as OUTPUT
             (inp, str(tmp_path)),                                               # OUTPUT containing INPUT
             (str(tmp_path / "in" / "**" / "*.parquet"), str(tmp_path / "in" / "sub" / "o"))]  # recursive glob
    before = tree(tmp_path / "in")
    for given_in, given_out in cases:
        with pytest.raises(P.InputError, match=r"OUTPUT .* (is|is inside|contains) INPUT .*outputs must lie apart"):
            cat_filter(given_in, given_out, stages="caption")
        assert filter_main(["--input", given_in, "--output", given_out, "--stages", "caption"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cat_filter: error: OUTPUT") and "\n" not in err and os.path.abspath(given_out) in err
    assert tree(tmp_path / "in") == before, "nothing written into the input"
    # a glob of one folder level with OUTPUT beside its files is fine (the pattern cannot reach it)
    P.check_apart({"INPUT": str(tmp_path / "in" / "*.parquet")}, {"OUTPUT": str(tmp_path / "in" / "out")})


def test_apart_check_on_stores_and_for_every_job():
    with pytest.raises(P.InputError, match="is inside"):
        P.check_apart({"INPUT": "s3://bucket/laion"}, {"OUTPUT": "s3a://bucket/laion/out/"})
    with pytest.raises(P.InputError, match="contains"):
        P.check_apart({"INPUT": "s3://bucket/laion/a.parquet"}, {"OUTPUT": "s3://bucket/laion"})
    P.check_apart({"INPUT": "s3://bucket/laion"}, {"OUTPUT": "s3://bucket/laion-out"})   # a prefix, not a folder
    P.check_apart({"INPUT": "s3://bucket/laion"}, {"OUTPUT": "s3://other/laion"})


def test_labels_run_and_into_inside_their_inputs_are_refused(tmp_path):
    from jobs.distill_labels import distill_labels
    from jobs.redecide import redecide
    from model_training.config import TrainConfig
    from model_training.train import train
    out = tmp_path / "filter"
    (out / "shards").mkdir(parents=True)
    small_input(out / "shards", "00000.parquet")
    with pytest.raises(P.InputError, match="OUTPUT .* is inside INPUT"):
        distill_labels(str(out), str(out / "labels"))
    with pytest.raises(P.InputError, match="--run .* is inside --shards"):
        train(TrainConfig(shards=str(out / "shards"), run_dir=str(out / "shards" / "run")))
    inp = small_input(tmp_path / "in")
    (out / "manifest.json").write_text(json.dumps({"finished": "x", "resume_identity": {"input": {"path": os.path.dirname(inp)}}}))
    with pytest.raises(P.InputError, match="INTO .* is inside the source's INPUT"):
        redecide(str(out), str(tmp_path / "in" / "c2"), min_complexity=2)
    with pytest.raises(P.InputError, match="INTO .* is inside SOURCE"):
        redecide(str(out), str(out / "c2"), min_complexity=2)
    assert tree(tmp_path / "in") == ["in.parquet"] and not (out / "labels").exists() and not (out / "c2").exists()


# ---------------------------------------------------------------- 1: content identity for resume and re-decide

def _csv(path, captions):
    with open(path, "w") as fh:
        fh.write("URL,TEXT\n" + "".join(f"http://x/{i},{c}\n" for i, c in enumerate(captions)))
    return str(path)


def _same_length_edit(path, old: bytes, new: bytes):
    """Replace bytes in place, same length, and put the mtime back (touch -r)."""
    assert len(old) == len(new)
    st = os.stat(path)
    data = open(path, "rb").read()
    assert data.count(old) == 1
    open(path, "wb").write(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.path.getsize(path) == st.st_size


def test_a_same_length_csv_edit_with_the_mtime_put_back_is_a_changed_input(spark, tmp_path):
    src = _csv(tmp_path / "in.csv", ["A dog chasing a red ball on the grass", "A young girl riding a white horse"])
    out = tmp_path / "out"
    cat_filter(src, str(out), spark=spark, stages="caption")
    _same_length_edit(src, b"red ball", b"big cats")
    plan = P.plan_input(src, 100, work_dir=str(tmp_path / "work"))     # the conversion is redone, not reused
    assert b"big cats" in b"".join(P.read_chunk(plan.chunks[0], ["TEXT"]).column(0).to_pylist())
    with pytest.raises(P.ParamsChanged, match=r"input file\(s\) changed since .*: in\.csv; refusing to resume"):
        cat_filter(src, str(out), spark=spark, stages="caption")


@pytest.fixture(scope="module")
def image_source(spark, coco_parquet, tmp_path_factory):
    """A finished filter run on 10 COCO pairs, written uncompressed so an image can be swapped in place;
    content tags hash only the first and last KiB of Parquet files (as they do the first and last MiB of
    large files), so the swap leaves the file's tag unchanged."""
    base = tmp_path_factory.mktemp("content")
    inp = str(base / "in" / "coco.parquet")
    os.makedirs(os.path.dirname(inp))
    pq.write_table(pq.read_table(coco_parquet).slice(0, 10), inp, compression="none", use_dictionary=False,
                   write_statistics=False)
    mp = pytest.MonkeyPatch()
    mp.setattr(P, "HEAD_TAIL_BYTES", 1024)
    out = str(base / "source")
    cat_filter(inp, out, spark=spark, rows_per_part=5)
    yield {"input": inp, "source": out, "base": base}
    mp.undo()


def _copy_source(image_source, tmp_path) -> str:
    import shutil
    dst = str(tmp_path / "source")
    shutil.copytree(image_source["source"], dst)
    return dst


def test_redecide_refuses_to_copy_an_image_that_is_not_the_one_spotted(image_source, tmp_path):
    import io

    from PIL import Image

    from jobs.redecide import main as redecide_main, redecide
    from pipeline.filter.image_stage import ChangedImage
    src = image_source["source"]
    kept = pq.read_table(os.path.join(src, "shards")).column("key").to_pylist()
    assert kept, "some pairs kept"
    row = next(r for r in pq.read_table(image_source["input"]).to_pylist() if r["key"] == kept[0])
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="JPEG")
    swapped = buf.getvalue() + b"\0" * (len(row["jpg"]) - len(buf.getvalue()))
    inp = str(tmp_path / "in" / "coco.parquet")   # the source's input, moved and edited
    os.makedirs(os.path.dirname(inp))
    import shutil
    shutil.copy2(image_source["input"], inp)
    _same_length_edit(inp, row["jpg"], swapped)
    manifest_path = os.path.join(_copy_source(image_source, tmp_path), "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["resume_identity"]["input"]["path"] = os.path.dirname(inp) if False else inp
    json.dump(manifest, open(manifest_path, "w"))
    source = os.path.dirname(manifest_path)
    assert P.changed_files(manifest["resume_identity"]["input"]["content"], P.input_content(inp)) == []
    with pytest.raises(ChangedImage, match=rf"key {kept[0]!r}.*input changed since.*coco\.parquet"):
        redecide(source, str(tmp_path / "into"), min_conf=0.7, engine="local")
    assert redecide_main(["--source", source, "--into", str(tmp_path / "into2"), "--min-conf", "0.7"]) == 2
    assert not os.path.exists(os.path.join(tmp_path, "into", "stats.json"))
