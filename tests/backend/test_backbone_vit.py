"""Plain ViT backbones: official checkpoint layouts, block numerics, position codes, tiny forwards.

The official layouts below are written from the official code (no official package installs here):
* Uni-Perceiver-L: czczup/ViT-Adapter segmentation/mmseg_custom/models/backbones/base/uniperceiver.py
  (`UnifiedBertEncoder`: `visual_embed.{patch_embed.{proj, spatial_pos_embed, temporal_pos_embed},
  embeddings_norm}`, `layers.N.{self_attn.{in_proj, out_proj}, linear1, linear2, norm1, norm2, gamma_1, gamma_2}`).
* Scale-MAE: bair-climate-initiative/scale-mae scalemae/models_mae.py (`MaskedAutoencoderViT` with timm
  `Block`s), decoder and heads from scalemae/lib/fpn.py; the released file was built with
  independent_fcn_head=True, fcn_dim=512, fcn_layers=2, decoder_depth=3.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from backend.models.backbones import vit
from backend.models.backbones.loading import CheckpointMismatch

Shapes = dict[str, tuple[int, ...]]


def uniperceiver_layout(d: int, depth: int, patch: int, grid: int, in_chans: int = 3, mlp_ratio: int = 4) -> Shapes:
    hidden = d * mlp_ratio
    shapes: Shapes = {
        "visual_embed.patch_embed.proj.weight": (d, in_chans, patch, patch),
        "visual_embed.patch_embed.proj.bias": (d,),
        "visual_embed.patch_embed.spatial_pos_embed.weight": (grid * grid, d),  # nn.Embedding(num_patches, d)
        "visual_embed.patch_embed.temporal_pos_embed.weight": (8, d),  # nn.Embedding(8, d)
        "visual_embed.embeddings_norm.weight": (d,),
        "visual_embed.embeddings_norm.bias": (d,),
    }
    for i in range(depth):
        p = f"layers.{i}."
        shapes |= {
            p + "self_attn.in_proj.weight": (3 * d, d),
            p + "self_attn.in_proj.bias": (3 * d,),  # qkv_bias=True
            p + "self_attn.out_proj.weight": (d, d),
            p + "self_attn.out_proj.bias": (d,),
            p + "linear1.weight": (hidden, d),
            p + "linear1.bias": (hidden,),
            p + "linear2.weight": (d, hidden),
            p + "linear2.bias": (d,),
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
            p + "gamma_1": (d,),
            p + "gamma_2": (d,),
        }
    return shapes


def scalemae_encoder_layout(d: int, depth: int, patch: int, grid: int, mlp_ratio: int = 4) -> Shapes:
    hidden = d * mlp_ratio
    shapes: Shapes = {
        "patch_embed.proj.weight": (d, 3, patch, patch),
        "patch_embed.proj.bias": (d,),
        "cls_token": (1, 1, d),
        "pos_embed": (1, grid * grid + 1, d),  # fixed sin-cos table, an nn.Parameter so it is saved
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        shapes |= {
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d),
            p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d),
            p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (hidden, d),
            p + "mlp.fc1.bias": (hidden,),
            p + "mlp.fc2.weight": (d, hidden),
            p + "mlp.fc2.bias": (d,),
        }
    return shapes


def scalemae_pretraining_extras(grid: int, dec: int = 512, d: int = 1024, fcn: int = 512) -> Shapes:
    """A representative part of the MAE decoder, FPN and reconstruction heads (all dropped when loading)."""
    shapes: Shapes = {
        "mask_token": (1, 1, dec),
        "mask_token_decoder": (1, 1, dec),
        "decoder_embed.weight": (dec, d),
        "decoder_embed.bias": (dec,),
        "decoder_pos_embed": (1, grid * grid + 1, dec),
        "decoder_norm.weight": (dec,),
        "decoder_norm.bias": (dec,),
        "fpn.fpn1.0.weight": (dec, dec, 2, 2),
        "fpn.fpn2.0.weight": (dec, dec, 2, 2),
    }
    for i in range(3):
        shapes[f"decoder_blocks.{i}.attn.qkv.weight"] = (3 * dec, dec)
    for head in ("fcn_high", "fcn_low"):
        shapes |= {
            f"{head}.proj.weight": (fcn, dec, 1, 1),
            f"{head}.conv_blocks.0.residual.weight": (fcn, fcn, 1, 1),
            f"{head}.pred.0.ln.weight": (fcn,),
            f"{head}.pred.7.weight": (fcn // 2, 3, 2, 2),
            f"{head}.pred.7.bias": (3,),
        }
    return shapes


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # inputs drawn with torch.randn are the same on every run


def on_meta(shapes: Shapes) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def random_state(shapes: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(s, generator=g) for k, s in shapes.items()}


# ---------------------------------------------------------------- direct formulas


def attention_reference(x: torch.Tensor, w_qkv, b_qkv, w_out, b_out, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    q, k, v = F.linear(x, w_qkv, b_qkv).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1)
    return F.linear((weights @ v).transpose(1, 2).reshape(b, n, d), w_out, b_out)


def uniperceiver_layer_reference(x: torch.Tensor, s: dict[str, torch.Tensor], p: str, heads: int) -> torch.Tensor:
    """BertLayer: x + gamma_1 * attn(LN1(x)); x + gamma_2 * linear2(gelu(linear1(LN2(x))))."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-5)
    attn = p + "self_attn."
    a = attention_reference(
        h,
        s[attn + "in_proj.weight"],
        s[attn + "in_proj.bias"],
        s[attn + "out_proj.weight"],
        s[attn + "out_proj.bias"],
        heads,
    )
    x = x + s[p + "gamma_1"] * a
    h = F.layer_norm(x, (d,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-5)
    m = F.linear(F.gelu(F.linear(h, s[p + "linear1.weight"], s[p + "linear1.bias"])), s[p + "linear2.weight"])
    return x + s[p + "gamma_2"] * (m + s[p + "linear2.bias"])


def timm_block_reference(x: torch.Tensor, s: dict[str, torch.Tensor], p: str, heads: int) -> torch.Tensor:
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-6)
    x = x + attention_reference(
        h, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"], s[p + "attn.proj.weight"], s[p + "attn.proj.bias"], heads
    )
    h = F.layer_norm(x, (d,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-6)
    return x + F.linear(
        F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
        s[p + "mlp.fc2.weight"],
        s[p + "mlp.fc2.bias"],
    )


def sincos_reference(dim: int, h: int, w: int, res: float) -> torch.Tensor:
    """Scale-MAE's code element by element: [sin, cos](col * res * w_k), then [sin, cos](row * res * w_k)."""
    quarter = dim // 4
    rows = []
    for i in range(h):
        for j in range(w):
            row = []
            for coord in (j, i):
                angles = [coord * res / 10000 ** (k / quarter) for k in range(quarter)]
                row += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- full-size layouts


def test_uniperceiver_l_loads_official_layout() -> None:
    with torch.device("meta"):
        model = vit.build("uniperceiver_vit_l")
    vit.load_official(model, on_meta(uniperceiver_layout(1024, 24, 16, 14)))
    # 303.36M as reported for WEFT's frozen backbone.
    assert sum(p.numel() for p in model.parameters()) == 303_356_928


def test_scalemae_l_loads_encoder_and_drops_pretraining_extras() -> None:
    with torch.device("meta"):
        model = vit.build("scalemae_vit_l")
    extras = scalemae_pretraining_extras(14)
    vit.load_official(model, on_meta(scalemae_encoder_layout(1024, 24, 16, 14) | extras))
    assert all(vit.scalemae_key(k) is None for k in [*extras, "pos_embed"])
    assert vit.scalemae_key("blocks.23.mlp.fc2.bias") == "blocks.23.mlp.fc2.bias"


def test_uniperceiver_missing_key_is_named() -> None:
    with torch.device("meta"):
        model = vit.build("uniperceiver_vit_l")
    state = on_meta(uniperceiver_layout(1024, 24, 16, 14))
    del state["layers.7.gamma_2"]
    with pytest.raises(CheckpointMismatch, match=r"missing keys: blocks\.7\.gamma_2"):
        vit.load_official(model, state)


def test_uniperceiver_wrong_shape_is_named() -> None:
    with torch.device("meta"):
        model = vit.build("uniperceiver_vit_l")
    state = on_meta(uniperceiver_layout(1024, 24, 16, 14))
    state["visual_embed.patch_embed.spatial_pos_embed.weight"] = torch.empty(256, 1024, device="meta")
    with pytest.raises(CheckpointMismatch, match=r"wrong shapes: spatial_pos_embed: \(256, 1024\)"):
        vit.load_official(model, state)


def test_scalemae_missing_and_unknown_keys_are_named() -> None:
    with torch.device("meta"):
        model = vit.build("scalemae_vit_l")
    state = on_meta(scalemae_encoder_layout(1024, 24, 16, 14))
    del state["blocks.0.attn.qkv.bias"]
    state["head.weight"] = torch.empty(10, 1024, device="meta")  # a fine-tuning head is no encoder key
    with pytest.raises(CheckpointMismatch, match=r"missing keys: blocks\.0\.attn\.qkv\.bias.*unexpected keys: head"):
        vit.load_official(model, state)


# ---------------------------------------------------------------- numerics


def test_uniperceiver_block_matches_direct_formula() -> None:
    model = vit.build("tiny")
    state = random_state(uniperceiver_layout(32, 2, 4, 8), seed=1)
    vit.load_official(model, state)
    x = torch.randn(2, 10, 32)
    expected = uniperceiver_layer_reference(x, state, "layers.1.", heads=4)
    torch.testing.assert_close(model.blocks[1](x), expected, atol=1e-5, rtol=1e-5)


def test_scalemae_block_matches_direct_formula() -> None:
    model = vit.build("tiny", layout="scalemae")
    state = random_state(scalemae_encoder_layout(32, 2, 4, 8), seed=2)
    vit.load_official(model, state)
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(
        model.blocks[0](x), timm_block_reference(x, state, "blocks.0.", heads=4), atol=1e-5, rtol=1e-5
    )


def test_position_table_resizes_bicubically() -> None:
    model = vit.build("tiny", patch_size=16, pretrain_size=224)  # the official 14x14 table, narrow
    table = model.spatial_pos_embed.detach()
    assert table.shape == (196, 32)
    image = table.reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    for grid in [(20, 24), (32, 32), (9, 5)]:
        expected = F.interpolate(image, size=grid, mode="bicubic", align_corners=False)
        expected = expected.reshape(32, -1).T
        torch.testing.assert_close(model.spatial_positions(grid), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.spatial_positions((14, 14)), table, atol=1e-6, rtol=0)


def test_scalemae_sincos_code_at_known_resolution() -> None:
    code = vit.sincos_positions_with_resolution(16, (4, 4), torch.tensor(10.0))
    assert code.shape == (1, 16, 16)
    torch.testing.assert_close(code[0], sincos_reference(16, 4, 4, 10.0), atol=1e-5, rtol=0)
    # One resolution per sample, rectangular grid (row-major tokens: column code first, then row code).
    code = vit.sincos_positions_with_resolution(8, (2, 3), torch.tensor([0.5, 3.0]))
    torch.testing.assert_close(code[0], sincos_reference(8, 2, 3, 0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(code[1], sincos_reference(8, 2, 3, 3.0), atol=1e-5, rtol=0)


def test_uniperceiver_forward_matches_official_computation() -> None:
    model = vit.build("tiny").eval()
    state = random_state(uniperceiver_layout(32, 2, 4, 8), seed=3)
    vit.load_official(model, state)
    x = torch.randn(2, 3, 24, 40)  # a 6x10 grid: the 8x8 table is resized
    # UnifiedBertEncoder.forward: patch conv + resized table + temporal[0], LayerNorm, then the layers.
    t = F.conv2d(
        x, state["visual_embed.patch_embed.proj.weight"], state["visual_embed.patch_embed.proj.bias"], stride=4
    )
    t = t.flatten(2).transpose(1, 2)
    table = state["visual_embed.patch_embed.spatial_pos_embed.weight"].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    pos = F.interpolate(table, size=(6, 10), mode="bicubic", align_corners=False).reshape(1, 32, 60).permute(0, 2, 1)
    t = t + pos + state["visual_embed.patch_embed.temporal_pos_embed.weight"][0]
    t = F.layer_norm(
        t, (32,), state["visual_embed.embeddings_norm.weight"], state["visual_embed.embeddings_norm.bias"], eps=1e-5
    )
    for i in range(2):
        t = uniperceiver_layer_reference(t, state, f"layers.{i}.", heads=4)
    with torch.no_grad():
        features = model.forward_features(x)
    torch.testing.assert_close(features.out, t, atol=1e-5, rtol=1e-5)
    assert [f.shape for f in features.blocks] == [(2, 60, 32)] * 2


def test_scalemae_forward_matches_official_computation() -> None:
    model = vit.build("tiny", layout="scalemae", input_res=2.5).eval()
    state = random_state(scalemae_encoder_layout(32, 2, 4, 8), seed=4)
    vit.load_official(model, state)
    x = torch.randn(2, 3, 16, 16)
    # forward_encoder at mask_ratio 0 (unshuffled): patch conv + GSD sin-cos code, cls token, blocks, norm.
    t = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=4).flatten(2)
    t = t.transpose(1, 2) + sincos_reference(32, 4, 4, 2.5)
    t = torch.cat([state["cls_token"].expand(2, -1, -1), t], dim=1)
    for i in range(2):
        t = timm_block_reference(t, state, f"blocks.{i}.", heads=4)
    expected = F.layer_norm(t, (32,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    with torch.no_grad():
        features = model.forward_features(x)
        per_sample = model.forward_features(x, input_res=torch.tensor([2.5, 5.0])).out
    torch.testing.assert_close(features.out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.blocks[-1], t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_sample[0], expected[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(per_sample[1], expected[1], atol=1e-3)  # the GSD changes the code


# ---------------------------------------------------------------- tiny forwards and adapter hooks


@pytest.mark.parametrize("layout", ["uniperceiver", "scalemae"])
def test_tiny_forward_blocks_and_qkv(layout: str) -> None:
    model = vit.build("tiny", layout=layout, depth=3)
    x = torch.randn(1, 3, 32, 48)
    features = model.forward_features(x)
    tokens = 8 * 12 + (layout == "scalemae")
    assert features.out.shape == (1, tokens, 32)
    assert len(features.blocks) == 3 and all(f.shape == (1, tokens, 32) for f in features.blocks)
    torch.testing.assert_close(model(x), features.out)
    names = [name for name, _ in model.qkv_projections()]
    assert names == [f"blocks.{i}.attn.qkv" for i in range(3)]


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown ViT variant"):
        vit.build("vit_h")


def test_drop_path_only_in_training() -> None:
    x = torch.ones(64, 3, 5)
    dropped = vit.drop_path(x, 0.5, training=True)
    per_sample = dropped[:, 0, 0]
    assert set(per_sample.tolist()) <= {0.0, 2.0} and (dropped == per_sample[:, None, None]).all()
    assert vit.drop_path(x, 0.5, training=False) is x
    model = vit.build("tiny", drop_path_rate=0.4).eval()
    reference = vit.build("tiny")
    reference.load_state_dict(model.state_dict())
    image = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(model(image), reference(image))
