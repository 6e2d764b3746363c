"""PanAdapter: stage-1 priors, cascaded CTF/CTI adapters on the frozen IPT body, stages, adapter state, counts."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from backend.methods.panadapter import (
    CascadeTokenFusioner,
    CascadeTokenInjector,
    CrossAttention,
    PanAdapter,
    build_panadapter,
)
from backend.methods.panadapter.prior import MSEncoder
from backend.models.backbones import edsr, ipt
from backend.models.backbones.ipt import IPTBody
from backend.models.backbones.loading import CheckpointMismatch
from backend.models.peft.freeze import count_parameters


def tiny(ms_bands: int = 4, ratio: int = 4, seed: int = 0, **options: object) -> PanAdapter:
    return build_panadapter(ms_bands, "tiny", "tiny", ratio=ratio, seed=seed, **options)


def inputs(
    ms_bands: int = 4, size: tuple[int, int] = (32, 32), batch: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, ms_bands, *size, generator=generator), torch.rand(batch, 1, *size, generator=generator)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def perturb_(model: PanAdapter, seed: int) -> None:
    """Move every saved (non-official) tensor off its init, zero gates and zero last layers included."""
    generator = torch.Generator().manual_seed(seed)
    saved = set(model.adapter_state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in saved:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)


# --- shapes, sizes, band counts and ratios -----------------------------------------------------------------


@pytest.mark.parametrize("ratio", [2, 4])
@pytest.mark.parametrize("ms_bands", [3, 4, 8])
def test_output_is_pan_size_times_ms_bands_in_both_stages(ms_bands: int, ratio: int) -> None:
    model = tiny(ms_bands, ratio)
    ms_up, pan = inputs(ms_bands, (40, 24), batch=1)  # not a multiple of the 32 px tiny IPT window: padded
    ms = torch.rand(1, ms_bands, 40 // ratio, 24 // ratio)
    with torch.no_grad():
        for stage in ("prior", "adapter"):
            model.set_stage(stage)
            assert model(ms_up, pan).shape == (1, ms_bands, 40, 24)
            out = model.forward_features(ms_up, pan, ms)
            assert out.hrms.shape == (1, ms_bands, 40, 24)
            assert out.prior.spectral.shape[-2:] == (64 // ratio, 32 // ratio)  # padded to 64 x 32, M at MS scale
            assert out.prior.spatial.shape[-2:] == (64, 32)
    assert len(out.vit.blocks) == 4 and out.vit.blocks[0].shape == (2, 16, 32)  # 2 windows of 4x4 tokens


def test_full_size_ipt_windows_follow_the_training_patches() -> None:
    """A 64x64 PAN / 16x16 MS training patch is exactly one 16x16-token window of the real IPT."""
    with torch.device("meta"):
        model = build_panadapter(8)
    assert (model.window, model.token_stride, model.vit.config.grid) == (64, 4, 16)
    assert model.adapter_blocks == (3, 7, 11, 15, 19, 23)
    assert model.tokens.spectral.in_features == 64 and model.tokens.spatial.in_features == 1024  # A 1x1, B 4x4
    with torch.device("meta"):
        ratio2 = build_panadapter(4, ratio=2)
    assert ratio2.tokens.spectral.in_features == 256  # A at PAN/2 is cut into 2x2 patches per token


def test_bad_inputs_are_named() -> None:
    model = tiny(4)
    ms_up, pan = inputs(4)
    with pytest.raises(ValueError, match="expected ms_up"):
        model(ms_up, torch.cat([pan, pan], dim=1))
    with pytest.raises(ValueError, match="expected ms_up"):
        model(ms_up[:, :3], pan)
    with pytest.raises(ValueError, match="share batch and size"):
        model(ms_up, pan[..., :16])
    with pytest.raises(ValueError, match="1/4 scale"):
        model(ms_up, pan, ms=torch.rand(2, 4, 16, 16))
    with pytest.raises(ValueError, match="stage must be"):
        model.set_stage("lora")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown IPT variant"):
        build_panadapter(4, "large")
    with pytest.raises(TypeError, match="unknown PanAdapter options"):
        build_panadapter(4, "tiny", "tiny", rank=8)


# --- the adapters ------------------------------------------------------------------------------------------


def test_cross_attention_equals_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(16, 4)
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.kv.weight]))
        ref.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    q, ctx = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    torch.testing.assert_close(attn(q, ctx), ref(q, ctx, ctx, need_weights=False)[0], atol=1e-6, rtol=1e-5)


def test_fusioner_follows_the_formula() -> None:
    torch.manual_seed(0)
    ctf = CascadeTokenFusioner(16, 4)
    prior, other, vit_k = torch.randn(3, 2, 9, 16)
    fused = prior * torch.sigmoid(ctf.weighting(other)) + prior  # cross-branch weighting
    fused = ctf.attn(vit_k, fused) + fused  # queries: the ViT tokens; keys and values: the fused prior
    torch.testing.assert_close(ctf(prior, other, vit_k), fused + ctf.ffn(fused))
    assert ctf.weighting[0].out_features == 4  # k -> k/4 -> k


def test_injector_is_exactly_zero_at_init_and_gated_after() -> None:
    torch.manual_seed(0)
    cti = CascadeTokenInjector(16, 32, 4)
    x = torch.randn(2, 9, 32) * 100
    vit_k, spatial, spectral = torch.randn(3, 2, 9, 16)
    assert cti.gate.item() == 0.0
    assert torch.equal(cti(x, vit_k, spatial, spectral), x)
    with torch.no_grad():
        cti.gate.fill_(0.5)
    expected = x + 0.5 * cti.up(cti.attn(cti.merge(torch.cat([spatial, spectral], -1)), vit_k))
    torch.testing.assert_close(cti(x, vit_k, spatial, spectral), expected)


def test_adapters_leave_the_frozen_ipt_path_exactly_unchanged_at_init() -> None:
    """Zero gates: every IPT block output (and the decoder memory they feed) equals the adapter-free body's."""
    model = tiny(4).eval()
    ms_up, pan = inputs(4, (64, 32))
    with torch.no_grad():
        adapted = model.forward_features(ms_up, pan).vit
        plain = model.vit.forward_features(model.vit_input(ms_up, pan))
        assert len(adapted.blocks) == len(plain.blocks) == 4
        for a, b in zip(adapted.blocks, plain.blocks, strict=True):
            assert torch.equal(a, b)
        assert torch.equal(adapted.out, plain.out)
        for layer in model.layers:
            layer.cti.gate.fill_(0.1)
        moved = model.forward_features(ms_up, pan).vit
    assert torch.equal(moved.blocks[0], plain.blocks[0])  # before the first adapter (after block 1)
    assert not torch.allclose(moved.blocks[1], plain.blocks[1])


