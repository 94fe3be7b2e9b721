"""Guidance on the image in disp.diffusion.generate, against a plain guided decoder written here
(the whole model run every step, no prefix cache): the same tokens at every scale and block length;
scale 0 is plain decoding; a large scale changes what is written."""

import pytest
import torch
import torch.nn.functional as F

from disp.config import ModelConfig
from disp.diffusion import generate
from disp.model import DiffusionVLM


def model_and_inputs():
    torch.manual_seed(0)
    cfg = ModelConfig(vit_dim=32, vit_depth=1, vit_heads=2, dim=32, depth=2, heads=2, vocab_size=12, prompt_len=3,
                      response_len=8)
    model = DiffusionVLM(cfg, mask_id=11).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a sharper model: its tokens depend on the image
    g = torch.Generator().manual_seed(1)
    vision = model.encode_images(torch.rand(16, 3, 48, 48, generator=g))
    return model, vision, torch.randint(0, 10, (16, 3), generator=g)


@torch.no_grad()
def plain_guided(model, vision, prompts, gen_length, block, w):
    """One token a step, the most confident masked one of the current block (the first of equals),
    scored by log p(. | image) + w (log p(. | image) - log p(. | every image position masked))."""
    x = torch.full((len(prompts), gen_length), model.mask_id)
    no_image = torch.ones(vision.shape[:2], dtype=torch.bool)
    for start in range(0, gen_length, block):
        for _ in range(block):
            with_image = F.log_softmax(model(vision, prompts, x).double(), -1)
            blind = F.log_softmax(model(vision, prompts, x, no_image).double(), -1)
            probs = F.softmax(with_image + w * (with_image - blind), -1)
            for b in range(len(x)):
                best, best_p = None, -1.0
                for i in range(start, start + block):
                    p = probs[b, i].max().item()
                    if x[b, i] == model.mask_id and p > best_p:
                        best, best_p = i, p
                if best is not None:
                    x[b, best] = probs[b, best].argmax()
    return x


@pytest.mark.parametrize("block,w", [(8, 0.3), (4, 0.3), (2, 1.0), (4, 0.0)])
def test_guidance_matches_a_plain_guided_decoder(block, w):
    model, vision, prompts = model_and_inputs()
    out = generate(model, None, prompts, gen_length=8, steps=8, block_length=block, vision_tokens=vision, guidance=w)
    assert torch.equal(out, plain_guided(model, vision, prompts, 8, block, w))


def test_guidance_zero_is_plain_decoding_and_a_large_scale_changes_the_response():
    model, vision, prompts = model_and_inputs()
    plain = generate(model, None, prompts, gen_length=8, steps=8, block_length=4, vision_tokens=vision)
    assert torch.equal(generate(model, None, prompts, gen_length=8, steps=8, block_length=4, vision_tokens=vision,
                                guidance=0.0), plain)
    guided = generate(model, None, prompts, gen_length=8, steps=8, block_length=4, vision_tokens=vision, guidance=3.0)
    assert not torch.equal(plain, guided)
    assert (guided != model.mask_id).all()
