"""The multimodal masked diffusion LM: ViT encoder -> MLP projector -> bidirectional text transformer.

Sequence layout (METHOD.md §1, LLaDA-V at toy scale):

    [ vision tokens (n_vision) ; prompt (prompt_len) ; response (response_len) ]

The text transformer has no causal mask and no time input: it sees the whole sequence and predicts
the original token at every [MASK] position of the response. Image positions hold [IMG] ids whose
embeddings are overwritten by the projected ViT patches (nanoVLM style: static shapes). A
`vision_mask` puts the [MASK] embedding at chosen image positions instead (DiSP, METHOD.md §3).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from disp.config import ModelConfig
from disp.errors import DispError


def sincos(positions, dim: int):
    """(len(positions), dim) sin-cos features of integer positions (Transformer, Vaswani et al.)."""
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = positions.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_positions(cfg: ModelConfig):
    """(seq_len, dim): image positions get half the width for the row, half for the column;
    text positions get 1-D features of their offset after the image."""
    side = cfg.image_size // cfg.patch_size
    index = torch.arange(cfg.n_vision)
    image = torch.cat([sincos(index // side, cfg.dim // 2), sincos(index % side, cfg.dim // 2)], dim=1)
    text = sincos(torch.arange(cfg.prompt_len + cfg.response_len) + side, cfg.dim)
    return torch.cat([image, text])


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, need_weights: bool = False, queries: int = 0):
        """queries > 0: only the last `queries` positions attend (keys and values still come from all)."""
        if queries:
            dim = x.shape[-1]
            q = F.linear(x[:, -queries:], self.qkv.weight[:dim], self.qkv.bias[:dim])
            k, v = F.linear(x, self.qkv.weight[dim:], self.qkv.bias[dim:]).chunk(2, dim=-1)
            q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=self.heads) for t in (q, k, v))
        else:
            q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if need_weights:  # explicit softmax, only for attention-based baselines (CleanSight)
            weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)  # (B, h, Tq, T)
            y = weights @ v
        else:
            weights = None
            y = F.scaled_dot_product_attention(q, k, v)  # no mask: bidirectional
        return self.proj(rearrange(y, "b h t d -> b t (h d)")), weights


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, need_weights: bool = False, queries: int = 0):
        """queries > 0: return only the last `queries` positions (all positions still serve as keys)."""
        y, weights = self.attn(self.ln1(x), need_weights, queries)
        x = (x[:, -queries:] if queries else x) + y
        return x + self.mlp(self.ln2(x)), weights


class ViT(nn.Module):
    """Patchify -> linear embedding + learned positions -> pre-LN blocks -> LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(3 * cfg.patch_size**2, cfg.vit_dim)
        self.pos_embed = nn.Parameter(torch.randn(cfg.n_vision, cfg.vit_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.vit_dim, cfg.vit_heads, cfg.mlp_ratio) for _ in range(cfg.vit_depth))
        self.ln = nn.LayerNorm(cfg.vit_dim)
        # per-patch attribute heads for the vision pretraining phase (unused afterwards)
        self.patch_heads = nn.ModuleList(nn.Linear(cfg.vit_dim, n) for n in cfg.patch_classes)

    def forward(self, images):  # images: (B, 3, H, W) float in [0, 1]
        p = self.cfg.patch_size
        x = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x = self.patch_embed((x - 0.5) / 0.5) + self.pos_embed  # (B, n_vision, vit_dim)
        for block in self.blocks:
            x, _ = block(x)
        return self.ln(x)


class DiffusionVLM(nn.Module):
    def __init__(self, cfg: ModelConfig, mask_id: int, img_id: int):
        super().__init__()
        self.cfg = cfg
        self.mask_id, self.img_id = mask_id, img_id
        self.vit = ViT(cfg)
        # 2-layer GELU MLP projector, as in LLaDA-V / LLaVA
        self.projector = nn.Sequential(nn.Linear(cfg.vit_dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, cfg.dim))
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        # Fixed sin-cos positions (2-D row/column for image positions, 1-D for text) plus a learned
        # correction. Without an explicit 2-D signal the text model learned "where" very slowly:
        # in a probe it answered left/middle/right at chance after 1,500 steps.
        self.register_buffer("pos_fixed", sincos_positions(cfg), persistent=False)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.seq_len, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size)

    def to_float(self, images):
        """uint8 or float images -> float in [0, 1], with a clear error for a wrong size."""
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise DispError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        return images.float()

    def encode_images(self, images):
        """ViT + projector: (B, 3, H, W) -> vision tokens (B, n_vision, dim). Run once per generation."""
        return self.projector(self.vit(self.to_float(images)))

    def forward(self, vision_tokens, prompt_ids, response_ids, vision_mask=None, need_weights=False):
        """Logits at the response positions, (B, response_len, vocab).

        vision_tokens: (B, n_vision, dim) from encode_images (precomputed; the ViT is not rerun)
        prompt_ids: (B, prompt_len); response_ids: (B, response_len), [MASK] where unknown
        vision_mask: optional (B, n_vision) bool; True puts the [MASK] embedding at that image position
        need_weights: also return the last block's attention from the response rows, (B, heads, response_len, T)
        """
        B = prompt_ids.shape[0]
        img_ids = torch.full((B, self.cfg.n_vision), self.img_id, dtype=torch.long, device=prompt_ids.device)
        x = self.tok_embed(torch.cat([img_ids, prompt_ids, response_ids], dim=1))  # (B, T, dim)
        image_part = vision_tokens.to(x.dtype)
        if vision_mask is not None:
            image_part = torch.where(vision_mask[..., None], self.tok_embed.weight[self.mask_id], image_part)
        x = torch.cat([image_part, x[:, self.cfg.n_vision:]], dim=1) + self.pos_fixed + self.pos_embed
        # Only response positions are read out, so the last block computes only those rows (exact:
        # it saves that block's queries, attention rows, output projection and MLP at the other
        # positions, ~17% of the forward FLOPs at the cpu preset).
        *body, last = self.blocks
        for block in body:
            x, _ = block(x)
        x, weights = last(x, need_weights, queries=self.cfg.response_len)
        logits = self.lm_head(self.ln(x))
        return (logits, weights) if need_weights else logits

    def vision_parameters(self):
        return self.vit.parameters()

    def text_parameters(self):
        """Everything but the ViT: projector, embeddings, transformer, head."""
        return [p for n, p in self.named_parameters() if not n.startswith("vit.")]