@pytest.mark.parametrize("residual_base", ["prior", "ms_up"])
def test_stage2_output_at_init_is_exactly_its_residual_base(residual_base: str) -> None:
    model = tiny(4, residual_base=residual_base).eval()
    ms_up, pan = inputs(4, (32, 64))
    model.set_stage("prior")
    with torch.no_grad():
        stage1 = model(ms_up, pan)
    model.set_stage("adapter")
    with torch.no_grad():
        stage2 = model(ms_up, pan)
    assert torch.equal(stage2, stage1 if residual_base == "prior" else ms_up)
    assert torch.equal(stage1, ms_up)  # the stage-1 decoder starts at zero too: untrained, O1 is the up-sampled MS


# --- stages: what trains -----------------------------------------------------------------------------------


def test_stage_switch_sets_requires_grad() -> None:
    model = tiny(4)
    names = [n for n, _ in model.named_parameters()]
    model.set_stage("prior")
    prior_trains = trainable(model)
    assert prior_trains == {
        n
        for n in names
        if n.startswith(("prior.spectral.trunk.head.", "prior.spatial.trunk.head.", "prior.decoder."))
        or re.match(r"prior\.(spectral|spatial)\.(lpe|project)\.", n)
    }
    model.stage = "adapter"
    adapter_trains = trainable(model)
    assert adapter_trains == {n for n in names if n.startswith(("layers.", "tokens.", "vit_proj.", "tail."))}
    official = {n for n in names if model.is_official(n)}
    edsr_slots = re.compile(r"prior\.\w+\.trunk\.(blocks|body_conv)\.")
    assert official == {n for n in names if n.startswith("vit.") or edsr_slots.match(n)}
    assert not official & (prior_trains | adapter_trains)
    assert model.trainable_parameters() == [p for n, p in model.named_parameters() if n in adapter_trains]
    assert not any(n.startswith("stem.") for n in prior_trains | adapter_trains)  # random and frozen by default


