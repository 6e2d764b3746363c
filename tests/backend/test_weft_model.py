"""WEFT's modules (methods.md §1.2) on the tiny frozen ViT, and its parameter count at ViT-L scale."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F

from backend.methods.weft import WEFT, MSDeformAttn, WaveletExperts, WTConv2d, block_groups, ms_deform_attn
from backend.methods.weft.adapter import TEW
from backend.methods.weft.wavelet import dwt, haar_filters, idwt
from backend.models.backbones import tiny_vit, vit


def tiny_weft(**kwargs: object) -> WEFT:
    torch.manual_seed(0)
    return WEFT(vit.build("tiny", depth=4), **kwargs).eval()


def tiny_vit_weft(**kwargs: object) -> WEFT:
    torch.manual_seed(0)
    return WEFT(tiny_vit.build("tiny"), **kwargs).eval()


def test_haar_transform_equals_pywavelets_and_inverts_exactly() -> None:
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    sub = dwt(x, haar_filters().double())
    approx, (horizontal, vertical, diagonal) = pywt.dwt2(x.numpy(), "db1", axes=(-2, -1))
    for ours, theirs in zip(sub.unbind(2), (approx, vertical, horizontal, diagonal), strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-12)
    torch.testing.assert_close(idwt(sub, haar_filters().double()), x)


def test_wtconv_keeps_odd_sizes_and_is_a_per_channel_scaling_at_kernel_1() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 7, 9)
    assert WTConv2d(4, 5)(x).shape == x.shape
    conv = WTConv2d(4, 1)
    with torch.no_grad():
        expected = conv.base_scale * (conv.base_conv.weight.view(1, 4, 1, 1) * x + conv.base_conv.bias.view(1, 4, 1, 1))
        # k = 1: each subband scaled by its weight (x 0.1), transformed back; Haar is linear, so per subband.
        sub = dwt(F.pad(x, (0, 1, 0, 1)), conv.filters)
        scale = (conv.wavelet_conv.weight.view(4, 4) * conv.wavelet_scale.view(4, 4))[None, :, :, None, None]
        expected = expected + idwt(sub * scale, conv.filters)[..., :7, :9]
        torch.testing.assert_close(conv(x), expected)


def test_expert_gate_keeps_four_of_seven_and_sums_to_one() -> None:
    torch.manual_seed(0)
    we = WaveletExperts(16)
    w = we.weights(torch.randn(5, 16, 8, 8))
    assert ((w > 0).sum(-1) == 4).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(5))


def bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample value (d, h, w) at normalised (x, y) like grid_sample(align_corners=False, zeros outside)."""
    d, h, w = value.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    out = torch.zeros(d, dtype=value.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < w and 0 <= yi < h:
                out += weight * value[:, yi, xi]
    return out


def test_deformable_attention_equals_a_direct_loop() -> None:
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    b, q, heads, d, points = 2, 3, 2, 5, 3
    value = torch.randn(b, sum(h * w for h, w in shapes), heads, d, dtype=torch.float64)
    locations = torch.rand(b, q, heads, len(shapes), points, 2, dtype=torch.float64) * 1.2 - 0.1
    weights = torch.rand(b, q, heads, len(shapes), points, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    out = ms_deform_attn(value, shapes, locations, weights)
    levels = value.split([h * w for h, w in shapes], dim=1)
    for bi in range(b):
        for qi in range(q):
            for hi in range(heads):
                expected = torch.zeros(d, dtype=torch.float64)
                for li, (h, w) in enumerate(shapes):
                    v = levels[li][bi, :, hi].T.reshape(d, h, w)
                    for pi in range(points):
                        x, y = locations[bi, qi, hi, li, pi].tolist()
                        expected += weights[bi, qi, hi, li, pi] * bilinear(v, x, y)
                torch.testing.assert_close(out[bi, qi, hi * d : (hi + 1) * d], expected)


def test_deformable_attention_starts_on_a_ring_with_uniform_weights() -> None:
    attn = MSDeformAttn(32, heads=4, levels=3, points=4, value_ratio=0.5)
    offsets = attn.sampling_offsets.bias.view(4, 3, 4, 2)
    assert torch.equal(offsets[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))  # head 0 looks right, 1..4 px
    assert attn.value_proj.out_features == 16 and attn.output_proj.out_features == 32


def test_tew_mixes_equally_at_first_and_its_log_filter_is_a_second_difference() -> None:
    tew = TEW(8)
    assert torch.equal(tew.mix.softmax(-1), torch.full((3, 3), 1 / 3))
    assert torch.equal(tew.log.weight[0, 0], torch.tensor([[1.0, -2.0, 1.0]] * 3))


def test_the_adapter_is_an_exact_no_op_at_initialisation() -> None:
    """γ = 0: after every interaction the ViT tokens are those of the frozen backbone alone."""
    model = tiny_weft()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs, *_ = model.interact(x)
        _, alone = model.backbone.run_blocks(model.backbone.embed(x))
    ends = [group[-1] for group in model.stages.groups]
    for out, end in zip(outs, ends, strict=True):
        assert torch.equal(out.flatten(2).transpose(1, 2), alone[end])
    # And after a training step that moved γ, they differ.
    with torch.no_grad():
        for interaction in model.interactions:
            interaction.injector.gamma.fill_(0.5)
        moved, *_ = model.interact(x)
    assert not torch.equal(moved[0].flatten(2).transpose(1, 2), alone[ends[0]])


@pytest.mark.parametrize("build", [tiny_weft, tiny_vit_weft], ids=["vit", "tiny_vit"])
def test_only_weft_modules_fusion_norms_and_head_train_and_all_get_gradients(build) -> None:
    model = build()
    model.train()
    with torch.no_grad():  # move γ off zero so that every injector weight is on the gradient path
        for interaction in model.interactions:
            interaction.injector.gamma.fill_(0.1)
    logits = model(torch.randn(2, 3, 64, 64))
    F.cross_entropy(logits, torch.randint(0, 2, (2, 64, 64))).backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("interactions.0.injector"))
    assert all(
        k.startswith(("extractor.", "interactions.", "out_proj.", "fusion_norms.", "head."))
        for k in model.adapter_state_dict()
    )


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (70, 100), (33, 47)])
@pytest.mark.parametrize("build", [tiny_weft, tiny_vit_weft], ids=["vit", "tiny_vit"])
def test_any_input_size_gives_logits_of_that_size(build, size: tuple[int, int]) -> None:
    model = build(num_classes=3)
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 3, *size)


