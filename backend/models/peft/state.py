"""An adapter is the part of a model's state that does not come from the frozen official checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from backend.models.backbones.loading import CheckpointMismatch, describe_mismatch


class AdapterState:
    """Mixin for an nn.Module: `adapter_state_dict` saves, and `load_adapter_state` restores, the state keys
    that `adapter_keys()` accepts (trainable tensors plus any statistics the outputs depend on)."""

    def adapter_keys(self) -> Callable[[str], bool]:
        """A test for state_dict keys that belong to the adapter."""
        raise NotImplementedError

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        assert isinstance(self, nn.Module)
        keep = self.adapter_keys()
        return {k: v for k, v in self.state_dict().items() if keep(k)}

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load what `adapter_state_dict` saved; every key must match in name and shape.

        Raises CheckpointMismatch naming the missing, unexpected and mis-shaped keys before changing anything.
        """
        expected = self.adapter_state_dict()
        problems = describe_mismatch(expected, state, "adapter")
        if problems:
            raise CheckpointMismatch(f"The adapter does not fit this {type(self).__name__} model: {problems}")
        with torch.no_grad():
            for k, v in expected.items():
                v.copy_(state[k])