@pytest.mark.parametrize("stage", ["prior", "adapter"])
def test_optimiser_steps_change_exactly_the_stage_parameters(stage: str) -> None:
    torch.manual_seed(0)
    model = tiny(4, train_stem=stage == "adapter")
    model.set_stage(stage)
    ms_up, pan = inputs(4)
    target = ms_up + 0.1 * torch.randn_like(ms_up)
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    before = snapshot(model)
    should = trainable(model)
    for step in range(3):
        optimiser.zero_grad()
        model.loss(model(ms_up, pan), target).backward()
        optimiser.step()
        moved = changed(model, before)
        assert moved <= should, f"frozen parameters moved: {sorted(moved - should)[:5]}"
        if step == 0:
            assert moved  # the zero-initialised output layer moves first
    # Three steps reach every trainable tensor: the zero last layer, then the gates, then what they gate.
    assert moved == should
    assert not any(model.is_official(n) for n in moved)
    assert any(n.startswith("stem.") for n in moved) == (stage == "adapter")


def test_losses_follow_the_stage() -> None:
    model = tiny(4)
    pred, target = torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    model.set_stage("prior")
    assert model.loss(pred, target).item() == pytest.approx(2.0)  # L1
    model.set_stage("adapter")
    assert model.loss(pred, target).item() == pytest.approx(4.0)  # MSE


def test_finetune_cnn_trains_the_edsr_blocks_in_stage1_and_saves_them() -> None:
    model = tiny(4, finetune_cnn=True)
    model.set_stage("prior")
    names = trainable(model)
    assert "prior.spatial.trunk.blocks.0.body.0.weight" in names
    assert not any(".body_conv." in n for n in names)  # never read by LPE
    assert "prior.spectral.trunk.blocks.1.body.2.bias" in model.adapter_state_dict()
    model.set_stage("adapter")
    assert not any(n.startswith("prior.") for n in trainable(model))


# --- adapter state and official checkpoints ----------------------------------------------------------------


def test_adapter_state_round_trips_into_a_fresh_model() -> None:
    source = tiny(4, seed=0)
    perturb_(source, seed=3)
    state = source.adapter_state_dict()
    assert not any(source.is_official(k) for k in state)
    assert any(k.startswith("stem.") for k in state)  # random, not official: must travel with the adapter
    # A fresh model drawn from another seed, given only the same "official" weights, then the adapter.
    fresh = tiny(4, seed=1)
    with torch.no_grad():
        fresh.vit.load_state_dict(source.vit.state_dict())
        for branch in ("spectral", "spatial"):
            src, dst = getattr(source.prior, branch).trunk, getattr(fresh.prior, branch).trunk
            dst.blocks.load_state_dict(src.blocks.state_dict())
            dst.body_conv.load_state_dict(src.body_conv.state_dict())
    ms_up, pan = inputs(4, (32, 64))
    with torch.no_grad():
        assert not torch.equal(fresh(ms_up, pan), source(ms_up, pan))
        fresh.load_adapter_state({k: v.clone() for k, v in state.items()})
        assert torch.equal(fresh(ms_up, pan), source(ms_up, pan))
        for stage in ("prior", "adapter"):
            fresh.set_stage(stage)
            source.set_stage(stage)
            assert torch.equal(fresh(ms_up, pan), source(ms_up, pan))


def test_adapter_state_mismatch_is_named_and_changes_nothing() -> None:
    model = tiny(4)
    before = snapshot(model)
    with pytest.raises(CheckpointMismatch, match="wrong shapes"):
        model.load_adapter_state(tiny(8).adapter_state_dict())
    with pytest.raises(CheckpointMismatch, match="missing keys"):
        model.load_adapter_state({})
    assert not changed(model, before)


def test_same_seed_rebuilds_the_same_model_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = tiny(3, seed=5), tiny(3, seed=5)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def official_ipt_state(body: IPTBody, seed: int) -> dict[str, torch.Tensor]:
    """`IPT_pretrain.pt` layout (body.* of the outer model, plus keys the loader drops), random values."""
    n = body.config.num_layers
    attn = {
        "attn.qkv.weight": "self_attn.in_proj_weight",
        "attn.proj.weight": "self_attn.out_proj.weight",
        "cross_attn.qkv.weight": "multihead_attn.in_proj_weight",
        "cross_attn.proj.weight": "multihead_attn.out_proj.weight",
    }
    generator = torch.Generator().manual_seed(seed)
    state = {"head.0.0.weight": torch.zeros(64, 3, 3, 3), "body.position_encoding.position_ids": torch.arange(16)}
    for key, value in body.state_dict().items():
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if match:
            i, rest = int(match[1]), match[2]
            stack, j = ("encoder", i) if i < n else ("decoder", i - n)
            official = f"body.{stack}.layers.{j}.{attn.get(rest, rest)}"
        else:
            official = f"body.{key}"
        assert ipt.official_key(official, n) == key
        state[official] = torch.randn(value.shape, generator=generator)
    return state


