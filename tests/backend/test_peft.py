"""LoRA, freezing policy and parameter accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backend.models.peft.freeze import FreezePolicy, apply_freezing, count_parameters
from backend.models.peft.lora import LoRALinear, LoRAQKV, _LoRABase, inject_lora, lora_on_qkv


class Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(a @ v)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attn(d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyModel(nn.Module):
    def __init__(self, d: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.decoder = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.blocks(x))


def lora_modules(model: nn.Module) -> list[_LoRABase]:
    return [m for m in model.modules() if isinstance(m, _LoRABase)]


def randomise_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.normal_(0, 0.1)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("targets", ["qkv", "qv", "k"])
def test_lora_starts_as_an_exact_no_op(x: torch.Tensor, targets: str) -> None:
    torch.manual_seed(0)
    model = TinyModel().eval()
    before = model(x)
    names = lora_on_qkv(model, rank=4, alpha=8, targets=targets)
    assert names == [f"blocks.{i}.attn.qkv" for i in range(3)]
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("targets", ["qkv", "qv"])
def test_merged_and_unmerged_outputs_are_equal(x: torch.Tensor, targets: str) -> None:
    torch.manual_seed(0)
    model = TinyModel().eval()
    lora_on_qkv(model, rank=4, alpha=16, targets=targets)
    base_weights = [m.base.weight.clone() for m in lora_modules(model)]
    randomise_lora(model)
    unmerged = model(x)
    assert not torch.allclose(unmerged, TinyModel().eval()(x))
    for m in lora_modules(model):
        m.merge()
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    for m in lora_modules(model):
        m.unmerge()
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    for m, w in zip(lora_modules(model), base_weights, strict=True):
        assert torch.allclose(m.base.weight, w, atol=1e-6)


def test_qv_lora_leaves_the_k_slice_alone(x: torch.Tensor) -> None:
    layer = nn.Linear(32, 96)
    lora = LoRAQKV(layer, rank=2, targets="qv")
    with torch.no_grad():
        lora.lora_B.normal_()
    delta = lora(x) - layer(x)
    assert delta[..., 32:64].abs().max() == 0
    assert delta[..., :32].abs().max() > 0 and delta[..., 64:].abs().max() > 0


def test_only_adapters_and_chosen_parts_get_gradients(x: torch.Tensor) -> None:
    model = TinyModel()
    lora_on_qkv(model, rank=4)
    apply_freezing(model, FreezePolicy(adapters=True, trainable=("decoder.*",)))
    randomise_lora(model)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        should_train = "lora_" in name or name.startswith("decoder.")
        assert p.requires_grad == should_train, name
        assert (p.grad is not None) == should_train, name
    apply_freezing(model, FreezePolicy(adapters=True, norms=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.norm1.weight" in trainable and "decoder.weight" not in trainable


def test_parameter_accounting_by_hand() -> None:
    model = TinyModel(d=32, depth=3)
    total = count_parameters(model).total
    lora_on_qkv(model, rank=4)  # one pair per fused qkv: A 4x32, B 96x4
    apply_freezing(model, FreezePolicy())
    c = count_parameters(model)
    assert c.trainable == 3 * (4 * 32 + 96 * 4)
    assert c.total == total + c.trainable
    assert c.percent == pytest.approx(100 * c.trainable / c.total)


def test_bad_lora_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError):
        LoRAQKV(nn.Linear(4, 10), rank=2)
    with pytest.raises(ValueError):
        LoRAQKV(nn.Linear(4, 12), rank=2, targets="qx")


def test_sam_vit_b_with_rank_8_lora_on_every_qkv_matches_the_hand_count() -> None:
    from backend.models.backbones import sam_vit

    with torch.device("meta"):  # shapes only: no 90M-parameter allocation
        model = sam_vit.build("vit_b")
        frozen_total = count_parameters(model).total
        lora_on_qkv(model, rank=8)
    apply_freezing(model, FreezePolicy())
    c = count_parameters(model)
    # 12 blocks, each qkv 768 -> 2304: A is 8 x 768, B is 2304 x 8.
    assert c.trainable == 12 * (8 * 768 + 2304 * 8) == 294_912
    assert c.total == frozen_total + 294_912
    assert frozen_total == 89_670_912  # SAM ViT-B image encoder, as segment-anything builds it


def test_lora_on_any_linear_layers(x: torch.Tensor) -> None:
    model = TinyModel().eval()
    before = model(x)
    names = inject_lora(model, lambda n, _: n.endswith("mlp.2"), lambda _, layer: LoRALinear(layer, rank=2))
    assert names == [f"blocks.{i}.mlp.2" for i in range(3)]
    assert torch.equal(model(x), before)


def test_qv_lora_on_tiny_vit_slices_q_and_v_head_by_head() -> None:
    from backend.models.backbones import tiny_vit

    model = tiny_vit.build("tiny").eval()
    names = lora_on_qkv(model, rank=2, targets="qv")
    attn = model.get_submodule(names[0].rpartition(".")[0])
    lora = attn.qkv
    with torch.no_grad():
        lora.lora_B.normal_()
    tokens = torch.randn(1, 9, lora.in_features)
    delta = (lora(tokens) - lora.base(tokens)).view(1, 9, attn.num_heads, 3, attn.head_dim)
    assert delta[:, :, :, 1].abs().max() == 0  # k untouched in every head
    assert delta[:, :, :, 0].abs().max() > 0 and delta[:, :, :, 2].abs().max() > 0
    unmerged = lora(tokens)
    lora.merge()
    assert torch.allclose(lora(tokens), unmerged, atol=1e-5)
