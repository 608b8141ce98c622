"""scripts/gpu_check.sh end to end in its CPU mode (--cpu --quick), so the check prepared for the day a GPU is at
hand cannot rot: every part reports a status, none fails, and the benchmarks leave the committed CSVs alone.
About a minute on 2 cores (mostly the three short training runs and the step benchmark's GEMM-peak probes)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["environment", "kernel tests", "attention", "training", "benchmarks", "deepspeed"]


def test_gpu_check_cpu_mode_reports_every_part_and_none_fails(tmp_path):
    results = sorted((ROOT / "benchmarks" / "results").glob("*.csv"))
    before = {p: p.stat().st_size for p in results}
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--cpu", "--quick"],
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
    table = dict(re.findall(r"^\| \d\. ([a-z ]+) \| (PASS|FAIL|SKIP|NOT RUN) \|", report, re.M))
    assert list(table) == PARTS, report
    sections = re.findall(r"^## \d\. ([a-z ]+): (PASS|FAIL|SKIP) \(", report, re.M)
    assert [p for p, _ in sections] == PARTS, report
    assert not [p for p, s in table.items() if s not in ("PASS", "SKIP")], report
    assert table["training"] == "PASS" and "bit for bit" in report, report
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert {p: p.stat().st_size for p in results} == before  # the benchmarks wrote their rows into OUT
    # a device run brings back at most 8 files, 2 folders down: OUT holds these and nothing else
    out = {p.name for p in tmp_path.iterdir()}
    assert out == {"report.md", "gpu_check.log", "kernel_tests.xml", "step.csv", "kernels.csv"}