def test_on_mobilesam_tinyvit_the_adapter_is_a_no_op_at_initialisation_too() -> None:
    """One interaction before each transformer stage: with γ = 0 every stage's output is the frozen encoder's."""
    model = tiny_vit_weft()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        outs, *_ = model.interact(x)
        alone = model.backbone.forward_features(x).blocks
    depths = model.backbone.config.depths
    ends = [sum(depths[: s + 1]) - 1 for s in (1, 2, 3)]
    for out, end in zip(outs, ends, strict=True):
        assert torch.equal(out, alone[end].permute(0, 3, 1, 2))
    assert [type(p).__name__ for p in model.out_proj] == ["Conv2d", "Conv2d", "Conv2d"]


def test_block_groups_follow_the_papers_interactions() -> None:
    assert [(g[0], g[-1]) for g in block_groups(24)] == [(0, 5), (6, 11), (12, 17), (18, 23)]
    assert [list(g) for g in block_groups(2)] == [[0], [1]]


def test_trainable_parameters_at_vit_l_scale_match_the_papers_modules() -> None:
    """methods.md §1.2(d), computed from the code's shapes: extractor 0.173M, injectors 4 × 1.842M (of which 0.197M
    each are the official repository's unused `cosine_weights`, not built here), extractors 6 × 0.735M, level
    embeddings and fusion norms 0.011M: ≈ 11.96M − 4 × 0.197M ≈ 11.17M on the backbone side."""
    with torch.device("meta"):
        model = WEFT(vit.build("uniperceiver_vit_l"))

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert n(model.extractor) - model.extractor.level_embed.numel() == 173_239
    assert n(model.interactions[0].injector) == 1_842_434 - 196_800
    assert round(n(model.interactions[0].extractor) / 1e6, 3) == 0.735
    assert n(model.fusion_norms) + model.extractor.level_embed.numel() == 11_264
    backbone_side = n(model) - n(model.backbone) - n(model.head)
    assert abs(backbone_side / 1e6 - (11.96 - 4 * 0.1968)) < 0.01  # 11.96 is itself rounded
    assert round(n(model.backbone) / 1e6, 2) == 303.36
