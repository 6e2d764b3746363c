"""The IPT transformer body (`body.*` of `IPT_pretrain.pt`), PanAdapter's frozen ViT.

Architecture and key names read in huawei-noah/Pretrained-IPT `model/ipt.py` (`VisionTransformer`,
`TransformerEncoderLayer`, `TransformerDecoderLayer`, `LearnedPositionalEncoding`) and `option.py`:
patches of the input map are unfolded to tokens, `linear_encoding` is added as a residual, learned positions
(`position_encoding.pe`) are added once before the encoder (option default pos_every=False), 12 pre-LN
encoder layers and 12 pre-LN decoder layers run (nn.MultiheadAttention with bias=False, ReLU FFN of 4d),
the decoder's self- and cross-attention queries carry the learned task query `query_embed[query_idx]`, and
`mlp_head` is added as a residual before folding back to a map. Dropout is 0 in the pretrained config and
omitted here.

Sizes: d = 576 with 12 heads and FFN 2304. The official model reaches d = 576 as 64 features x 3x3 patches;
this project, like PanAdapter (RC-Wu/PanAdapter `models/ipt_token.py` `Config`), feeds 576 features with a
1x1 patch on a 16x16 grid (256 tokens, as in the official 48 px / 3). Both give the same checkpoint shapes.
`num_queries` is 6 (PanAdapter's Config and the six pretraining tasks); the official option.py default is 1:
a checkpoint with another count fails to load with the shape named.

Deviations from the official module layout, each for a reason:
* Each nn.MultiheadAttention is our `Attention` with a fused bias-free `qkv` (its `in_proj_weight`) and
  `proj` (its `out_proj`), so adapters find it under `...attn.qkv`; numerics equal nn.MultiheadAttention.
  Decoder self-attention is `attn`, decoder cross-attention (`multihead_attn`) is `cross_attn`.
* Encoder and decoder layers live in one ordered `blocks` list (encoder 0..11, decoder 12..23).
* Tokens are batch-first (B, L, d); the official code is sequence-first (L, B, d).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, BackboneFeatures
from .loading import load_mapped


@dataclass(frozen=True)
class IPTConfig:
    img_dim: int = 16  # side of the input map (official: the 48 px patch of 64 features)
    patch_dim: int = 1  # official default 3 (with 64 features); 1 with 576 features here
    num_channels: int = 576
    embedding_dim: int = 576
    num_heads: int = 12
    num_layers: int = 12  # per stack: this many encoder and this many decoder layers
    hidden_dim: int = 2304
    num_queries: int = 6
    query_idx: int = 0  # which task query the decoder uses
    pos_every: bool = False  # official default; True adds positions to q/k in every layer instead of once
    # nn.MultiheadAttention(bias=False) has no out_proj bias, except under torch 1.6-1.7 (pytorch#52257), where a
    # saved checkpoint carries `out_proj.bias`: build with proj_bias=True for such a file.
    proj_bias: bool = False

    @property
    def grid(self) -> int:
        return self.img_dim // self.patch_dim

    @property
    def seq_length(self) -> int:
        return self.grid**2

    @property
    def flatten_dim(self) -> int:
        return self.patch_dim**2 * self.num_channels


VARIANTS: dict[str, IPTConfig] = {
    "ipt": IPTConfig(),
    "tiny": IPTConfig(
        img_dim=8,
        patch_dim=2,
        num_channels=8,
        embedding_dim=32,
        num_heads=4,
        num_layers=2,
        hidden_dim=64,
        num_queries=2,
    ),
}


class Attention(nn.Module):
    """nn.MultiheadAttention(bias=False) with a fused `qkv` Linear: q from `query`, k from `key`, v from `value`.

    `qkv` is applied once per distinct input tensor (self-attention: once) and sliced, so an adapter that
    wraps `qkv` sees exactly the inputs the official in-projection sees.
    """

    def __init__(self, dim: int, num_heads: int, proj_bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        d = query.shape[-1]
        for_q = self.qkv(query)
        for_k = for_q if key is query else self.qkv(key)
        for_v = for_k if value is key else for_q if value is query else self.qkv(value)
        q, k, v = (self._heads(t[..., i * d : (i + 1) * d]) for i, t in enumerate((for_q, for_k, for_v)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)


class EncoderLayer(nn.Module):
    """Pre-LN self-attention + ReLU FFN; positions, when given, go into queries and keys only."""

    def __init__(self, config: IPTConfig) -> None:
        super().__init__()
        d = config.embedding_dim
        self.attn = Attention(d, config.num_heads, config.proj_bias)
        self.linear1 = nn.Linear(d, config.hidden_dim)
        self.linear2 = nn.Linear(config.hidden_dim, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        qk = h if pos is None else h + pos
        x = x + self.attn(qk, qk, h)
        return x + self.linear2(F.relu(self.linear1(self.norm2(x))))


class DecoderLayer(nn.Module):
    """Pre-LN self-attention and cross-attention to `memory`, both queried with the task query, + ReLU FFN."""

    def __init__(self, config: IPTConfig) -> None:
        super().__init__()
        d = config.embedding_dim
        self.attn = Attention(d, config.num_heads, config.proj_bias)
        self.cross_attn = Attention(d, config.num_heads, config.proj_bias)
        self.linear1 = nn.Linear(d, config.hidden_dim)
        self.linear2 = nn.Linear(config.hidden_dim, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor, pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.norm1(x)
        qk = h + query_pos
        x = x + self.attn(qk, qk, h)
        h = self.norm2(x)
        key = memory if pos is None else memory + pos
        x = x + self.cross_attn(h + query_pos, key, memory)
        return x + self.linear2(F.relu(self.linear1(self.norm3(x))))


class LearnedPositionalEncoding(nn.Module):
    """One learned vector per token position (official name `position_encoding.pe`).

    The official module also stores `position_ids` (an arange buffer); it carries no information and is
    dropped when loading.
    """

    def __init__(self, seq_length: int, dim: int) -> None:
        super().__init__()
        self.pe = nn.Embedding(seq_length, dim)

    def forward(self) -> torch.Tensor:
        return self.pe.weight.unsqueeze(0)


# Called after every block with (block index, its output); returns the tokens the next block receives.
BlockHook = Callable[[int, torch.Tensor], torch.Tensor]


class IPTBody(Backbone):
    """IPT's `VisionTransformer`: map (B, C, H, W) -> map of the same shape, H = W = img_dim.

    Decoder blocks need the encoder output as memory, so `blocks` cannot be chained as blk(x); adapters
    attach between blocks through `forward_features(x, after_block=...)`.
    """

    def __init__(self, config: IPTConfig) -> None:
        super().__init__()
        if config.embedding_dim % config.num_heads or config.img_dim % config.patch_dim:
            raise ValueError("embedding_dim must divide by num_heads and img_dim by patch_dim")
        if config.flatten_dim != config.embedding_dim:
            raise ValueError("IPT adds linear_encoding as a residual: patch_dim^2 * num_channels == embedding_dim")
        self.config = config
        d = config.embedding_dim
        self.linear_encoding = nn.Linear(config.flatten_dim, d)
        self.position_encoding = LearnedPositionalEncoding(config.seq_length, d)
        self.query_embed = nn.Embedding(config.num_queries, d * config.seq_length)
        layers: list[nn.Module] = [EncoderLayer(config) for _ in range(config.num_layers)]
        layers += [DecoderLayer(config) for _ in range(config.num_layers)]
        self.blocks = nn.ModuleList(layers)
        # Indices match the official Sequential(Linear, Dropout, ReLU, Linear, Dropout): weights at 0 and 3.
        self.mlp_head = nn.Sequential(
            nn.Linear(d, config.hidden_dim), nn.Identity(), nn.ReLU(), nn.Linear(config.hidden_dim, config.flatten_dim)
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unfolded patches plus their linear encoding: (B, L, d)."""
        if x.shape[-2:] != (self.config.img_dim, self.config.img_dim):
            raise ValueError(f"IPT's learned positions and queries fix the input to {self.config.img_dim} px a side")
        p = self.config.patch_dim
        tokens = F.unfold(x, p, stride=p).transpose(1, 2)
        return self.linear_encoding(tokens) + tokens

    def forward_features(self, x: torch.Tensor, after_block: BlockHook | None = None) -> BackboneFeatures:
        cfg = self.config
        tokens = self.embed(x)
        pos = self.position_encoding()
        query_pos = self.query_embed.weight[cfg.query_idx].view(1, cfg.seq_length, cfg.embedding_dim)
        layer_pos = pos if cfg.pos_every else None
        if not cfg.pos_every:
            tokens = tokens + pos
        outputs = []
        memory = None
        for i, block in enumerate(self.blocks):
            if isinstance(block, DecoderLayer):
                if memory is None:
                    memory = tokens  # the encoder output, after any adapter hook
                tokens = block(tokens, memory, query_pos, layer_pos)
            else:
                tokens = block(tokens, layer_pos)
            if after_block is not None:
                tokens = after_block(i, tokens)
            outputs.append(tokens)
        tokens = self.mlp_head(tokens) + tokens
        p = cfg.patch_dim
        out = F.fold(tokens.transpose(1, 2), (cfg.img_dim, cfg.img_dim), p, stride=p)
        return BackboneFeatures(out, outputs)


