"""Mask2Former, the head the WEFT paper puts on its four fused levels (methods.md §1.2(c), §1.3 losses).

A pixel decoder (6 multi-scale deformable attention layers over the 1/8, 1/16 and 1/32 levels, then an FPN step to
1/4 for the mask features) and a transformer decoder (9 layers of masked cross-attention, round-robin over the
three levels, self-attention and FFN) turn 100 learned queries into class scores and masks. Training matches
queries to the patch's class masks (Hungarian matching, scipy's `linear_sum_assignment`) and supervises every
decoder layer (deep supervision) with class cross-entropy, sigmoid BCE and dice on points sampled where the masks
are most uncertain. Semantic logits: the log of Σ_q p(class | q) · sigmoid(mask_q), as mmseg's semantic inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from backend.io.rasterize import IGNORE

from .deform_attn import MSDeformAttn, token_centres

CHANNELS, QUERIES, FFN = 96, 100, 320  # the configs' feature width, queries and FFN width
HEADS, POINTS = 8, 4
PIXEL_LAYERS, DECODER_LAYERS = 6, 9
LEVELS = 3  # the transformer decoder attends to 1/32, 1/16, 1/8 in turn


@dataclass(frozen=True)
class LossWeights:
    """The configs' Mask2Former losses and matching costs (methods.md §1.3)."""

    cls: float = 2.0
    mask: float = 5.0
    dice: float = 5.0
    no_object: float = 0.1
    points: int = 12544
    oversample: float = 3.0
    importance: float = 0.75


