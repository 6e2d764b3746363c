"""WEFT's modules (methods.md §1.2) on the tiny frozen ViT, and its parameter count at ViT-L scale."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F

from backend.io.rasterize import IGNORE
from backend.methods.weft import WEFT, MSDeformAttn, WaveletExperts, WTConv2d, block_groups, ms_deform_attn
from backend.methods.weft.adapter import TEW
from backend.methods.weft.mask2former import Mask2FormerHead
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


@pytest.mark.parametrize("head", ["mask2former", "fpn"])
@pytest.mark.parametrize("build", [tiny_weft, tiny_vit_weft], ids=["vit", "tiny_vit"])
def test_only_weft_modules_fusion_norms_and_head_train_and_all_get_gradients(build, head: str) -> None:
    model = build(head=head)
    model.train()
    with torch.no_grad():  # move γ off zero so that every injector weight is on the gradient path
        for interaction in model.interactions:
            interaction.injector.gamma.fill_(0.1)
    label = torch.randint(0, 2, (2, 64, 64))
    label[:, :, 50:] = IGNORE
    model.loss(torch.randn(2, 3, 64, 64), label).backward()
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
@pytest.mark.parametrize("head", ["mask2former", "fpn"])
@pytest.mark.parametrize("build", [tiny_weft, tiny_vit_weft], ids=["vit", "tiny_vit"])
def test_any_input_size_gives_logits_of_that_size(build, head: str, size: tuple[int, int]) -> None:
    model = build(num_classes=3, head=head)
    x, label = torch.randn(2, 3, *size), torch.randint(0, 3, (2, *size))
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 3, *size)
        assert torch.allclose(logits.softmax(1).sum(1), torch.ones(2, *size))
        assert torch.isfinite(model.train().loss(x, label))


def test_mask2former_semantic_output_mixes_the_queries_class_scores_and_masks() -> None:
    """mmseg's semantic inference: Σ_q softmax(class_q)[k] · sigmoid(mask_q), "no object" dropped."""
    head = Mask2FormerHead(dim=32, num_classes=2).eval()
    feats = [torch.randn(1, 32, 16 // 2**i, 24 // 2**i) for i in range(4)]
    with torch.no_grad():
        cls, masks = head.predictions(feats)[-1]
        expected = torch.einsum("bqk,bqhw->bkhw", cls.softmax(-1)[..., :2], masks.sigmoid())
        assert torch.allclose(head(feats).exp(), expected.clamp_min(1e-6), atol=1e-6)
    assert len(head.predictions(feats)) == 10  # deep supervision: before the first decoder layer and after all 9


def test_hungarian_matching_pairs_each_class_mask_with_the_query_that_predicts_it() -> None:
    head = Mask2FormerHead(dim=32, num_classes=3)
    label = torch.zeros(32, 32, dtype=torch.long)
    label[4:12, 4:20] = 1
    label[20:30, 10:28] = 2
    label[:, 30:] = IGNORE
    classes, tmasks, valid = head._targets(label)
    assert classes.tolist() == [0, 1, 2] and valid[0, 0, :, 30:].sum() == 0
    queries = 7
    cls = torch.full((queries, 4), -5.0)
    masks = torch.full((queries, 32, 32), -8.0)
    for q, k in ((5, 0), (2, 1), (6, 2)):  # query q predicts class k's mask exactly
        cls[q, k] = 5.0
        masks[q] = torch.where(label == k, 8.0, -8.0)
    rows, cols = head._match(cls, masks, classes, tmasks, valid)
    assert sorted(zip(rows.tolist(), classes[cols].tolist(), strict=True)) == [(2, 1), (5, 0), (6, 2)]


def test_mask2former_set_loss_is_lowest_for_the_right_answer_and_blind_to_ignored_pixels() -> None:
    head = Mask2FormerHead(dim=32, num_classes=2)
    label = torch.zeros(1, 32, 32, dtype=torch.long)
    label[:, 8:24, 8:24] = 1

    def prediction(mask_of_query_0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls = torch.full((1, 5, 3), -6.0)
        cls[0, :, 2] = 6.0  # every query says "no object" …
        cls[0, 0, 1], cls[0, 0, 2] = 6.0, -6.0  # … but query 0: class 1
        cls[0, 1, 0], cls[0, 1, 2] = 6.0, -6.0  # and query 1: background
        masks = torch.full((1, 5, 32, 32), -8.0)
        masks[0, 0] = mask_of_query_0
        masks[0, 1] = torch.where(label[0] == 0, 8.0, -8.0)
        return cls, masks

    def loss(mask_of_query_0: torch.Tensor, label: torch.Tensor) -> float:
        torch.manual_seed(0)  # the same sampled points
        return float(head._set_loss(*prediction(mask_of_query_0), [head._targets(y) for y in label]))

    # Most points are sampled where the masks are uncertain, at the edges, so even the right answer costs a little.
    right = loss(torch.where(label[0] == 1, 8.0, -8.0), label)
    assert 10 * right < loss(torch.where(label[0] == 1, -8.0, 8.0), label)
    # An object predicted over ignored pixels costs (almost) nothing; over labelled background it costs.
    off = torch.where(label[0] == 1, 8.0, -8.0)
    off[:, :4] = 8.0
    ignored = label.clone()
    ignored[:, :, :4] = IGNORE
    assert loss(off, ignored) < right + 0.5 < 2 * right + 0.5 < loss(off, label)


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
    # The Mask2Former head (not counted by the paper's 11.96M): 2.42M, which with the backbone side gives the
    # ≈ 14.4M that the paper's 4.52 % trainable implies (less the unused cosine weights).
    assert round(n(model.head) / 1e6, 2) == 2.42


def test_activation_checkpointing_changes_no_loss_gradient_or_batchnorm_statistic() -> None:
    """Recomputing the frozen blocks and WEFT's own modules in the backward pass saves memory, nothing else: the
    same loss, gradients and BatchNorm running statistics (updated once per step), drop path replayed."""
    x, label = torch.randn(2, 3, 64, 64), torch.randint(0, 2, (2, 64, 64))
    runs = []
    for checkpointing in (False, True):
        model = tiny_weft(drop_path_rate=0.3).train()
        with torch.no_grad():
            for interaction in model.interactions:
                interaction.injector.gamma.fill_(0.1)
        if checkpointing:
            model.enable_activation_checkpointing()
        torch.manual_seed(1)
        loss = model.loss(x, label)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
        runs.append((loss.detach(), grads, stats))
    (loss0, grads0, stats0), (loss1, grads1, stats1) = runs
    assert torch.allclose(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 100
    for name, g in grads0.items():
        assert torch.allclose(g, grads1[name], atol=1e-5, rtol=1e-4), name
    assert stats0.keys() == stats1.keys()
    for name, b in stats0.items():
        assert torch.allclose(b, stats1[name], atol=1e-6), name
