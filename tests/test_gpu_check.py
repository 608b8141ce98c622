"""scripts/gpu_check.sh end to end in its CPU mode (--cpu --quick), so the check prepared for the day a GPU is at
hand cannot rot: every part reports a status, none fails, and the benchmarks leave the committed CSVs alone.
About 1-2.5 minutes on 2 shared cores (mostly the training runs, the two DeepSpeed runs and the step benchmark's
children). And its pieces: the --wheels path (the offline DeepSpeed install) on hand-made wheels, part 5's bound."""

import base64
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["environment", "kernel tests", "attention", "training", "kernels on/off", "benchmarks", "deepspeed"]


def test_gpu_check_cpu_mode_reports_every_part_and_none_fails(tmp_path):
    results = sorted((ROOT / "benchmarks" / "results").glob("*.csv"))
    before = {p: p.stat().st_size for p in results}
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--cpu", "--quick"],
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
    table = dict(re.findall(r"^\| \d\. ([a-z/ ]+) \| (PASS|FAIL|SKIP|NOT RUN) \|", report, re.M))
    assert list(table) == PARTS, report
    sections = re.findall(r"^## \d\. ([a-z/ ]+): (PASS|FAIL|SKIP) \(", report, re.M)
    assert [p for p, _ in sections] == PARTS, report
    assert not [p for p, s in table.items() if s not in ("PASS", "SKIP")], report
    assert table["training"] == "PASS" and "bit for bit" in report, report
    assert table["kernels on/off"] == "PASS", report
    # the recipe timed with the kernels on and off, each with its MFU and a profiled step
    assert re.search(r"kernels=auto [\d.]+ s/step, MFU [\d.]+, [\d.]+ GiB; kernels=reference [\d.]+ s/step, MFU",
                     report), report  # fmt: skip
    assert report.count("profile: device busy") == 2, report
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert {p: p.stat().st_size for p in results} == before  # the benchmarks wrote their rows into OUT
    # a device run brings back only a few small files: OUT holds these and nothing else
    out = {p.name for p in tmp_path.iterdir()}
    assert out == {"report.md", "gpu_check.log", "kernel_tests.xml", "step.csv", "kernels.csv"}


def _gpu_check(monkeypatch):
    """scripts/gpu_check.py as a module (it is a script, not a package member)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gc)  # its dataclasses look their module up
    spec.loader.exec_module(gc)
    return gc


def _wheel(folder: Path, name: str, version: str, tag: str) -> Path:
    """A minimal wheel of one module `name` (PEP 427: the files, METADATA, WHEEL, RECORD with hashes)."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    digest = {p: base64.urlsafe_b64encode(hashlib.sha256(c.encode()).digest()).rstrip(b"=").decode()
              for p, c in files.items()}  # fmt: skip
    files[f"{info}/RECORD"] = "".join(f"{p},sha256={digest[p]},{len(c)}\n" for p, c in files.items())
    files[f"{info}/RECORD"] += f"{info}/RECORD,,\n"
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, c in files.items():
            z.writestr(p, c)
    return path


def test_wheels_are_installed_offline_into_a_scratch_target(tmp_path, monkeypatch):
    """--wheels DIR as part 7 uses it: the wheels this Python takes, installed with pip (no index, no deps) into a
    folder under --work that joins PYTHONPATH; one for another Python is left out rather than failing them all (pip
    refuses the whole install over one foreign tag, --no-deps --target or not)."""
    gc = _gpu_check(monkeypatch)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "gpu_check_probe", "0.3", "py3-none-any")
    _wheel(wheels, "gpu_check_foreign", "0.1", "cp27-cp27m-win32")
    work = tmp_path / "work"
    check = gc.Check(gc.parse_args([str(tmp_path / "out"), "--cpu", "--wheels", str(wheels), "--work", str(work)]))
    env, figs = check.wheel_env()
    code = "import gpu_check_probe as m; print(m.__version__, m.__file__)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, "\n".join(figs) + "\n" + r.stderr
    version, where = r.stdout.split()
    assert version == "0.3" and Path(where).is_relative_to(work), r.stdout
    assert "1 of the 2 wheels" in figs[0] and ": ok" in figs[0], figs
    assert "gpu_check_foreign-0.1-cp27-cp27m-win32.whl" in figs[1], figs
    # the other parts' environment stays without it
    assert subprocess.run([sys.executable, "-c", code], env=check.env, capture_output=True, cwd=tmp_path).returncode


def test_kernels_on_off_bound_is_test_kernels_e2e_one(monkeypatch):
    """Part 5 holds the CUDA run to tests/test_kernels_e2e.py's fp32 bound: the same numbers, and a step beyond
    them fails (a relative 2e-5 at the first step, 2e-4 later; a NaN)."""
    gc = _gpu_check(monkeypatch)
    e2e = (ROOT / "tests" / "test_kernels_e2e.py").read_text()
    assert "tol = max(low, 1e-5 if step == 0 else 1e-4)" in e2e and "rel=tol, abs=1e-6" in e2e
    assert gc.ON_OFF_REL == (1e-5, 1e-4) and gc.ON_OFF_ABS == 1e-6
    ref = [{"step": s, "loss": 2.0, "rec": 1.0, "lr": 1e-3, "clips_per_s": 100.0 * s} for s in (1, 2, 3)]
    same = [{**m, "loss": m["loss"] * (1 + 0.9e-5), "clips_per_s": 1.0} for m in ref]
    assert gc.compare_losses(ref, same)[1] == []
    first = [{**m, "loss": m["loss"] * (1 + 2e-5)} if m["step"] == 1 else m for m in ref]
    assert [b.split(":")[0] for b in gc.compare_losses(ref, first)[1]] == ["step 1 loss"]
    later = [{**m, "rec": m["rec"] * (1 + 2e-4)} if m["step"] == 3 else m for m in ref]
    assert [b.split(":")[0] for b in gc.compare_losses(ref, later)[1]] == ["step 3 rec"]
    nan = [{**m, "rec": float("nan")} if m["step"] == 2 else m for m in ref]
    assert [b.split(":")[0] for b in gc.compare_losses(ref, nan)[1]] == ["step 2 rec"]
