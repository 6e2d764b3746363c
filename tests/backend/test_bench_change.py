"""bench.change's training measurement runs and reports every field (no timing or memory asserts)."""

from __future__ import annotations

import json

from bench.change import measure_training

FIELDS = {
    "mode",
    "s_per_step",
    "steps",
    "peak_mb",
    "baseline_mb",
    "trainable_params",
    "total_params",
    "weights_mb",
    "grads_adam_mb",
    "saved_activations_mb",
    "host_peak_mb",
}


def test_training_measurement_reports_peft_and_full_fine_tuning() -> None:
    kwargs = {"backbone": "tiny_vit_tiny", "patch": 64, "batch": 2, "device": "cpu", "dtype": "fp32"}
    kwargs |= {"steps": 1, "seconds": 0.0, "rank": 4}
    peft, full = (json.loads(json.dumps(measure_training(full=f, **kwargs))) for f in (False, True))
    assert set(peft) == set(full) == FIELDS
    assert (peft["mode"], full["mode"]) == ("peft", "full") and peft["steps"] == full["steps"] == 1
    assert 0 < peft["trainable_params"] < full["trainable_params"] == full["total_params"] == peft["total_params"]
