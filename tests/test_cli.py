"""The `catcurate` console command and the make targets that call it: commands listed with --help, the
Spark launcher's noise filtered, and user values (paths, *_ARGS) passed verbatim - nothing in them is
ever run by make or a shell (make expands `$(shell ...)` wherever a variable is referenced, even under
`make -n`, so the Makefile reads each one unexpanded)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from catcurate.cli import COMMANDS, QUIET_LINES, _copy_filtered

ROOT = Path(__file__).resolve().parents[1]
CATCURATE = Path(sys.executable).with_name("catcurate")
# shell and make syntax that would run something if any layer expanded it
NASTY = ["x$(shell touch {m}1)", "x`touch {m}2`", "x; touch {m}3", "x' \"q\" $(touch {m}4) y", "a b  $$(touch {m}5)"]


def _run(cmd, **kw):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)
    return proc


def test_help_lists_every_command():
    proc = _run([str(CATCURATE), "--help"])
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert name in proc.stdout
    bad = _run([str(CATCURATE), "nonsense"])
    assert bad.returncode == 2 and "unknown command 'nonsense'" in bad.stderr


def test_each_command_has_help():
    for name, needle in (("filter", "--min-complexity"), ("redecide", "--source"), ("train", "--shards"),
                         ("distill", "--teacher")):
        proc = _run([str(CATCURATE), name, "--help"])
        assert proc.returncode == 0 and needle in proc.stdout, (name, proc.stderr[-2000:])
    assert "--master" in _run([str(CATCURATE), "filter", "--help"]).stdout


def test_launcher_noise_is_dropped_and_progress_kept(tmp_path):
    src = tmp_path / "err"
    src.write_bytes(b"WARNING: Using incubator modules: jdk.incubator.vector\n[Stage 0:>  (0 + 1) / 1]\r"
                    b"26/12/06 14:00:00 WARN NativeCodeLoader: Unable to load native-hadoop library for your "
                    b"platform... using builtin-java classes where applicable\nreal error line\n")
    out = tmp_path / "out"
    with open(src, "rb") as a, open(out, "wb") as b:
        _copy_filtered(a, b)
    assert out.read_bytes() == b"[Stage 0:>  (0 + 1) / 1]\rreal error line\n"
    assert QUIET_LINES.match(b"WARNING: Using incubator modules: jdk.incubator.vector\n")


@pytest.mark.parametrize("target,var", [("filter", "INPUT"), ("filter", "OUTPUT"), ("distill", "LABELS"),
                                        ("train-eval", "RUN"), ("clean", "RUN"), ("filter", "FILTER_ARGS"),
                                        ("redecide", "INTO"), ("filter", "SPARK_MASTER")])
def test_make_never_runs_a_variable_even_dry(tmp_path, target, var):
    marker = tmp_path / "PWNED"
    for value in NASTY:
        proc = _run(["make", "-n", target, f"{var}={value.format(m=marker)}"])
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir()), f"make ran part of {var}: {list(tmp_path.iterdir())}"


def test_paths_and_args_reach_the_job_verbatim(tmp_path):
    """A real make run: the odd OUTPUT path is named, character for character, in the job's error; the
    odd DECIDE_ARGS value reaches argparse as one literal word."""
    marker = tmp_path / "PWNED"
    odd = str(tmp_path / NASTY[3].format(m=marker))
    proc = _run(["make", "-s", "redecide", f"OUTPUT={odd}", f"INTO={tmp_path / 'into'}"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert odd in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    value = NASTY[0].format(m=marker)
    proc = _run(["make", "-s", "redecide", f"OUTPUT={tmp_path}", f"INTO={tmp_path / 'into'}",
                 f"DECIDE_ARGS=--min-chars '{value}'"])
    assert proc.returncode == 2 and f"invalid int value: '{value}'" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.glob("PWNED*"))


def test_spark_submit_master_and_conf_reach_the_job_session(tmp_path):
    """`catcurate filter --master URL --conf K=V` goes through spark-submit: the session the job builds
    (jobs.spark.get_spark) must be on that master with that conf, not on get_spark's own default."""
    from catcurate.cli import spark_env, spark_submit_command
    script = tmp_path / "which_master.py"
    script.write_text("from jobs.spark import get_spark\n"
                      "sc = get_spark('probe').sparkContext\n"
                      "print('SEEN', sc.master, sc.getConf().get('spark.sql.shuffle.partitions'), "
                      "sc.getConf().get('spark.executor.memory'), flush=True)\n")
    cmd = spark_submit_command(str(script), [], "local[1]", ["spark.sql.shuffle.partitions=3",
                                                               "spark.executor.memory=600m"])
    proc = subprocess.run(cmd, env=spark_env(), capture_output=True, text=True, timeout=300)
    seen = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("SEEN")]
    assert seen == [["local[1]", "3", "600m"]], proc.stderr[-3000:]
