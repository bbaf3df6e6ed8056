"""`catcurate`: one console command for every job, the same functions the make targets run.

    catcurate --help
    catcurate filter                                   # the embedded sample -> out/filter (as `make filter`)
    catcurate filter --input laion/ --output out/laion --master spark://host:7077 --conf spark.executor.memory=8g
    catcurate distill --input out/filter --output out/labels
    catcurate redecide --source out/filter --into out/c2 --min-complexity 2
    catcurate train --shards out/filter/shards --run runs/tiny --max-steps 300
    catcurate retry-downloads --output out/filter              # only the transient download failures, again
    catcurate datacomp-subset out/filter                       # OUTPUT/datacomp/subset_uids.npy
    catcurate train-eval | evaluate | experiment | experiment-budget | finetune | ablate | sample   (--help)

Spark jobs (filter, distill, retry-downloads) go through the venv's spark-submit with the defaults the Makefile used
(local[2], UI off, conf/log4j2.properties), so `--master` and `--conf` reach Spark and everything else
reaches the job; the other commands run their module in this process, as `python -m MODULE` would.
Everything a command is given is passed on verbatim: no value is ever handed to a shell.
"""
from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path("data/sample/captions.parquet")          # relative to the working folder, as in the Makefile
LOG4J = ROOT / "conf" / "log4j2.properties"
# what the make targets pass as the user's options (FILTER_ARGS, ...): a command line, split here, never
# by a shell (tests/test_cli.py: `$(...)`, backticks, `;` reach the job as plain text)
EXTRA_ARGS_ENV = "CATCURATE_EXTRA_ARGS"

# name -> (kind, target, defaults filled in when the option is absent, one-line summary)
COMMANDS = {
    "filter": ("spark", "jobs/cat_filter.py", {"--input": None, "--output": "out/filter"},
               "CAT filter: caption rules -> download -> text spotting; ledger, shards, report (Spark)"),
    "distill": ("spark", "jobs/distill_labels.py", {"--input": "out/filter", "--output": "out/labels"},
                "sparse top-k concept labels from a frozen teacher for the filter's shards (Spark)"),
    "retry-downloads": ("spark", "jobs/retry_downloads.py", {"--output": "out/filter"},
                        "re-fetch only the rows whose download failed for a transient reason; finalise again"),
    "datacomp-subset": ("python", "pipeline.filter.datacomp", {},
                        "write OUTPUT/datacomp/subset_uids.npy (DataComp's filtering-track file) for an output"),
    "redecide": ("python", "jobs.redecide", {"--source": "out/filter", "--into": "out/redecided"},
                 "new thresholds from a filter output's stored evidence, or a threshold sweep (no OCR rerun)"),
    "train": ("python", "model_training.train", {}, "pre-train a dual encoder on shards (torchrun for DDP)"),
    "train-eval": ("python", "model_training.train_eval", {"--shards": "out/filter/shards",
                                                           "--labels": "out/labels", "--run": "runs/default"},
                   "smoke run: a short training on the filter's shards, then retrieval on held-out pairs"),
    "evaluate": ("python", "model_training.evaluate", {}, "retrieval R@1/5/10 (COCO / Flickr protocol) of a checkpoint"),
    "experiment": ("python", "experiments.flickr8k", {}, "the Flickr8k evidence experiment (filter vs noisy vs random ...)"),
    "experiment-budget": ("python", "experiments.budget", {},
                          "the Flickr8k experiment over a sweep of training budgets, with the reading probe"),
    "finetune": ("python", "experiments.finetune", {}, "zero-shot vs fine-tuned retrieval on Flickr8k"),
    "ablate": ("python", "model_training.ablate", {}, "every objective preset at toy size: table and chart"),
    "sample": ("python", "pipeline.filter.sample", {"--output": str(SAMPLE)}, "write the embedded default sample"),
}
# lines Spark's launcher prints that a user cannot act on
QUIET_LINES = re.compile(rb"^(WARNING: Using incubator modules: .*"
                         rb"|.*NativeCodeLoader: Unable to load native-hadoop library.*)\r?\n?$")


