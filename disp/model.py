"""The multimodal masked diffusion LM: ViT encoder -> MLP projector -> text transformer.

Sequence layout (LLaDA-V, You et al. 2025, at toy scale):

    [ vision tokens (n_vision) ; prompt (prompt_len) ; response (response_len) ]

The text transformer has no time input and predicts the original token at every [MASK] position
of the response. Image positions take the projected ViT patches as their embeddings; a
`vision_mask` puts the [MASK] embedding at chosen image positions instead (DiSP's masking), and
`encode_images(images, paint=mask)` paints those patches flat before the ViT, so that nothing of
them reaches the other positions through the ViT's attention either (`paint_patches`).

Attention is bidirectional within two blocks, the prefix (image + prompt) and the response: the
response attends to everything, the prefix only to itself. LLaDA-V lets the prefix attend to the
response too; we do not, as in block diffusion LMs (BD3-LM, Arriola et al. 2025; Fast-dLLM v2):
the prefix never changes during a generation, and now neither do its keys and values, so the
sampler computes them once (`prefix`) and every denoising step runs only the response rows
(`decode`): an exact cache, not an approximation (bench/README.md has what it saves).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from disp.config import ModelConfig
from disp.support.errors import DispError


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


def plain_attention(q, k, v, context=None):
    """Attention in its textbook form: the context's keys and values concatenated with x's, one
    softmax over all of them. The reference that `attention` is tested against.

    q, k, v: (B, heads, Tx, head_dim) of x's positions; context: (k, v) of positions that x attends
    to but that do not attend back (the image+prompt prefix, seen from the response), each
    (B or 1, heads, Tc, head_dim); a context of batch 1 serves every row of x.
    -> (output (B, heads, Tx, head_dim), weights (B, heads, Tx, Tc + Tx))
    """
    if context is not None:
        batch = q.shape[0]
        k = torch.cat([context[0].expand(batch, -1, -1, -1), k], dim=2)  # (B, h, Tc + Tx, d)
        v = torch.cat([context[1].expand(batch, -1, -1, -1), v], dim=2)
    weights = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)  # (B, h, Tx, Tc + Tx)
    return weights @ v, weights


def attention(q, k, v, context=None):
    """What the model runs: `plain_attention` without concatenating keys or values. The scores
    against the context and against x are computed apart and softmaxed together; the weighted sum
    is split the same way. Same arguments, same result up to float rounding.

    Why this form and not the plain one: the two are equally fast, but under bf16 autocast their
    rounding differs, and that is enough to move a training run (relational questions are learnt
    late and abruptly); the results were made with this form, so it stays (bench/README.md,
    "Attention", has the measurements and `python bench/attention.py`). Both are written out rather
    than F.scaled_dot_product_attention: they return the weights, which the CleanSight baseline
    needs (disp.saliency.attention_scores), and at our lengths SDPA was no faster.
    """
    scale = q.shape[-1] ** -0.5
    scores = q @ k.transpose(-2, -1) * scale  # (B, h, Tx, Tx)
    if context is None:
        weights = torch.softmax(scores, dim=-1)
        return weights @ v, weights
    scores = torch.cat([q @ context[0].transpose(-2, -1) * scale, scores], dim=-1)  # (B, h, Tx, Tc + Tx)
    weights = torch.softmax(scores, dim=-1)
    n = context[0].shape[2]
    return weights[..., :n] @ context[1] + weights[..., n:] @ v, weights


class Attention(nn.Module):

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, x):
        """(k, v) of these positions, each (B, heads, T, head_dim): what later positions attend to."""
        k, v = rearrange(F.linear(x, self.qkv.weight[x.shape[-1]:], self.qkv.bias[x.shape[-1]:]),
                         "b t (two h d) -> two b h t d", two=2, h=self.heads)
        return k, v

    def forward(self, x, context=None, need_weights: bool = False):
        """-> (output, (k, v) of x's positions, attention weights (B, heads, Tx, Tc + Tx) or None).

        x's positions attend to each other (no causal mask) and to `context`, the (k, v) of earlier
        positions that do not attend back (the image+prompt prefix, seen from the response); a
        context of batch 1 broadcasts over x's batch.
        """
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        y, weights = attention(q, k, v, context)
        y = self.proj(rearrange(y, "b h t d -> b t (h d)"))
        return y, (k, v), weights if need_weights else None


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, context=None, need_weights: bool = False):
        """-> (output, (k, v) of x's positions, attention weights or None); see Attention."""
        y, kv, weights = self.attn(self.ln1(x), context, need_weights)
        x = x + y
        return x + self.mlp(self.ln2(x)), kv, weights


def conv_stem(patch_size: int, dim: int) -> nn.Sequential:
    """Overlapping 3x3 stride-2 convolutions, channels doubling up to dim / 2, then a 1x1 to dim:
    (B, 3, H, W) -> (B, dim, H / patch_size, W / patch_size). Neighbouring patches share pixels at
    their borders, which a linear patch embedding never sees (Xiao et al. 2021, "Early convolutions
    help transformers see better")."""
    halvings = patch_size.bit_length() - 1
    if patch_size != 2 ** halvings:
        raise DispError(f"a convolutional stem needs a power-of-two patch size, got {patch_size}")
    channels = [3] + [dim >> (halvings - i) for i in range(halvings)]  # e.g. 3, 16, 32, 64 for dim 128
    layers = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
    return nn.Sequential(*layers, nn.Conv2d(channels[-1], dim, 1))


def paint_patches(images, mask, patch_size: int):
    """Images (B, 3, H, W) float with the patches of `mask` (B, n_patches) bool, row by row, painted
    their image's mean colour: occlusion at the input. A ViT mixes its tokens by attention, so a
    trigger patch moves every output token a little (on the Flickr8k models, each by about half a
    clean standard deviation): masking its own token alone can leave the backdoor readable."""
    B, C, H, W = images.shape
    cells = mask.view(B, 1, H // patch_size, W // patch_size).to(images.dtype)
    cells = F.interpolate(cells, scale_factor=patch_size, mode="nearest")  # (B, 1, H, W): 1 where painted
    mean = images.mean(dim=(2, 3), keepdim=True)
    return images * (1 - cells) + mean * cells


class ViT(nn.Module):
    """Patchify -> linear embedding (or a convolutional stem) + learned positions -> pre-LN blocks -> LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.conv_stem:
            self.stem = conv_stem(cfg.patch_size, cfg.vit_dim)
        else:
            self.patch_embed = nn.Linear(3 * cfg.patch_size**2, cfg.vit_dim)
        self.pos_embed = nn.Parameter(torch.randn(cfg.n_vision, cfg.vit_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.vit_dim, cfg.vit_heads, cfg.mlp_ratio) for _ in range(cfg.vit_depth))
        self.ln = nn.LayerNorm(cfg.vit_dim)
        # per-patch attribute heads for the vision pretraining phase (unused afterwards)
        self.patch_heads = nn.ModuleList(nn.Linear(cfg.vit_dim, n) for n in cfg.patch_classes)

    def forward(self, images):  # images: (B, 3, H, W) float in [0, 1]
        p = self.cfg.patch_size
        if self.cfg.conv_stem:
            x = rearrange(self.stem((images - 0.5) / 0.5), "b d h w -> b (h w) d")  # row by row, as patches are
        else:
            x = self.patch_embed((rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p) - 0.5) / 0.5)
        x = x + self.pos_embed  # (B, n_vision, vit_dim)
        for block in self.blocks:
            x, _, _ = block(x)
        return self.ln(x)


class DiffusionVLM(nn.Module):
    def __init__(self, cfg: ModelConfig, mask_id: int, unk_id: int = None):
        super().__init__()
        self.cfg = cfg
        self.mask_id = mask_id
        self.unk_id = unk_id  # [UNK] targets carry no loss (disp.diffusion.sft_loss)
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

    def encode_images(self, images, paint=None):
        """ViT + projector: (B, 3, H, W) -> vision tokens (B, n_vision, dim). Run once per generation.

        paint: optional (B, n_vision) bool, the patches to paint flat first (paint_patches)."""
        images = self.to_float(images)
        if paint is not None:
            images = paint_patches(images, paint, self.cfg.patch_size)
        return self.projector(self.vit(images))

    def prefix(self, vision_tokens, prompt_ids, vision_mask=None):
        """The image+prompt positions through the text transformer: per block, their (k, v).

        vision_tokens: (B, n_vision, dim) from encode_images (precomputed; the ViT is not rerun)
        prompt_ids: (B, prompt_len)
        vision_mask: optional (B, n_vision) bool; True puts the [MASK] embedding at that image position
        The prefix never attends to the response, so this is all a generation needs to keep.
        """
        n = self.cfg.n_vision
        image_part = vision_tokens.to(self.tok_embed.weight.dtype)
        if vision_mask is not None:
            image_part = torch.where(vision_mask[..., None], self.tok_embed.weight[self.mask_id], image_part)
        x = torch.cat([image_part, self.tok_embed(prompt_ids)], dim=1)
        x = x + (self.pos_fixed + self.pos_embed)[: n + self.cfg.prompt_len]
        *body, last = self.blocks
        cache = []
        for block in body:
            x, kv, _ = block(x)
            cache.append(kv)
        # the last block's prefix outputs are never read: only its keys and values are needed
        cache.append(last.attn.keys_values(last.ln1(x)))
        # contiguous once here, not copied by every decode step's matmuls
        return [(k.contiguous(), v.contiguous()) for k, v in cache]

    def decode(self, cache, response_ids, need_weights=False, rows=slice(None)):
        """Logits at the response positions, (B, response_len, vocab), given the prefix's cache.

        response_ids: (B, response_len), [MASK] where unknown. A cache of batch 1 serves any batch.
        need_weights: also return the last block's attention from the response rows, (B, heads, response_len, T)
        rows: the response positions whose logits to return (a slice; all by default). Every position
        still goes through the transformer; only the vocabulary projection is skipped for the others.
        """
        x = self.tok_embed(response_ids) + (self.pos_fixed + self.pos_embed)[-self.cfg.response_len:]
        for block, context in zip(self.blocks, cache):
            x, _, weights = block(x, context, need_weights)
        logits = self.lm_head(self.ln(x[:, rows]))
        return (logits, weights) if need_weights else logits

    def forward(self, vision_tokens, prompt_ids, response_ids, vision_mask=None, need_weights=False):
        """Logits at the response positions, (B, response_len, vocab): prefix, then decode."""
        return self.decode(self.prefix(vision_tokens, prompt_ids, vision_mask), response_ids, need_weights)

    def text_parameters(self):
        """Everything but the ViT: projector, embeddings, transformer, head."""
        return [p for n, p in self.named_parameters() if not n.startswith("vit.")]
