"""experiments/sampler.py's guided decoder: at guidance 0 it is disp.diffusion.generate token for
token, in any block length; guidance on the image changes what is written."""

import sys
from pathlib import Path

import pytest
import torch

from disp.config import ModelConfig
from disp.diffusion import generate
from disp.model import DiffusionVLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from sampler import guided_generate  # noqa: E402


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


@pytest.mark.parametrize("block", [8, 4, 2, 1])
def test_guidance_zero_is_plain_decoding(block):
    model, vision, prompts = model_and_inputs()
    plain = generate(model, None, prompts, gen_length=8, steps=8, block_length=block, vision_tokens=vision)
    assert torch.equal(guided_generate(model, vision, prompts, 8, block, guidance=0.0), plain)


def test_guidance_changes_the_response_and_writes_every_position():
    model, vision, prompts = model_and_inputs()
    plain = guided_generate(model, vision, prompts, 8, 4)
    guided = guided_generate(model, vision, prompts, 8, 4, guidance=3.0)
    assert not torch.equal(plain, guided)
    assert (guided != model.mask_id).all()
