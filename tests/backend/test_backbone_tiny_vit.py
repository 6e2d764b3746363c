"""MobileSAM TinyViT encoder: equivalence with the official mobile_sam encoder, checkpoint loading, features."""

from __future__ import annotations

import pytest
import torch
from reference_stubs import stub_missing_reference_imports
from torch import nn

from backend.models.backbones import tiny_vit
from backend.models.backbones.loading import CheckpointMismatch

stub_missing_reference_imports()
from mobile_sam import sam_model_registry  # noqa: E402
from mobile_sam.modeling import Sam  # noqa: E402
from mobile_sam.modeling import TinyViT as OfficialTinyViT  # noqa: E402

TOL = 1e-4
VIT_T = tiny_vit.VARIANTS["vit_t"]


def official_vit_t(img_size: int) -> OfficialTinyViT:
    """The official vit_t encoder for `img_size`, with the arguments mobile_sam.build_sam.build_sam_vit_t uses."""
    return OfficialTinyViT(
        img_size=img_size,
        in_chans=3,
        num_classes=1000,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )


def randomise_(module: nn.Module, seed: int, std: float = 0.05) -> None:
    """Perturb every parameter and draw BatchNorm statistics, then switch to eval mode.

    The official init leaves attention biases at zero, norms at identity and BatchNorm statistics at (0, 1),
    which would let a wrong use of them pass unnoticed. `eval()` comes last because the official attention
    caches its gathered biases when switched to eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    module.eval()


def prefixed(module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"image_encoder.{k}": v for k, v in module.state_dict().items()}


def image(size: int | tuple[int, int], batch: int = 1) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


def official_output(encoder: OfficialTinyViT, x: torch.Tensor) -> torch.Tensor:
    """The official forward with its hard-coded 64x64 output grid replaced by the actual H/16 x W/16 one.

    At 1024 the two agree; at other sizes the official forward cannot reshape its tokens at all.
    """
    y = encoder.patch_embed(x)
    for layer in encoder.layers:
        y = layer(y)
    grid = (x.shape[2] // 16, x.shape[3] // 16)
    return encoder.neck(y.view(len(y), *grid, -1).permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def pair_256() -> tuple[OfficialTinyViT, tiny_vit.TinyViTEncoder]:
    official = official_vit_t(256)
    randomise_(official, seed=0)
    ours = tiny_vit.build("vit_t", img_size=256).eval()
    tiny_vit.load_official(ours, prefixed(official))
    return official, ours


@pytest.fixture(scope="module")
def tiny() -> tiny_vit.TinyViTEncoder:
    model = tiny_vit.build("tiny")
    randomise_(model, seed=2)
    return model


@torch.no_grad()
def test_vit_t_matches_official_at_256_in_every_block(pair_256) -> None:
    official, ours = pair_256
    assert ours.img_size == 256
    x = image(256, batch=2)
    official_blocks: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(lambda _m, _i, out: official_blocks.append(out))
        for layer in official.layers
        for block in layer.blocks
    ]
    try:
        expected = official_output(official, x)
    finally:
        for hook in hooks:
            hook.remove()
    features = ours.forward_features(x)
    assert features.out.shape == expected.shape == (2, 256, 16, 16)
    assert (features.out - expected).abs().max() <= TOL
    assert torch.equal(ours(x), features.out)
    # MBConv blocks give (B, C, H, W) maps; TinyViT blocks (B, h, w, C) grids of the official (B, h*w, C) tokens.
    assert [tuple(b.shape) for b in features.blocks] == [(2, 64, 64, 64)] * 2 + [(2, 32, 32, 128)] * 2 + [
        (2, 16, 16, 160)
    ] * 6 + [(2, 16, 16, 320)] * 2
    assert len(official_blocks) == 12
    for got, want in zip(features.blocks, official_blocks, strict=True):
        got = got if got.ndim == want.ndim else got.flatten(1, 2)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= TOL


def test_attention_bias_index_is_the_official_one(pair_256) -> None:
    official, ours = pair_256
    for stage in (1, 2):  # windows 7 and 14
        want = official.layers[stage].blocks[0].attn.attention_bias_idxs
        assert torch.equal(ours.layers[stage].blocks[0].attn.attention_bias_idxs, want)


@pytest.mark.slow  # one 1024² forward of each encoder on the CPU (30 s on 2 loaded cores)
@torch.no_grad()
def test_vit_t_loads_a_full_mobile_sam_state_dict_and_matches_official_at_1024() -> None:
    # One 1024x1024 forward of each encoder, the only size the official forward runs at: a few seconds each.
    torch.manual_seed(0)
    sam: Sam = sam_model_registry["vit_t"]()
    randomise_(sam.image_encoder, seed=1)
    state = sam.state_dict()
    assert any(k.startswith("mask_decoder.") for k in state)  # the whole SAM, not only its encoder
    ours = tiny_vit.build("vit_t").eval()
    tiny_vit.load_official(ours, state)
    assert ours.img_size == sam.image_encoder.img_size == 1024
    official_params = sum(p.numel() for p in sam.image_encoder.parameters())
    assert sum(p.numel() for p in ours.parameters()) == official_params
    assert len(ours.qkv_projections()) == sum(VIT_T.depths[1:]) == 10

    x = image(1024)
    expected = sam.image_encoder(x)
    del sam
    got = ours(x)
    assert got.shape == expected.shape == (1, 256, 64, 64)
    assert (got - expected).abs().max() <= TOL


@torch.no_grad()
def test_tiny_features_shapes_and_qkv_projections(tiny) -> None:
    config = tiny.config
    features = tiny.forward_features(image(config.img_size, batch=2))
    assert features.out.shape == (2, config.out_chans, 4, 4)
    assert [tuple(b.shape) for b in features.blocks] == [
        (2, 16, 16, 16),
        (2, 8, 8, 32),
        (2, 4, 4, 48),
        (2, 4, 4, 48),
        (2, 4, 4, 64),
    ]
    projections = tiny.qkv_projections()
    assert [name for name, _ in projections] == [
        "layers.1.blocks.0.attn.qkv",
        "layers.2.blocks.0.attn.qkv",
        "layers.2.blocks.1.attn.qkv",
        "layers.3.blocks.0.attn.qkv",
    ]
    assert [(p.in_features, p.out_features) for _, p in projections] == [(32, 96), (48, 144), (48, 144), (64, 192)]


@torch.no_grad()
def test_blocks_are_the_modules_the_forward_runs(tiny) -> None:
    seen: list[torch.Tensor] = []
    blocks = tiny.blocks
    assert len(blocks) == sum(tiny.config.depths)
    hooks = [block.register_forward_hook(lambda _m, _i, out: seen.append(out)) for block in blocks]
    try:
        features = tiny.forward_features(image(64))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == len(features.blocks)
    assert all(a is b for a, b in zip(seen, features.blocks, strict=True))


@torch.no_grad()
def test_non_square_input(tiny) -> None:
    features = tiny.forward_features(image((64, 96)))
    assert features.out.shape == (1, 32, 4, 6)
    assert features.blocks[-1].shape == (1, 4, 6, 64)


@torch.no_grad()
def test_train_mode_keeps_batchnorm_frozen(tiny) -> None:
    x = image(64, batch=2)
    expected = tiny(x)
    stats = {k: v.clone() for k, v in tiny.state_dict().items() if "running" in k}
    try:
        tiny.train()
        assert tiny.training and tiny.layers[1].blocks[0].mlp.training
        assert not any(m.training for m in tiny.modules() if isinstance(m, nn.BatchNorm2d))
        assert torch.equal(tiny(x), expected)
    finally:
        tiny.eval()
    assert all(torch.equal(tiny.state_dict()[k], v) for k, v in stats.items())


def test_missing_key_is_named(tiny) -> None:
    state = prefixed(tiny)
    del state["image_encoder.layers.1.blocks.0.local_conv.bn.running_var"]  # buffers are checked too
    with pytest.raises(CheckpointMismatch, match=r"missing keys: layers\.1\.blocks\.0\.local_conv\.bn\.running_var"):
        tiny_vit.load_official(tiny_vit.build("tiny"), state)


def test_wrong_shape_is_named_with_both_shapes(tiny) -> None:
    state = prefixed(tiny)
    state["image_encoder.layers.2.blocks.0.attn.attention_biases"] = torch.zeros(3, 16)
    with pytest.raises(
        CheckpointMismatch, match=r"layers\.2\.blocks\.0\.attn\.attention_biases: \(3, 16\) .* \(3, 9\) expected"
    ):
        tiny_vit.load_official(tiny_vit.build("tiny"), state)


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="vit_t, tiny"):
        tiny_vit.build("vit_s")


@pytest.mark.weights
@torch.no_grad()
def test_the_installed_mobile_sam_checkpoint_matches_the_official_encoder_on_a_real_tile() -> None:
    """The official MobileSAM weights (installed by `make weights` from the package index) in our encoder and in
    the official one give the same features for a real LEVIR-CD tile, normalised as FILF normalises it."""
    import rasterio
    from conftest import levir

    from backend import weights
    from backend.models.backbones.loading import read_checkpoint

    entry = weights.get_entry("mobile_sam")
    if weights.status(entry) != "installed":
        pytest.skip("the official MobileSAM checkpoint is not installed (make weights installs it)")
    state = read_checkpoint(weights.model_path(entry))
    official = official_vit_t(256)
    encoder = {k.removeprefix("image_encoder."): v for k, v in state.items() if k.startswith("image_encoder.")}
    missing, unexpected = official.load_state_dict(encoder, strict=False)
    assert not unexpected and all("attention_bias_idxs" in k for k in missing), (missing, unexpected)
    official.eval()
    ours = tiny_vit.build("vit_t", img_size=256).eval()
    tiny_vit.load_official(ours, state)
    with rasterio.open(levir("test_2_0000_0000")[0]) as ds:
        tile = torch.from_numpy(ds.read(window=((0, 256), (0, 256))).astype("float32"))[None]
    spec = weights.backbone_info("mobile_sam").input
    x = (tile - torch.tensor(spec["mean"]).view(1, 3, 1, 1)) / torch.tensor(spec["std"]).view(1, 3, 1, 1)
    expected = official_output(official, x)
    assert expected.abs().mean() > 0.01  # real features, not an all-zero map
    assert (ours(x) - expected).abs().max() <= TOL
