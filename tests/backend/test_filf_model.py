"""FILF: bi-temporal interaction LoRA, the BCD and SCD decoders, freezing, adapter state, parameter accounting."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from backend.methods.filf import (
    BiTemporalInteractionLoRA,
    FrequencyFeatureInteraction,
    build_backbone,
    build_filf,
    inject_bitemporal_lora,
)
from backend.methods.filf.decoder import SCDOutput
from backend.models.backbones.loading import CheckpointMismatch

TINY = ("tiny_vit_tiny", "sam_vit_tiny")


def images(batch: int, size: int | tuple[int, int], seed: int) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def randomise_lora_(model: nn.Module, seed: int) -> None:
    """Non-zero B (and perturbed filters and scale) so the LoRA update is no longer a no-op."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


# --- BiTemporalInteractionLoRA and its frequency-domain interaction ---------------------------------------


def test_frequency_interaction_is_identity_at_init_and_scales_real_and_imaginary_parts() -> None:
    ffi = FrequencyFeatureInteraction(6)
    delta = torch.randn(2, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(ffi(delta), delta)
    with torch.no_grad():
        ffi.f_im.zero_()
    # Keeping only the real parts of the spectrum keeps the circularly even part of the token sequence:
    # (x[n] + x[-n mod L]) / 2, channel by channel. This pins the token axis and the real/imag roles.
    mirrored = torch.roll(delta.flip(1), 1, dims=1)
    torch.testing.assert_close(ffi(delta), (delta + mirrored) / 2)
    with torch.no_grad():
        ffi.f_re.fill_(3.0)
        ffi.f_im.fill_(3.0)
    torch.testing.assert_close(ffi(delta), 3 * delta)


@pytest.mark.parametrize("token_shape", [(7,), (3, 4)], ids=["tinyvit_tokens", "sam_grid"])
def test_interaction_lora_follows_the_formula_and_couples_the_dates(token_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    d, r, half = 8, 2, 3
    module = BiTemporalInteractionLoRA(nn.Linear(d, 3 * d), rank=r)
    assert module.lora_scale.item() == pytest.approx(1 / r)
    x1, x2 = torch.randn(2, half, *token_shape, d)
    x = torch.cat([x1, x2])
    assert torch.equal(module(x), module.base(x))  # B = 0: exactly the frozen projection

    randomise_lora_(module, seed=1)
    with torch.no_grad():
        module.lora_ffi.f_re.fill_(1.0)
        module.lora_ffi.f_im.fill_(1.0)  # the FFT block is then the identity
    delta = x1 @ module.lora_A1.T @ module.lora_B1.T + x2 @ module.lora_A2.T @ module.lora_B2.T
    out = module(x).detach()
    torch.testing.assert_close(out[:half], module.base(x1) + module.lora_scale * delta)
    torch.testing.assert_close(out[half:], module.base(x2) + module.lora_scale * delta)

    # Another date-1 input changes the update added to date 2.
    update2 = out[half:] - module.base(x2)
    other = module(torch.cat([x1 + 1.0, x2])).detach()[half:] - module.base(x2)
    assert (update2 - other).abs().max() > 1e-3


def test_interaction_lora_refuses_an_odd_batch() -> None:
    module = BiTemporalInteractionLoRA(nn.Linear(4, 12))
    with pytest.raises(ValueError, match="bi-temporal"):
        module(torch.randn(3, 5, 4))


# --- Inside the backbones ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_fresh_lora_is_an_exact_no_op(name: str) -> None:
    torch.manual_seed(0)
    plain = build_backbone(name).eval()
    adapted = copy.deepcopy(plain)
    assert len(inject_bitemporal_lora(adapted, rank=4)) == len(plain.qkv_projections())
    x = torch.cat([images(1, 64, seed=1), images(1, 64, seed=2)])
    with torch.no_grad():
        expected, got = plain(x), adapted(x)
    assert torch.equal(got[:1], expected[:1]) and torch.equal(got[1:], expected[1:])


@pytest.mark.parametrize("name", TINY)
def test_changing_date_1_changes_date_2_through_the_backbone(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    inject_bitemporal_lora(backbone, rank=4)
    randomise_lora_(backbone, seed=3)
    x1, x1_other, x2 = images(1, 64, seed=1), images(1, 64, seed=4), images(1, 64, seed=2)
    with torch.no_grad():
        date2 = backbone(torch.cat([x1, x2]))[1:]
        date2_other = backbone(torch.cat([x1_other, x2]))[1:]
    assert (date2 - date2_other).abs().max() > 1e-4


@pytest.mark.parametrize("name", TINY)
def test_stacked_batch_halves_are_the_two_dates_in_windowed_attention(name: str) -> None:
    """The qkv input of a stacked batch must be [date-1 windows of every pair, date-2 windows of every pair]
    in the same order as each date alone; an interleaved (window-major) order would fail this."""
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    for qkv_name, qkv in backbone.qkv_projections():
        qkv.register_forward_pre_hook(lambda _, args, key=qkv_name: seen.setdefault(key, []).append(args[0]))
    x1, x2 = images(2, 128, seed=1), images(2, 128, seed=2)
    with torch.no_grad():
        backbone(torch.cat([x1, x2]))
        backbone(x1)
        backbone(x2)
    windowed = 0
    for stacked, alone1, alone2 in seen.values():
        windows_per_image = alone1.shape[0] // 2
        windowed += windows_per_image > 1
        half = stacked.shape[0] // 2
        torch.testing.assert_close(stacked[:half], alone1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stacked[half:], alone2, atol=1e-5, rtol=1e-5)
    assert windowed  # the windowed path (several windows an image) was exercised


# --- The model -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_only_lora_and_decoder_parameters_get_gradients(name: str) -> None:
    torch.manual_seed(0)
    model = build_filf(name, rank=4).train()
    out = model(images(2, 64, seed=1), images(2, 64, seed=2))
    out.mean().backward()
    for param_name, p in model.backbone.named_parameters():
        is_lora = "lora_" in param_name
        assert p.requires_grad == is_lora, param_name
        assert (p.grad is not None) == is_lora, param_name
    assert all(p.requires_grad and p.grad is not None for p in model.decoder.parameters())
    per_layer = {"lora_A1", "lora_A2", "lora_B1", "lora_B2", "lora_ffi.f_re", "lora_ffi.f_im", "lora_scale"}
    names = {n.split("attn.qkv.")[1] for n in lora_params(model)}
    assert names == per_layer
    assert len(lora_params(model)) == len(per_layer) * len(model.lora_layers)
    # The encoder's BatchNorm stays in eval mode while the decoder's trains.
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.training for m in model.decoder.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize(
    ("name", "size"),
    [("tiny_vit_tiny", 64), ("tiny_vit_tiny", 128), ("sam_vit_tiny", 64), ("sam_vit_tiny", (128, 96))],
)
def test_forward_shapes(name: str, size: int | tuple[int, int]) -> None:
    torch.manual_seed(0)
    x1, x2 = images(1, size, seed=1), images(1, size, seed=2)
    hw = x1.shape[-2:]
    with torch.no_grad():
        bcd = build_filf(name, rank=4).eval()(x1, x2)
        scd = build_filf(name, rank=4, mode="scd", num_seg=7).eval()(x1, x2)
    assert bcd.shape == (1, 2, *hw) and torch.isfinite(bcd).all()
    assert isinstance(scd, SCDOutput)
    assert scd.change.shape == (1, 1, *hw) and scd.sem1.shape == scd.sem2.shape == (1, 7, *hw)


def test_semantic_change_trains_only_lora_and_both_decoder_branches() -> None:
    torch.manual_seed(0)
    model = build_filf("tiny_vit_tiny", rank=4, mode="scd", num_seg=5).train()
    out = model(images(2, 64, seed=1), images(2, 64, seed=2))
    (out.change.mean() + out.sem1.mean() + out.sem2.mean()).backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.backbone.named_parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    with pytest.raises(ValueError, match="mode"):
        build_filf("tiny_vit_tiny", mode="segmentation")


def test_encoder_scale_enlarges_the_encoder_input_and_returns_logits_at_the_input_size() -> None:
    torch.manual_seed(0)
    model = build_filf("tiny_vit_tiny", rank=4, encoder_scale=2).eval()
    seen: list[tuple[int, ...]] = []
    model.backbone.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        out = model(images(1, 64, seed=1), images(1, 64, seed=2))
    assert seen == [(2, 3, 128, 128)] and out.shape == (1, 2, 64, 64)


def test_mobile_sam_bcd_at_256() -> None:
    torch.manual_seed(0)
    model = build_filf("mobile_sam").eval()
    with torch.no_grad():
        out = model(images(1, 256, seed=1), images(1, 256, seed=2))
    assert out.shape == (1, 2, 256, 256) and torch.isfinite(out).all()


def test_trainable_parameters_on_mobile_sam_rank_8() -> None:
    """methods.md §4.2: BIF-LoRA 0.130M at r = 8 and a 0.80M BCD decoder [calc]."""
    model = build_filf("mobile_sam", rank=8)
    r = 8
    widths = [128] * 2 + [160] * 6 + [320] * 2  # qkv input width d of the 10 attention blocks, stages 2-4
    # The attention blocks of stages 2-4 (layers 1-3; layer 0 is the MBConv stage).
    stage_depths = ((1, 2), (2, 6), (3, 2))
    assert model.lora_layers == [f"layers.{s}.blocks.{b}.attn.qkv" for s, depth in stage_depths for b in range(depth)]
    # Per block: two dates x (A: r x d, B: 3d x r), f_re and f_im of 3d each, the scale s.
    expected_lora = sum(2 * (r * d + 3 * d * r) + 2 * 3 * d + 1 for d in widths)
    lora = sum(p.numel() for p in lora_params(model).values())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora == expected_lora == 129_930
    assert trainable == lora + decoder
    assert decoder == pytest.approx(0.80e6, rel=0.005)
    fuse, fdfe = model.decoder.cdfe.fuse, model.decoder.fdfe
    assert (fuse.in_channels, fuse.out_channels, fdfe.reduce.out_channels, fdfe.up.out_channels) == (512, 256, 128, 64)


def test_inject_covers_every_sam_block() -> None:
    backbone = build_backbone("sam_vit_tiny")
    names = inject_bitemporal_lora(backbone)
    assert names == [f"blocks.{i}.attn.qkv" for i in range(len(backbone.blocks))]


def test_adapter_state_round_trip_and_strict_loading() -> None:
    torch.manual_seed(0)
    trained = build_filf("tiny_vit_tiny", rank=4)
    torch.manual_seed(0)
    fresh = build_filf("tiny_vit_tiny", rank=4)
    x1, x2 = images(2, 64, seed=1), images(2, 64, seed=2)
    # One training step moves every trainable tensor and the decoder's BatchNorm statistics.
    optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.1)
    trained.train()
    trained(x1, x2).square().mean().backward()
    optimizer.step()
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        expected = trained(x1, x2)
        assert not torch.equal(fresh(x1, x2), expected)
        state = {k: v.clone() for k, v in trained.adapter_state_dict().items()}
        assert all("lora_" in k or k.startswith("decoder.") for k in state)
        assert any(k.endswith("running_mean") for k in state)
        fresh.load_adapter_state(state)
        assert torch.equal(fresh(x1, x2), expected)

    with pytest.raises(CheckpointMismatch, match=r"unexpected keys: decoder\.bogus"):
        fresh.load_adapter_state({**state, "decoder.bogus": torch.zeros(1)})
    dropped = next(iter(state))
    with pytest.raises(CheckpointMismatch, match=f"missing keys: {re.escape(dropped)}"):
        fresh.load_adapter_state({k: v for k, v in state.items() if k != dropped})
    with pytest.raises(CheckpointMismatch, match=r"wrong shapes: decoder\.head\.classify\.bias"):
        fresh.load_adapter_state({**state, "decoder.head.classify.bias": torch.zeros(3)})


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = build_filf(name, rank=4).train()
    randomise_lora_(model, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(2, 64, seed=1), images(2, 64, seed=2))
        loss = out.mean()
    loss.float().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_" in n)


def test_build_filf_loads_an_official_state_and_refuses_unknown_names() -> None:
    torch.manual_seed(1)
    source = build_backbone("tiny_vit_tiny")
    state = {f"image_encoder.{k}": v for k, v in source.state_dict().items()}
    model = build_filf("tiny_vit_tiny", backbone_state=state)
    assert torch.equal(
        model.backbone.layers[1].blocks[0].attn.qkv.base.weight, source.layers[1].blocks[0].attn.qkv.weight
    )
    assert torch.equal(model.backbone.neck[0].weight, source.neck[0].weight)
    with pytest.raises(ValueError, match="no backbone named 'resnet50' in the weights registry"):
        build_filf("resnet50")
    with pytest.raises(ValueError, match="FILF cannot use the ipt backbone"):
        build_filf("ipt_tiny")


def test_activation_checkpointing_keeps_outputs_and_gradients() -> None:
    from backend.methods.filf import build_filf

    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_filf("tiny_vit_tiny", rank=4).train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)  # make the LoRA path matter
        if ckpt:
            model.enable_activation_checkpointing()
        g = torch.Generator().manual_seed(1)
        x1, x2 = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
        model(x1, x2).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_A1" in n for n in grads[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
