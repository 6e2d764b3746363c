"""Device reporting for `initialize` and `python -m backend info`."""

import numpy as np
import pytest
import torch

from backend.runtime import environment_info, halve_batch_on_oom


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


def test_out_of_memory_halves_the_batch_until_it_fits() -> None:
    """A GPU's out-of-memory error cannot happen on this machine: the predictor raises it for batches above 2."""
    sizes: list[int] = []

    @halve_batch_on_oom
    def predict(batch: np.ndarray, valid: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return batch * 2

    batch = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    np.testing.assert_array_equal(predict(batch, np.ones((7, 3), bool)), batch * 2)  # every tile, in order
    assert sizes == [7, 3, 1, 2, 4, 2, 2]


def test_out_of_memory_on_a_single_tile_is_raised() -> None:
    @halve_batch_on_oom
    def predict(batch: np.ndarray, valid: np.ndarray) -> np.ndarray:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        predict(np.zeros((2, 1)), np.ones((2, 1), bool))