def sine_position(h: int, w: int, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """DETR's normalised 2-D sine positional code, (1, channels, h, w): half the channels for y, half for x."""
    half = channels // 2
    dim_t = 10000 ** (2 * (torch.arange(half, device=device, dtype=torch.float32) // 2) / half)
    y = (torch.arange(h, device=device, dtype=torch.float32) + 1) / h * 2 * math.pi
    x = (torch.arange(w, device=device, dtype=torch.float32) + 1) / w * 2 * math.pi
    py, px = y[:, None] / dim_t, x[:, None] / dim_t
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], -1).flatten(1)  # (h, half)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], -1).flatten(1)  # (w, half)
    pos = torch.cat([py[:, None, :].expand(h, w, half), px[None, :, :].expand(h, w, half)], -1)
    return pos.permute(2, 0, 1)[None].to(dtype)


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """maps (M, 1, h, w) sampled bilinearly at coords (M, P, 2) as (x, y) in [0, 1] -> (M, P)."""
    return F.grid_sample(maps, 2 * coords[:, :, None] - 1, align_corners=False)[:, 0, :, 0]


class FFNLayer(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.net(x))


class PixelDecoderLayer(nn.Module):
    """Deformable self-attention over the tokens of all levels, then an FFN (post-norm, as Deformable DETR)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = MSDeformAttn(dim, HEADS, LEVELS, POINTS)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FFNLayer(dim, FFN)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor, shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        return self.ffn(self.norm(x + self.attn(x + pos, reference, x, shapes)))


class PixelDecoder(nn.Module):
    """(f1 … f4) -> mask features at 1/4 and the three coarser levels (coarsest first) for the decoder."""

    def __init__(self, dim: int, channels: int = CHANNELS) -> None:
        super().__init__()
        gn = min(32, channels)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, channels, 1), nn.GroupNorm(gn, channels)) for _ in range(LEVELS)
        )
        self.level_embed = nn.Parameter(torch.randn(LEVELS, channels) * 0.02)
        self.layers = nn.ModuleList(PixelDecoderLayer(channels) for _ in range(PIXEL_LAYERS))
        self.lateral = nn.Sequential(nn.Conv2d(dim, channels, 1, bias=False), nn.GroupNorm(gn, channels))
        self.output = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(gn, channels))
        self.output.append(nn.ReLU())
        self.mask_features = nn.Conv2d(channels, channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        coarse = feats[1:][::-1]  # 1/32, 1/16, 1/8
        maps = [proj(f) for proj, f in zip(self.input_proj, coarse, strict=True)]
        shapes = [tuple(m.shape[-2:]) for m in maps]
        b, c = maps[0].shape[:2]
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
        pos = torch.cat(
            [
                (sine_position(h, w, c, m.device, m.dtype).flatten(2).transpose(1, 2) + self.level_embed[i])
                for i, (m, (h, w)) in enumerate(zip(maps, shapes, strict=True))
            ],
            1,
        )
        reference = torch.cat([token_centres(s, tokens.device, tokens.dtype) for s in shapes], 1).expand(b, -1, -1)
        for layer in self.layers:
            tokens = layer(tokens, pos, reference, shapes)
        outs = [
            part.transpose(1, 2).reshape(b, c, h, w)
            for part, (h, w) in zip(tokens.split([h * w for h, w in shapes], 1), shapes, strict=True)
        ]
        fine = self.lateral(feats[0]) + F.interpolate(
            outs[-1], size=feats[0].shape[-2:], mode="bilinear", align_corners=False
        )
        return self.mask_features(self.output(fine)), outs


class DecoderLayer(nn.Module):
    """Masked cross-attention to one level, self-attention among the queries, FFN (Mask2Former's order)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(dim, HEADS, batch_first=True)
        self.cross_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, HEADS, batch_first=True)
        self.self_norm = nn.LayerNorm(dim)
        self.ffn = FFNLayer(dim, FFN)

    def forward(
        self, q: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        q = self.cross_norm(q + self.cross(q + query_pos, memory + pos, memory, attn_mask=mask)[0])
        q = self.self_norm(q + self.self_attn(q + query_pos, q + query_pos, q)[0])
        return self.ffn(q)


class Mask2FormerHead(nn.Module):
    """forward(feats) -> semantic logits (B, classes, H/4, W/4); loss(feats, label) -> the deep-supervised set loss.

    `num_classes` counts background as a class ("stuff"), as the configs do; the class scores have one more entry,
    "no object"."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        channels: int = CHANNELS,
        queries: int = QUERIES,
        weights: LossWeights = LossWeights(),  # a frozen dataclass: safe as a default
    ) -> None:
        super().__init__()
        self.num_classes, self.weights = num_classes, weights
        self.pixel_decoder = PixelDecoder(dim, channels)
        self.query_feat = nn.Embedding(queries, channels)
        self.query_embed = nn.Embedding(queries, channels)
        self.level_embed = nn.Embedding(LEVELS, channels)
        self.layers = nn.ModuleList(DecoderLayer(channels) for _ in range(DECODER_LAYERS))
        self.decoder_norm = nn.LayerNorm(channels)
        self.class_embed = nn.Linear(channels, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(channels, channels),
            nn.ReLU(),
            nn.Linear(channels, channels),
            nn.ReLU(),
            nn.Linear(channels, channels),
        )

    def predictions(self, feats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(class logits (B, Q, classes + 1), mask logits (B, Q, H/4, W/4)) before the first decoder layer and
        after each one: the deep supervision's 10 predictions, the last is the output."""
        mask_features, levels = self.pixel_decoder(feats)
        b = mask_features.shape[0]
        memories, positions = [], []
        for i, m in enumerate(levels):
            h, w = m.shape[-2:]
            memories.append(m.flatten(2).transpose(1, 2) + self.level_embed.weight[i])
            positions.append(sine_position(h, w, m.shape[1], m.device, m.dtype).flatten(2).transpose(1, 2))
        q = self.query_feat.weight[None].expand(b, -1, -1)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        preds, mask = [self._predict(q, mask_features)], None
        for i, layer in enumerate(self.layers):
            level = i % LEVELS
            mask = self._attention_mask(preds[-1][1], levels[level].shape[-2:])
            q = layer(q, query_pos, memories[level], positions[level], mask)
            preds.append(self._predict(q, mask_features))
        return preds

    def _predict(self, q: torch.Tensor, mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.decoder_norm(q)
        return self.class_embed(q), torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features)

    def _attention_mask(self, mask_logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Masked attention: each query sees only where its current mask is above 0.5 (everywhere, if nowhere)."""
        m = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
        blocked = m.flatten(2).sigmoid() < 0.5  # (B, Q, hw)
        blocked[blocked.all(-1)] = False
        return blocked.repeat_interleave(HEADS, 0)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        cls, masks = self.predictions(feats)[-1]
        semantic = torch.einsum("bqk,bqhw->bkhw", cls.float().softmax(-1)[..., :-1], masks.float().sigmoid())
        return semantic.clamp_min(1e-6).log()  # a softmax of these gives the normalised class scores

    def loss(self, feats: list[torch.Tensor], label: torch.Tensor, balance: bool = True) -> torch.Tensor:
        """The set loss summed over every decoder layer's prediction; `label` (B, H, W) at the input's size,
        IGNORE pixels count for neither the masks nor the matching. `balance` changes nothing: each class present
        already has its own mask, whose BCE and dice weigh the same whatever its size."""
        targets = [self._targets(y) for y in label]
        return sum(
            (self._set_loss(cls.float(), masks.float(), targets) for cls, masks in self.predictions(feats)),
            torch.zeros((), device=label.device),
        )

    def _targets(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One binary mask per class present: (classes (T,), masks (T, 1, H, W), valid (1, 1, H, W))."""
        valid = y != IGNORE
        classes = torch.unique(y[valid]).long()
        masks = torch.stack([y == k for k in classes]).float() if len(classes) else torch.zeros(0, *y.shape)
        return classes, masks[:, None].to(y.device), valid[None, None].float()

    def _set_loss(
        self,
        cls: torch.Tensor,
        masks: torch.Tensor,
        targets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        w = self.weights
        b, q, _ = cls.shape
        cls_target = torch.full((b, q), self.num_classes, dtype=torch.long, device=cls.device)
        src_masks, tgt_masks, tgt_valid = [], [], []
        for i, (classes, tmasks, valid) in enumerate(targets):
            if not len(classes):
                continue
            rows, cols = self._match(cls[i], masks[i], classes, tmasks, valid)
            cls_target[i, rows] = classes[cols]
            src_masks.append(masks[i, rows])
            tgt_masks.append(tmasks[cols])
            tgt_valid.append(valid.expand(len(cols), -1, -1, -1))
        empty_weight = torch.ones(self.num_classes + 1, device=cls.device)
        empty_weight[-1] = w.no_object
        loss = w.cls * F.cross_entropy(cls.transpose(1, 2), cls_target, weight=empty_weight)
        if not src_masks:
            return loss + masks.sum() * 0
        src, tgt, valid = torch.cat(src_masks)[:, None], torch.cat(tgt_masks), torch.cat(tgt_valid)
        coords = self._uncertain_points(src)
        logits = point_sample(src, coords)
        target = point_sample(tgt, coords)
        keep = point_sample(valid, coords)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        bce = (bce * keep).sum(1) / keep.sum(1).clamp_min(1)
        prob = logits.sigmoid() * keep
        dice = 1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + (target * keep).sum(1) + 1)
        return loss + w.mask * bce.mean() + w.dice * dice.mean()

    @torch.no_grad()
    def _match(
        self, cls: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor, tmasks: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hungarian matching of the Q queries to the T class masks on the same uniformly sampled points."""
        w = self.weights
        coords = torch.rand(1, w.points, 2, device=cls.device)
        keep = point_sample(valid, coords)  # (1, P)
        pred = point_sample(masks[:, None], coords.expand(len(masks), -1, -1)) * keep  # (Q, P)
        tgt = point_sample(tmasks, coords.expand(len(tmasks), -1, -1)) * keep  # (T, P)
        n = keep.sum().clamp_min(1)
        pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none") * keep
        neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none") * keep
        cost_mask = (pos @ tgt.T + neg @ (keep - tgt).T) / n
        prob = pred.sigmoid() * keep
        cost_dice = 1 - (2 * prob @ tgt.T + 1) / (prob.sum(-1)[:, None] + tgt.sum(-1)[None] + 1)
        cost_class = -cls.softmax(-1)[:, classes]
        cost = w.cls * cost_class + w.mask * cost_mask + w.dice * cost_dice
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        return torch.as_tensor(rows, device=cls.device), torch.as_tensor(cols, device=cls.device)

    @torch.no_grad()
    def _uncertain_points(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """PointRend's sampling: of `oversample`× candidates keep the `importance` share nearest the decision
        boundary (|logit| smallest), the rest uniformly at random. (M, points, 2)."""
        w = self.weights
        m = len(mask_logits)
        candidates = torch.rand(m, int(w.points * w.oversample), 2, device=mask_logits.device)
        uncertainty = -point_sample(mask_logits, candidates).abs()
        k = int(w.importance * w.points)
        idx = uncertainty.topk(k, dim=1).indices
        chosen = candidates.gather(1, idx[..., None].expand(-1, -1, 2))
        rest = torch.rand(m, w.points - k, 2, device=mask_logits.device)
        return torch.cat([chosen, rest], 1)
