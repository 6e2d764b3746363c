"""SAM image encoder: equivalence with the official segment_anything encoder, checkpoint loading, features."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from reference_stubs import stub_missing_reference_imports
from torch import nn

from backend.models.backbones import sam_vit
from backend.models.backbones.loading import CheckpointMismatch

stub_missing_reference_imports()
from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.modeling.image_encoder import ImageEncoderViT as OfficialEncoder  # noqa: E402
from segment_anything.modeling.image_encoder import get_rel_pos  # noqa: E402

TOL = 1e-4


def official_encoder(config: sam_vit.SamViTConfig) -> OfficialEncoder:
    """The official encoder with `config`, built the way segment_anything.build_sam builds its own."""
    return OfficialEncoder(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        out_chans=config.out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=config.window_size,
        global_attn_indexes=config.global_attn_indexes,
    ).eval()


def perturb_(module: nn.Module, seed: int, std: float = 0.05) -> None:
    """Add noise to every parameter: the official init leaves pos_embed and rel_pos at zero and the norms
    at identity, which would let a wrong use of them pass unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def image(config: sam_vit.SamViTConfig, batch: int = 1, size: int | None = None) -> torch.Tensor:
    size = size or config.img_size
    return torch.randn(batch, config.in_chans, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[OfficialEncoder, sam_vit.ImageEncoderViT]:
    official = official_encoder(sam_vit.VARIANTS["tiny"])
    perturb_(official, seed=0)
    ours = sam_vit.build("tiny").eval()
    sam_vit.load_official(ours, {f"image_encoder.{k}": v for k, v in official.state_dict().items()})
    return official, ours


@torch.no_grad()
def test_tiny_matches_official_output_and_every_block(tiny_pair) -> None:
    official, ours = tiny_pair
    x = image(ours.config, batch=2)
    official_blocks: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: official_blocks.append(out)) for b in official.blocks]
    try:
        expected = official(x)
    finally:
        for hook in hooks:
            hook.remove()
    features = ours.forward_features(x)
    assert features.out.shape == expected.shape == (2, 256, 8, 8)
    assert (features.out - expected).abs().max() <= TOL
    assert torch.equal(ours(x), features.out)
    assert len(features.blocks) == len(official_blocks) == 3
    for got, want in zip(features.blocks, official_blocks, strict=True):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= TOL


@pytest.fixture(scope="module")
def vit_b_pair() -> tuple[nn.Module, sam_vit.ImageEncoderViT]:
    """The official ViT-B SAM (random weights) and our ViT-B loaded from its full state dict."""
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    perturb_(sam.image_encoder, seed=0, std=0.01)
    ours = sam_vit.build("vit_b").eval()
    sam_vit.load_official(ours, sam.state_dict())
    return sam.image_encoder, ours


def test_vit_b_loads_a_full_sam_state_dict(vit_b_pair) -> None:
    official, ours = vit_b_pair
    assert shapes(ours) == shapes(official)
    assert all(torch.equal(v, official.state_dict()[k]) for k, v in ours.state_dict().items())
    assert len(ours.qkv_projections()) == 12


@pytest.mark.slow
@torch.no_grad()
def test_vit_b_matches_official_at_1024(vit_b_pair) -> None:
    # One 1024x1024 forward of each encoder took 20-40 s in all on 2 shared CPU cores (24 s unloaded), hence `slow`.
    official, ours = vit_b_pair
    x = image(ours.config)
    got = ours(x)
    assert got.shape == (1, 256, 64, 64)
    assert (got - official(x)).abs().max() <= TOL


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_state_dict_keys_and_shapes_match_official(variant: str) -> None:
    # On the meta device nothing is allocated, so even ViT-H costs no memory or time.
    with torch.device("meta"):
        official = sam_model_registry[variant]().image_encoder
        ours = sam_vit.build(variant)
    assert shapes(ours) == shapes(official)
    assert ours.config.img_size == official.img_size
    assert [b.window_size for b in ours.blocks] == [b.window_size for b in official.blocks]


def test_missing_key_is_named(tiny_pair) -> None:
    official, _ = tiny_pair
    state = {f"image_encoder.{k}": v for k, v in official.state_dict().items()}
    del state["image_encoder.blocks.1.attn.rel_pos_h"]
    with pytest.raises(CheckpointMismatch, match=r"missing keys: blocks\.1\.attn\.rel_pos_h"):
        sam_vit.load_official(sam_vit.build("tiny"), state)


def test_wrong_shape_is_named_with_both_shapes(tiny_pair) -> None:
    official, _ = tiny_pair
    state = {f"image_encoder.{k}": v for k, v in official.state_dict().items()}
    state["image_encoder.neck.0.weight"] = torch.zeros(128, 64, 1, 1)
    with pytest.raises(CheckpointMismatch, match=r"neck\.0\.weight: \(128, 64, 1, 1\) .* \(256, 64, 1, 1\) expected"):
        sam_vit.load_official(sam_vit.build("tiny"), state)


def test_features_and_qkv_projections_of_tiny() -> None:
    model = sam_vit.build("tiny").eval()
    config = model.config
    with torch.no_grad():
        features = model.forward_features(image(config, batch=2))
    assert features.out.shape == (2, config.out_chans, 8, 8)
    assert [tuple(b.shape) for b in features.blocks] == [(2, 8, 8, config.embed_dim)] * config.depth
    projections = model.qkv_projections()
    assert [name for name, _ in projections] == [f"blocks.{i}.attn.qkv" for i in range(config.depth)]
    assert all(p.in_features == config.embed_dim and p.out_features == 3 * config.embed_dim for _, p in projections)


def test_other_input_size_resizes_position_embeddings(tiny_pair) -> None:
    _, ours = tiny_pair
    with torch.no_grad():
        features = ours.forward_features(image(ours.config, size=96))
    assert features.out.shape == (1, 256, 6, 6)
    assert features.blocks[-1].shape == (1, 6, 6, 64)
    # The global block's 15-row table (8x8 grid) is resized for a 6-wide grid as the official code would.
    table = ours.blocks[2].attn.rel_pos_h.detach()
    assert torch.allclose(sam_vit.relative_position_table(6, table), get_rel_pos(6, 6, table))


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="vit_b, vit_l, vit_h, tiny"):
        sam_vit.build("vit_g")