def build(variant: str, **overrides: object) -> IPTBody:
    """An IPT body of a named variant (see VARIANTS); keyword overrides replace config fields."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown IPT variant {variant!r}; known: {', '.join(VARIANTS)}")
    return IPTBody(dataclasses.replace(VARIANTS[variant], **overrides))


_LAYER = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(.+)")
# nn.MultiheadAttention parameter -> our Attention parameter (in_proj_bias does not exist with bias=False).
_ATTN_PARAMS = {"in_proj_weight": "qkv.weight", "out_proj.weight": "proj.weight", "out_proj.bias": "proj.bias"}
_ATTN_MODULES = {"self_attn": "attn", "multihead_attn": "cross_attn"}


def official_key(key: str, num_layers: int) -> str | None:
    """Map one key of the full IPT checkpoint to IPTBody's name; None drops it.

    Kept: `body.*` except `body.position_encoding.position_ids`. Dropped: the task-specific CNN `head.*` and
    `tail.*` and the RGB `sub_mean.*` / `add_mean.*` of the outer `ipt` model.
    """
    if not key.startswith("body.") or key == "body.position_encoding.position_ids":
        return None
    key = key[len("body.") :]
    match = _LAYER.fullmatch(key)
    if not match:
        return key  # linear_encoding, mlp_head.{0,3}, query_embed, position_encoding.pe: identical names
    stack, index, rest = match.groups()
    block = int(index) + (num_layers if stack == "decoder" else 0)
    module, _, param = rest.partition(".")
    if module in _ATTN_MODULES and param in _ATTN_PARAMS:
        rest = f"{_ATTN_MODULES[module]}.{_ATTN_PARAMS[param]}"
    return f"blocks.{block}.{rest}"


def load_official(model: IPTBody, state: Mapping[str, torch.Tensor]) -> None:
    """Load `IPT_pretrain.pt` (the full `ipt` state dict); raises CheckpointMismatch naming any misfit."""
    n = model.config.num_layers
    load_mapped(model, state, lambda key: official_key(key, n), source="IPT checkpoint")