def _given(args: list[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in args)


def _with_defaults(name: str, args: list[str]) -> list[str]:
    out = list(args)
    for option, default in COMMANDS[name][2].items():
        if _given(out, option) or any(a in ("-h", "--help") for a in out):
            continue
        if name == "filter" and option == "--input":
            default = str(ensure_sample())
        out += [option, default]
    return out


def ensure_sample() -> Path:
    """The embedded default sample, generated once (as `make sample`)."""
    if not SAMPLE.exists():
        from pipeline.filter.sample import make_sample
        print(f"catcurate: no --input: generating the embedded sample at {SAMPLE}", file=sys.stderr)
        make_sample(str(SAMPLE))
    return SAMPLE


def spark_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def spark_submit_command(job: str, args: list[str], master: str, confs: list[str],
                         spark_args: list[str] = ()) -> list[str]:
    submit = Path(sys.executable).with_name("spark-submit")
    cmd = [str(submit) if submit.exists() else "spark-submit", "--master", master,
           "--conf", "spark.ui.enabled=false"]
    if not re.search(r"\s", str(LOG4J)):   # spark re-splits --driver-java-options on white space
        cmd += ["--driver-java-options", f"-Dlog4j2.configurationFile={LOG4J}"]
    for conf in confs:
        cmd += ["--conf", conf]
    return cmd + list(spark_args) + [str(ROOT / job), *args]


def _copy_filtered(src, dst) -> None:
    """Copy a child's stderr, dropping QUIET_LINES; progress bars (\\r updates) pass through at once."""
    buf = b""
    while True:
        chunk = src.read1(65536) if hasattr(src, "read1") else src.read(65536)
        if not chunk:
            break
        buf += chunk
        while True:
            cut = max(buf.rfind(b"\n"), buf.rfind(b"\r"))
            if cut < 0:
                break
            head, buf = buf[:cut + 1], buf[cut + 1:]
            for line in head.splitlines(keepends=True):
                if not QUIET_LINES.match(line):
                    dst.write(line)
            dst.flush()
    if buf and not QUIET_LINES.match(buf):
        dst.write(buf)
        dst.flush()


def run_spark_job(job: str, args: list[str], master: str, confs: list[str], spark_args: list[str] = ()) -> int:
    if any(a in ("-h", "--help") for a in args):   # the job parses its options before starting Spark
        return subprocess.call([sys.executable, str(ROOT / job), *args], env=spark_env())
    proc = subprocess.Popen(spark_submit_command(job, args, master, confs, spark_args), env=spark_env(),
                            stderr=subprocess.PIPE)
    copier = threading.Thread(target=_copy_filtered, args=(proc.stderr, sys.stderr.buffer), daemon=True)
    copier.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:   # the job got the same Ctrl-C (one process group) and says what happened
        code = proc.wait()
    copier.join(timeout=5)
    return code


def run_module(module: str, args: list[str]) -> int:
    argv = sys.argv
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="catcurate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Curate image-text data with the CAT filter, distil concept labels, pre-train and evaluate "
                    "dual encoders.\nEach command's own options: catcurate COMMAND --help.",
        epilog="Spark commands (filter, distill) also take:\n"
               "  --master URL        Spark master (default: $SPARK_MASTER or local[2])\n"
               "  --conf KEY=VALUE    a Spark setting, repeatable (e.g. spark.executor.memory=8g)\n"
               "  --spark-args 'ARGS' other spark-submit options, as one string (e.g. '--driver-memory 8g')")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, _, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        ap = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            ap.print_usage(sys.stderr)
            print(f"catcurate: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})",
                  file=sys.stderr)
            return 2
        ap.print_help()
        return 0
    name, args = argv[0], argv[1:] + shlex.split(os.environ.pop(EXTRA_ARGS_ENV, "") or "")
    kind, target = COMMANDS[name][:2]
    if kind == "python":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        return run_module(target, _with_defaults(name, args))
    launcher = argparse.ArgumentParser(add_help=False)
    launcher.add_argument("--master", default=os.environ.get("SPARK_MASTER") or "local[2]")
    launcher.add_argument("--conf", action="append", default=[])
    launcher.add_argument("--spark-args", default="")
    known, rest = launcher.parse_known_args(args)
    if any(a in ("-h", "--help") for a in rest):
        print(f"catcurate {name}: runs {target} through spark-submit; besides the options below it takes "
              f"--master URL (default: $SPARK_MASTER or local[2]), --conf KEY=VALUE (repeatable) and "
              f"--spark-args 'SPARK-SUBMIT OPTIONS'.\n")
    return run_spark_job(target, _with_defaults(name, rest), known.master, known.conf, shlex.split(known.spark_args))


if __name__ == "__main__":
    sys.exit(main())
