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
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    # under spark-submit the JVM holds --master and every --conf as system properties; a SparkConf made
    # before the gateway is connected is an empty Python dict, whose default master would override --master
    if "PYSPARK_GATEWAY_PORT" in os.environ:   # under spark-submit (its PythonRunner sets it): connect to its
        SparkContext._ensure_initialized()     # JVM first, so that SparkConf() holds --master and every --conf
    # (in-process, no JVM is started before the conf below is complete: its driver options must reach it)
    conf = SparkConf()
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
    log4j = os.path.join(root, "conf", "log4j2.properties")
    if not any(c.isspace() for c in log4j):   # a session started in-process gets spark-submit's quiet logging too
        conf.setIfMissing("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={log4j}")
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
    if _quiet_interrupts:   # a CLI asked for them (pyspark's context just replaced the SIGINT one)
        install_interrupt_handlers()
    return spark


_quiet_interrupts = False
interrupted = False   # set by the handler: an error raised while unwinding from it (a py4j call in a `finally`
                      # finding the connection broken) is the interrupt too


def install_interrupt_handlers() -> None:
    """Ctrl-C (SIGINT) and SIGTERM become one KeyboardInterrupt in the driver, py4j's logs silenced, so the
    job's `finally` blocks (lock release) run and its CLI prints one line (after stop_quietly). Replaces
    pyspark's own SIGINT handler (get_spark installs them again after the context starts). For command
    lines only: it mutes stderr once interrupted. A no-op outside the main thread."""
    import logging
    import signal
    import threading
    global _quiet_interrupts
    if threading.current_thread() is not threading.main_thread():
        return
    _quiet_interrupts = True

    def handler(signum, frame):
        global interrupted
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not interrupt the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # no py4j call here (one may be in flight); what py4j and pyspark's accumulator thread print as the
        # connection breaks is noise: Python's logging and stderr are muted, the CLI writes to sys.__stderr__
        logging.disable(logging.CRITICAL)
        sys.stderr = open(os.environ.get("CATCURATE_MUTED_STDERR", os.devnull), "a")   # a file to debug with
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def stop_quietly() -> None:
    """After an interrupt, before the one line that says so: end the JVM this process started (python
    jobs/...; under spark-submit the JVM is the parent and ends itself), so no late JVM message follows."""
    try:
        from pyspark import SparkContext
        proc = getattr(SparkContext._gateway, "proc", None)   # the JVM this process started (not spark-submit's)
        if proc is not None:
            proc.kill()   # its tasks are being cancelled anyway; every finished part has its marker
            proc.wait()
    except Exception:  # noqa: BLE001 - the JVM may be gone already
        pass


def failed_job_exit(err: BaseException, job: str, kept: str, to_person, unlocks: str | None = None) -> int:
    """In a CLI's `except (KeyboardInterrupt, Exception)`: an interrupt (or an error raised while unwinding
    from one) becomes one line and exit 130, an object store that stopped answering one line and exit 2;
    any other error is raised again. kept: what survives ("finished parts are kept"); unlocks: the folder
    whose lock the job released on the way out, if it holds one."""
    from pipeline.store import storage
    if isinstance(err, KeyboardInterrupt) or interrupted:
        if interrupted:      # a signal (not a KeyboardInterrupt raised in-process, as a test does)
            stop_quietly()   # the job's lock was released on the way out
        unlocked = f" and {unlocks} is unlocked" if unlocks else ""
        print(f"{job}: interrupted; {kept}{unlocked} - rerun the same command to resume", file=to_person, flush=True)
        return 130
    store = storage.unreachable_store(err)
    if store is None:
        raise err
    # its lock could not be removed: the next run takes it over
    print(f"{job}: error: {store} stopped answering; {kept} - rerun the same command once it is back "
          f"(a lock it could not remove names this run, which is gone, and is taken over)", file=to_person, flush=True)
    return 2


def user_stderr():
    """Where a line for the person goes after an interrupt (call it at start-up, while the parent lives).
    Under spark-submit this process's stderr is a pipe through the JVM, whose forwarding thread ends with
    the JVM on Ctrl-C: the JVM's own stderr (the terminal, or whoever started spark-submit) instead;
    else sys.__stderr__."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/comm") as fh:
            parent = fh.read().strip()
        if os.environ.get("PYSPARK_GATEWAY_PORT") and parent == "java" and not os.isatty(2):
            return open(f"/proc/{ppid}/fd/2", "w")
    except OSError:
        pass
    return sys.__stderr__


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
