"""The SparkSession the jobs share: local[2] by default, whatever spark-submit says otherwise.

Under spark-submit the master and confs come from its command line (SPARK_MASTER in the Makefile);
called from Python (tests, notebooks) it builds a local session with the settings DESIGN.md lists.
"""
from __future__ import annotations

import os
import sys


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
