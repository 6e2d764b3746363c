"""Device reporting for `initialize` and `python -m backend info`."""

import pytest

from backend.runtime import environment_info


def test_cpu_is_always_reported() -> None:
    info = environment_info()
    assert info["devices"][0] == {"name": "cpu", "type": "cpu", "threads": info["devices"][0]["threads"]}
    assert info["versions"]["gdal"] and info["versions"]["torch"]


@pytest.mark.cuda
def test_cuda_devices_report_model_and_memory() -> None:
    info = environment_info()
    gpus = [d for d in info["devices"] if d["type"] == "cuda"]
    assert gpus and info["default_device"] == "cuda:0"
    assert all(d["memory_total_mb"] > 0 and 0 < d["memory_free_mb"] <= d["memory_total_mb"] for d in gpus)
