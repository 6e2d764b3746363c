"""IPT body and EDSR-baseline trunk: official checkpoint layouts, block numerics, tiny forwards.

The official layouts below are written from the official code (no official package installs here):
* IPT: huawei-noah/Pretrained-IPT model/ipt.py. The `ipt` model holds `sub_mean`/`add_mean` (MeanShift
  convs), `head.N` (one CNN head per task), `body` (VisionTransformer) and `tail.N`; the body holds
  `linear_encoding`, `mlp_head` (Linear at 0 and 3), `query_embed`, `position_encoding.{pe, position_ids}`,
  `encoder.layers.N.{self_attn, linear1, linear2, norm1, norm2}` and `decoder.layers.N.{self_attn,
  multihead_attn, linear1, linear2, norm1, norm2, norm3}`; nn.MultiheadAttention(bias=False) stores
  `in_proj_weight` and `out_proj.weight`.
* EDSR: sanghyun-son/EDSR-PyTorch src/model/edsr.py and common.py: `sub_mean`, `add_mean`, `head.0`,
  `body.N.body.{0,2}` (ResBlock convs), `body.16` (last body conv), `tail.0.0` (x2 upsampler conv), `tail.1`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backend.models.backbones import edsr, ipt
from backend.models.backbones.loading import CheckpointMismatch

Shapes = dict[str, tuple[int, ...]]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # inputs drawn with torch.randn are the same on every run


def on_meta(shapes: Shapes) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def random_state(shapes: Shapes, seed: int = 0, std: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: std * torch.randn(s, generator=g) for k, s in shapes.items()}


# ---------------------------------------------------------------- IPT


def ipt_body_layout(d: int, layers: int, hidden: int, seq: int, queries: int, out_proj_bias: bool = False) -> Shapes:
    shapes: Shapes = {
        "body.linear_encoding.weight": (d, d),
        "body.linear_encoding.bias": (d,),
        "body.mlp_head.0.weight": (hidden, d),
        "body.mlp_head.0.bias": (hidden,),
        "body.mlp_head.3.weight": (d, hidden),
        "body.mlp_head.3.bias": (d,),
        "body.query_embed.weight": (queries, d * seq),
        "body.position_encoding.pe.weight": (seq, d),
    }
    for stack, attns, norms in (("encoder", ["self_attn"], 2), ("decoder", ["self_attn", "multihead_attn"], 3)):
        for i in range(layers):
            p = f"body.{stack}.layers.{i}."
            for attn in attns:
                shapes[p + attn + ".in_proj_weight"] = (3 * d, d)
                shapes[p + attn + ".out_proj.weight"] = (d, d)
                if out_proj_bias:
                    shapes[p + attn + ".out_proj.bias"] = (d,)
            shapes |= {
                p + "linear1.weight": (hidden, d),
                p + "linear1.bias": (hidden,),
                p + "linear2.weight": (d, hidden),
                p + "linear2.bias": (d,),
            }
            for n in range(1, norms + 1):
                shapes |= {p + f"norm{n}.weight": (d,), p + f"norm{n}.bias": (d,)}
    return shapes


IPT_OUTER = {  # a representative part of the outer `ipt` model (dropped when loading)
    "sub_mean.weight": (3, 3, 1, 1),
    "sub_mean.bias": (3,),
    "add_mean.weight": (3, 3, 1, 1),
    "add_mean.bias": (3,),
    "head.0.0.weight": (64, 3, 3, 3),
    "head.0.1.body.0.weight": (64, 64, 5, 5),
    "head.5.2.body.2.bias": (64,),
    "tail.0.0.0.weight": (256, 64, 3, 3),
    "tail.0.1.weight": (3, 64, 3, 3),
}


def ipt_state(cfg: ipt.IPTConfig, seed: int, out_proj_bias: bool = False) -> dict[str, torch.Tensor]:
    shapes = ipt_body_layout(
        cfg.embedding_dim, cfg.num_layers, cfg.hidden_dim, cfg.seq_length, cfg.num_queries, out_proj_bias
    )
    state = random_state(shapes | IPT_OUTER, seed, std=0.1)  # keeps activations O(1) for fp32 comparisons
    state["body.position_encoding.position_ids"] = torch.arange(cfg.seq_length).expand(1, -1)
    return state


def mha(state: dict[str, torch.Tensor], prefix: str, heads: int) -> nn.MultiheadAttention:
    d = state[prefix + "out_proj.weight"].shape[0]
    module = nn.MultiheadAttention(d, heads, bias=False)
    module.load_state_dict(
        {"in_proj_weight": state[prefix + "in_proj_weight"], "out_proj.weight": state[prefix + "out_proj.weight"]}
    )
    return module


def ipt_reference(state: dict[str, torch.Tensor], cfg: ipt.IPTConfig, x: torch.Tensor) -> torch.Tensor:
    """VisionTransformer.forward(x, query_idx) of model/ipt.py, sequence-first with nn.MultiheadAttention."""
    d, h = cfg.embedding_dim, cfg.num_heads

    def lin(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.linear(t, state[p + ".weight"], state[p + ".bias"])

    def ln(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.layer_norm(t, (d,), state[p + ".weight"], state[p + ".bias"])

    def ffn(t: torch.Tensor, p: str) -> torch.Tensor:
        return lin(F.relu(lin(t, p + "linear1")), p + "linear2")

    p = cfg.patch_dim
    t = F.unfold(x, p, stride=p).transpose(1, 2).transpose(0, 1)
    t = lin(t, "body.linear_encoding") + t
    query = state["body.query_embed.weight"][cfg.query_idx].view(-1, 1, d).repeat(1, t.size(1), 1)
    pos = state["body.position_encoding.pe.weight"].unsqueeze(1)
    layer_pos = pos if cfg.pos_every else None
    if not cfg.pos_every:
        t = t + pos
    for i in range(cfg.num_layers):
        pre = f"body.encoder.layers.{i}."
        s = ln(t, pre + "norm1")
        qk = s if layer_pos is None else s + layer_pos
        t = t + mha(state, pre + "self_attn.", h)(qk, qk, s)[0]
        t = t + ffn(ln(t, pre + "norm2"), pre)
    memory = t
    for i in range(cfg.num_layers):
        pre = f"body.decoder.layers.{i}."
        s = ln(t, pre + "norm1")
        t = t + mha(state, pre + "self_attn.", h)(s + query, s + query, value=s)[0]
        s = ln(t, pre + "norm2")
        key = memory if layer_pos is None else memory + layer_pos
        t = t + mha(state, pre + "multihead_attn.", h)(s + query, key, memory)[0]
        t = t + ffn(ln(t, pre + "norm3"), pre)
    t = lin(F.relu(lin(t, "body.mlp_head.0")), "body.mlp_head.3") + t
    t = t.transpose(0, 1).reshape(x.shape[0], -1, cfg.flatten_dim)
    return F.fold(t.transpose(1, 2), cfg.img_dim, p, stride=p)


def test_ipt_loads_official_layout_and_drops_outer_model() -> None:
    with torch.device("meta"):
        model = ipt.build("ipt")
    cfg = model.config
    assert (cfg.embedding_dim, cfg.num_heads, cfg.hidden_dim, cfg.seq_length) == (576, 12, 2304, 256)
    shapes = ipt_body_layout(576, 12, 2304, 256, 6) | IPT_OUTER
    shapes["body.position_encoding.position_ids"] = (1, 256)
    ipt.load_official(model, on_meta(shapes))
    dropped = [*IPT_OUTER, "body.position_encoding.position_ids"]
    assert all(ipt.official_key(k, 12) is None for k in dropped)
    assert ipt.official_key("body.encoder.layers.3.self_attn.in_proj_weight", 12) == "blocks.3.attn.qkv.weight"
    assert ipt.official_key("body.decoder.layers.3.self_attn.out_proj.weight", 12) == "blocks.15.attn.proj.weight"
    assert (
        ipt.official_key("body.decoder.layers.0.multihead_attn.in_proj_weight", 12) == "blocks.12.cross_attn.qkv.weight"
    )
    assert ipt.official_key("body.decoder.layers.11.norm3.bias", 12) == "blocks.23.norm3.bias"


def test_ipt_out_proj_bias_needs_the_matching_config() -> None:
    cfg = ipt.VARIANTS["tiny"]
    state = ipt_state(cfg, seed=0, out_proj_bias=True)
    with pytest.raises(CheckpointMismatch, match=r"unexpected keys: blocks\.0\.attn\.proj\.bias"):
        ipt.load_official(ipt.build("tiny"), state)
    ipt.load_official(ipt.build("tiny", proj_bias=True), state)


def test_ipt_missing_key_and_wrong_shape_are_named() -> None:
    with torch.device("meta"):
        model = ipt.build("ipt")
    state = on_meta(ipt_body_layout(576, 12, 2304, 256, 6))
    del state["body.decoder.layers.5.multihead_attn.out_proj.weight"]
    with pytest.raises(CheckpointMismatch, match=r"missing keys: blocks\.17\.cross_attn\.proj\.weight"):
        ipt.load_official(model, state)
    state = on_meta(ipt_body_layout(576, 12, 2304, 256, 1))  # option.py's default num_queries=1
    with pytest.raises(CheckpointMismatch, match=r"wrong shapes: query_embed\.weight: \(1, 147456\)"):
        ipt.load_official(model, state)


def test_ipt_attention_equals_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(48, 6, bias=False, batch_first=True)
    assert set(reference.state_dict()) == {"in_proj_weight", "out_proj.weight"}  # no out_proj bias either
    attention = ipt.Attention(48, 6)
    attention.qkv.weight.data.copy_(reference.in_proj_weight)
    attention.proj.weight.data.copy_(reference.out_proj.weight)
    x, key, value = torch.randn(3, 2, 7, 48).unbind(0)
    memory = torch.randn(2, 5, 48)
    with torch.no_grad():
        cases = [(x, x, x), (x + key, x + key, x), (x, memory + 1.0, memory), (x, key[:, :5], value[:, :5])]
        for q, k, v in cases:
            torch.testing.assert_close(attention(q, k, v), reference(q, k, v)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_every", [False, True])
def test_ipt_forward_matches_official_computation(pos_every: bool) -> None:
    model = ipt.build("tiny", pos_every=pos_every, query_idx=1).eval()
    state = ipt_state(model.config, seed=1)
    ipt.load_official(model, state)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        features = model.forward_features(x)
        expected = ipt_reference(state, model.config, x)
    torch.testing.assert_close(features.out, expected, atol=1e-5, rtol=1e-5)
    assert features.out.shape == x.shape
    assert len(features.blocks) == 4 and all(f.shape == (2, 16, 32) for f in features.blocks)


def test_ipt_hook_runs_between_blocks_and_feeds_the_decoder_memory() -> None:
    model = ipt.build("tiny").eval()
    x = torch.randn(1, 8, 8, 8)
    seen: list[int] = []

    def record(i: int, tokens: torch.Tensor) -> torch.Tensor:
        seen.append(i)
        return tokens

    with torch.no_grad():
        plain = model(x)
        hooked = model.forward_features(x, after_block=record).out
        shifted = model.forward_features(x, after_block=lambda i, t: t + 1.0 if i == 1 else t).out
    assert seen == [0, 1, 2, 3]
    torch.testing.assert_close(hooked, plain)
    assert not torch.allclose(shifted, plain, atol=1e-3)


def test_ipt_tiny_qkv_projections_and_input_size() -> None:
    model = ipt.build("tiny")
    names = [name for name, _ in model.qkv_projections()]
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"] + [
        f"blocks.{i}.{a}.qkv" for i in (2, 3) for a in ("attn", "cross_attn")
    ]
    assert all(m.bias is None for _, m in model.qkv_projections())
    with pytest.raises(ValueError, match="8 px a side"):
        model(torch.randn(1, 8, 16, 16))
    with pytest.raises(ValueError, match="unknown IPT variant"):
        ipt.build("ipt_large")


# ---------------------------------------------------------------- EDSR


def edsr_layout(n_resblocks: int, n_feats: int, n_colors: int = 3, scale: int = 2) -> Shapes:
    shapes: Shapes = {
        "sub_mean.weight": (3, 3, 1, 1),
        "sub_mean.bias": (3,),
        "add_mean.weight": (3, 3, 1, 1),
        "add_mean.bias": (3,),
        "head.0.weight": (n_feats, n_colors, 3, 3),
        "head.0.bias": (n_feats,),
        f"body.{n_resblocks}.weight": (n_feats, n_feats, 3, 3),
        f"body.{n_resblocks}.bias": (n_feats,),
        "tail.0.0.weight": (scale * scale * n_feats, n_feats, 3, 3),
        "tail.0.0.bias": (scale * scale * n_feats,),
        "tail.1.weight": (n_colors, n_feats, 3, 3),
        "tail.1.bias": (n_colors,),
    }
    for i in range(n_resblocks):
        for j in (0, 2):
            shapes |= {f"body.{i}.body.{j}.weight": (n_feats, n_feats, 3, 3), f"body.{i}.body.{j}.bias": (n_feats,)}
    return shapes


def test_edsr_baseline_loads_official_layout_and_drops_tail_and_mean_shifts() -> None:
    model = edsr.build("edsr_baseline")
    state = random_state(edsr_layout(16, 64), seed=0)
    edsr.load_official(model, state)
    torch.testing.assert_close(model.blocks[15].body[2].weight, state["body.15.body.2.weight"])
    torch.testing.assert_close(model.body_conv.bias, state["body.16.bias"])
    dropped = [k for k in state if k.startswith(("tail.", "sub_mean.", "add_mean."))]
    assert len(dropped) == 8 and all(edsr.official_key(k, 16) is None for k in dropped)
    assert len(model.blocks) == 16 and model.qkv_projections() == []


def test_edsr_missing_key_and_wrong_shape_are_named() -> None:
    model = edsr.build("edsr_baseline")
    state = random_state(edsr_layout(16, 64), seed=0)
    del state["body.4.body.0.bias"]
    state["head.0.weight"] = torch.zeros(64, 8, 3, 3)  # an 8-band head is not the RGB checkpoint's
    with pytest.raises(
        CheckpointMismatch, match=r"missing keys: blocks\.4\.body\.0\.bias.*wrong shapes: head\.0\.weight"
    ):
        edsr.load_official(model, state)


def test_edsr_resblock_matches_direct_formula() -> None:
    block = edsr.ResBlock(8, 3, res_scale=0.1)
    x = torch.randn(2, 8, 9, 7)
    c1, c2 = block.body[0], block.body[2]
    expected = F.conv2d(F.relu(F.conv2d(x, c1.weight, c1.bias, padding=1)), c2.weight, c2.bias, padding=1) * 0.1 + x
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_edsr_tiny_forward_matches_official_trunk() -> None:
    model = edsr.build("tiny")
    state = random_state(edsr_layout(2, 8), seed=2)
    edsr.load_official(model, state)
    x = torch.randn(1, 3, 12, 10)

    def conv(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.conv2d(t, state[p + ".weight"], state[p + ".bias"], padding=1)

    head = conv(x, "head.0")
    res, taps = head, []
    for i in range(2):
        res = conv(F.relu(conv(res, f"body.{i}.body.0")), f"body.{i}.body.2") + res
        taps.append(res)
    with torch.no_grad():
        features = model.forward_features(x)
    torch.testing.assert_close(features.out, conv(res, "body.2") + head, atol=1e-5, rtol=1e-5)
    for got, want in zip(features.blocks, taps, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown EDSR variant"):
        edsr.build("edsr_x4")
