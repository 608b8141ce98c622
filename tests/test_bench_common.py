"""benchmarks/common.py: the profiled step's summary (its CUDA branch fed hand-made events, as no GPU runs here)
and append_csv's handling of columns added at the end."""

import csv
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from benchmarks.common import append_csv, profile_summary, short_name


def _event(name, start, end, device=DeviceType.CPU, parent=None, device_time=0.0, annotation=False):
    span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, time_range=span, device_type=device, cpu_parent=parent,
                           is_user_annotation=annotation, device_time_total=device_time, cpu_time_total=end - start,
                           self_cpu_time_total=end - start)  # fmt: skip


def test_profile_summary_on_cuda_events():
    cuda = DeviceType.CUDA
    to = _event("aten::to", 0, 10, device_time=30.0)  # one cast, nested 3 deep
    to_copy = _event("aten::_to_copy", 1, 9, parent=to, device_time=30.0)
    cast = [to, to_copy, _event("aten::copy_", 2, 8, parent=to_copy, device_time=30.0)]
    events = [
        *cast,
        _event("aten::copy_", 20, 25, device_time=5.0),  # a plain copy (clone, contiguous, ...)
        _event("void at::native::gemm<float, 4>(float const*, int)", 100, 400, cuda),
        _event("void at::native::gemm<float, 4>(float const*, int)", 350, 500, cuda),  # overlaps: counted once
        _event("elementwise_kernel", 600, 700, cuda),
        _event("Optimizer.step#AdamW.step", 0, 1000, cuda, annotation=True),  # a range, not a kernel
    ]
    s = profile_summary(events, step_s=1e-3, cuda=True)
    assert s["busy_s"] == pytest.approx(500e-6) and s["busy_share"] == pytest.approx(0.5)
    assert s["top"] == [("gemm<float, 4>", pytest.approx(450e-6), 2), ("elementwise_kernel", pytest.approx(1e-4), 1)]
    assert (s["casts"], s["copies"]) == (1, 1)
    assert (s["cast_s"], s["copy_s"]) == (pytest.approx(30e-6), pytest.approx(5e-6))


def test_short_name():
    assert short_name("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm>(Params)") == \
        "Kernel2<cutlass_80_tensorop_bf16_s16816gemm>"  # fmt: skip
    assert short_name("aten::mm") == "aten::mm"
    assert len(short_name("x" * 200)) == 72


def test_append_csv_extends_the_header_for_columns_added_at_the_end(tmp_path):
    path = tmp_path / "r.csv"
    append_csv(path, {"a": 1, "b": 2})
    append_csv(path, {"a": 3, "b": 4, "c": 5})  # a new column at the end: same file, header extended
    rows = list(csv.DictReader(open(path)))
    assert [r["c"] for r in rows] == [None, "5"] and [r["a"] for r in rows] == ["1", "3"]
    append_csv(path, {"b": 6, "a": 7})  # any other change: a file of its own
    assert (tmp_path / "r-2cols.csv").exists() and len(list(csv.DictReader(open(path)))) == 2
