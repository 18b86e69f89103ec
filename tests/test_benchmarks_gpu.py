"""benchmarks/gpu.py's report: which attempt of a batch counts, MFU and ratios, the Markdown table."""
import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    path = list(sys.path)  # the script puts benchmarks/ on it
    spec = importlib.util.spec_from_file_location("gpu_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path[:] = path
    return module


def test_out_of_memory_errors_are_told_apart(gpu):
    assert gpu.out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.1GiB"))
    assert gpu.out_of_memory(type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory."))
    assert not gpu.out_of_memory(RuntimeError("INVALID_ARGUMENT: cuDNN does not support this head dim"))


def test_a_batch_reports_its_successful_attempt_and_keeps_the_failed_ones(gpu):
    ours = [{"batch": 8, "remat": "none", "error": "RESOURCE_EXHAUSTED"},
            {"batch": 8, "remat": "dots_saveable", "step_s": 0.1, "xla_bytes": 2e9},
            {"batch": 16, "skipped": "time box"}]
    theirs = [{"batch": 8, "remat": False, "step_s": 0.2}, {"batch": 16, "remat": False, "step_s": 0.4}]
    rows = gpu.merge(ours, theirs, per_image_flops=1e12, peak_tflops=1000.0)
    assert [r["batch"] for r in rows] == [8, 16]
    eight = rows[0]
    assert eight["ours"]["remat"] == "dots_saveable" and len(eight["ours"]["failed_attempts"]) == 1
    assert eight["ours"]["images_per_s"] == pytest.approx(80.0)
    assert eight["ours"]["mfu"] == pytest.approx(0.08)  # 80 TFLOP/s of 1000
    assert eight["ours_over_diffusers"] == pytest.approx(2.0)
    assert rows[1]["ours"]["images_per_s"] is None and rows[1]["ours_over_diffusers"] is None

    table = gpu.markdown({"preset": "sd15", "device": "gpu:NVIDIA H100", "dtype": "bfloat16",
                          "versions": {"jax": "0", "torch": "0", "diffusers": "0"},
                          "flops": {"analytic_per_image": 1e12, "xla_per_image": None}, "sample_steps": 50,
                          "train": rows, "sample": gpu.merge([], [{"batch": 4, "median_s": 2.0}], None, None)})
    assert "| 8 | 100.0 | 80.00 | 8.0% | dots_saveable, - | 2.0 |" in table
    assert "| 16 | time box |" in table
    assert "| 4 | - | - | - | 2.000 | 2.00 | - | - |" in table
