"""The SparkSession the jobs share: local[2] by default, whatever spark-submit says otherwise.

Under spark-submit the master and confs come from its command line (SPARK_MASTER in the Makefile);
called from Python (tests, notebooks) it builds a local session with the settings DESIGN.md lists.

read_parquet / write_parquet move tables between Spark and storage for any location (pipeline/store/storage.py):
local paths through Spark's own reader, URIs (s3://, gs://, ...) through pyarrow in the Python workers,
so no Hadoop connector (hadoop-aws, gcs-connector) has to be on the cluster and credentials work the
way they do for every other part of the job.
"""
from __future__ import annotations

import os
import sys

import pyarrow as pa

from pipeline.store import storage

# where an S3-compatible store is and which region: needed by every executor, not secret. Credentials
# are not copied into the Spark conf: executors take them from their own environment or role.
STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")


def get_spark(app_name: str = "catcurate", master: str | None = None):
    # the executors' Python must be this venv's, or Arrow UDFs fail for want of pyarrow
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    conf = SparkConf()  # under spark-submit this already holds --master and every --conf
    if master:
        conf.setMaster(master)
    elif not conf.contains("spark.master"):
        conf.setMaster(os.environ.get("SPARK_MASTER", "local[2]"))
    conf.setAppName(app_name)
    # executors import pipeline/ and schemas/ from this checkout (a remote cluster needs the
    # package installed on its nodes, or --py-files with a zip of this folder)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    conf.setIfMissing("spark.executorEnv.PYTHONPATH", os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    for name in STORE_ENV:
        if os.environ.get(name):
            conf.setIfMissing(f"spark.executorEnv.{name}", os.environ[name])
    for key, value in {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "true",
        # one Python worker per core, reused across tasks, so models load once per worker
        "spark.python.worker.reuse": "true",
        "spark.sql.shuffle.partitions": "8",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # a task failure is usually deterministic bad data handled in pipeline/; retry only flakes
        "spark.task.maxFailures": "2",
    }.items():
        conf.setIfMissing(key, value)
    spark = SparkSession.builder.config(conf=conf).getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("SPARK_LOG_LEVEL", "WARN"))
    return spark


def read_parquet(spark, paths: str | list[str], schema):
    """Parquet files or folders (their visible *.parquet) as a DataFrame of `schema` (a schemas.Table)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not any(storage.is_remote(p) for p in paths):
        return spark.read.schema(schema.spark).parquet(*paths)
    files = [f for p in paths for f in (storage.files(p, ".parquet") if storage.isdir(p) else [p])]
    if not files:
        return spark.createDataFrame([], schema.spark)
    arrow = schema.arrow

    def read(batches):
        for batch in batches:
            for f in batch.column(0).to_pylist():
                yield from storage.read_parquet(f, schema=arrow).to_batches()

    n = max(1, min(len(files), spark.sparkContext.defaultParallelism * 4))
    return (spark.createDataFrame([(f,) for f in files], "path string").repartition(n)
            .mapInArrow(read, schema.spark))


def write_parquet(df, folder: str, by: str | None = None) -> int:
    """Each Spark partition -> folder/part-NNNNN.parquet, or with `by` one file per value in
    folder/<by>=<value>/ (Hive layout, the column left out as Spark does), written once by the Python
    workers through storage (no rename: object stores have none). The folder is emptied first: the
    caller writes its own marker after this returns. Returns the rows written."""
    storage.remove_tree(folder)

    def write(batches):
        import pyarrow.compute as pc
        from pyspark import TaskContext
        name = f"part-{TaskContext.get().partitionId():05d}.parquet"
        batches = list(batches)
        table = pa.Table.from_batches(batches) if batches else pa.table({})
        if table.num_rows:
            if by is None:
                storage.write_parquet(table, storage.join(folder, name))
            else:
                for value in pc.unique(table.column(by)).to_pylist():
                    piece = table.filter(pc.equal(table.column(by), value)).drop_columns([by])
                    storage.write_parquet(piece, storage.join(folder, f"{by}={value}", name))
        yield pa.RecordBatch.from_pydict({"n": [table.num_rows]})

    return sum(r["n"] for r in df.mapInArrow(write, "n long").collect())