def official_edsr_state(variant: str, seed: int) -> dict[str, torch.Tensor]:
    """`edsr_baseline_x2-*.pt` layout (RGB head, body.0..n, x2 tail, mean shifts), random values."""
    trunk = edsr.build(variant)
    n = trunk.config.n_resblocks
    generator = torch.Generator().manual_seed(seed)
    state = {"tail.0.0.weight": torch.zeros(4, 8, 3, 3), "sub_mean.weight": torch.eye(3).view(3, 3, 1, 1)}
    for key, value in trunk.state_dict().items():
        official = re.sub(r"^blocks\.", "body.", key).replace("body_conv.", f"body.{n}.")
        assert edsr.official_key(official, n) == key
        state[official] = torch.randn(value.shape, generator=generator)
    return state


def test_official_checkpoints_fill_the_frozen_slots_and_the_heads_are_replaced() -> None:
    ipt_state = official_ipt_state(ipt.build("tiny"), seed=1)
    edsr_state = official_edsr_state("tiny", seed=2)
    model = build_panadapter(8, "tiny", "tiny", ipt_state=ipt_state, edsr_state=edsr_state)
    cross_qkv = ipt_state["body.decoder.layers.1.multihead_attn.in_proj_weight"]
    assert torch.equal(model.vit.blocks[3].cross_attn.qkv.weight, cross_qkv)
    assert torch.equal(model.vit.query_embed.weight, ipt_state["body.query_embed.weight"])
    for branch, channels in (("spectral", 8), ("spatial", 9)):
        trunk = getattr(model.prior, branch).trunk
        assert torch.equal(trunk.blocks[1].body[2].weight, edsr_state["body.1.body.2.weight"])
        assert isinstance(trunk.head, MSEncoder) and trunk.head.body[0].in_channels == channels
    with pytest.raises(CheckpointMismatch):
        build_panadapter(8, "tiny", "tiny", ipt_state={k: v for k, v in ipt_state.items() if "norm1" not in k})


# --- parameter counts of the full configuration (meta device: no memory, no time) --------------------------

# Hand counts at the code dimensions (methods.md §3.2 (b) 6, [calc]): one PanAdapterLayer
# (X_k 576->96, two CTFs, CTI 2k->k + attention + gate, k->576) and the code's prior-only SIREN tail.
LAYER = 55_392 + 2 * (4_728 + 37_248 + 18_624) + (18_528 + 37_248 + 1) + 55_872
TOKENS = (64 * 96 + 96) + (1024 * 96 + 96)
CODE_TAIL = (194 * 576 + 576) + (576 * 576 + 576) + (576 * 8 + 8)
VIT_PROJ = 576 * 96 + 96


@pytest.mark.parametrize(
    ("ms_bands", "stage1", "stage2"), [(8, 987_656, 2_394_062), (4, 980_740, 2_391_754)], ids=["8_bands", "4_bands"]
)
def test_full_configuration_parameter_counts(ms_bands: int, stage1: int, stage2: int) -> None:
    with torch.device("meta"):
        model = build_panadapter(ms_bands)
    model.set_stage("prior")
    assert count_parameters(model).trainable == stage1
    lpe = sum(p.numel() for n, p in model.prior.named_parameters() if re.match(r"\w+\.(lpe|project)\.", n))
    assert lpe == 71_296  # methods.md: "LPE + projection parameters: 71k"
    model.set_stage("adapter")
    assert count_parameters(model).trainable == stage2
    assert LAYER == 288_241 and TOKENS == 104_640 and CODE_TAIL == 449_288  # methods.md: 0.288M, 0.105M, 0.449M
    assert all(sum(p.numel() for p in layer.parameters()) == LAYER for layer in model.layers)
    assert sum(p.numel() for p in model.tokens.parameters()) == TOKENS
    # Versus the code's 2.28M: the ViT-output projection and its 96 extra tail input channels.
    code_total = 6 * LAYER + TOKENS + CODE_TAIL - (576 * 8 + 8) + (576 * ms_bands + ms_bands)
    assert stage2 - code_total == VIT_PROJ + 96 * 576
    with torch.device("meta"):
        prior_only = build_panadapter(ms_bands, use_vit_output=False)
    cti = sum(p.numel() for p in model.layers[-1].cti.parameters())  # includes its k->576 projection
    assert cti == 18_528 + 37_248 + 1 + 55_872
    assert count_parameters(prior_only).trainable == code_total - cti  # the dead last injector is left out
    assert prior_only.layers[-1].cti is None and all(layer.cti is not None for layer in prior_only.layers[:-1])
