"""The forward process, the SFT loss and the sampler, against plain references written here."""

import pytest
import torch
import torch.nn.functional as F

from disp.diffusion import forward_noise, generate, num_transfer_tokens, sft_loss
from disp.model import attention, plain_attention
from disp.support.errors import DispError
from tests.conftest import MASK, VOCAB, inputs, small_model

# --- a plain LLaDA sampler: per-sample loops, the whole model (ViT included) rerun every step ---

def reference_generate(model, images, prompt_ids, gen_length, steps, block_length, temperature, remasking,
                       generator=None):
    B = prompt_ids.shape[0]
    x = torch.full((B, gen_length), MASK, dtype=torch.long)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        lo, hi = nb * block_length, (nb + 1) * block_length
        counts = [(x[b, lo:hi] == MASK).sum().item() for b in range(B)]
        schedule = [[c // steps_per_block + (1 if i < c % steps_per_block else 0) for i in range(steps_per_block)]
                    for c in counts]
        for i in range(steps_per_block):
            mask_index = x == MASK
            logits = model(model.encode_images(images), prompt_ids, x)[:, lo:hi]  # full recompute
            # the random draws cover the current block only: no other position can be committed now
            if temperature > 0:
                noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
                x0_block = (logits.double().exp() / (-torch.log(noise)) ** temperature).argmax(-1)
            else:
                x0_block = logits.argmax(-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.double(), dim=-1)
                conf_block = torch.gather(p, -1, x0_block[..., None]).squeeze(-1)
            else:
                conf_block = torch.rand(x0_block.shape, dtype=torch.float64, generator=generator)
            x0 = x.clone()
            x0[:, lo:hi] = x0_block
            conf = torch.full(x.shape, -float("inf"), dtype=torch.float64)
            conf[:, lo:hi] = conf_block
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, torch.tensor(-float("inf"), dtype=torch.float64))
            for b in range(B):
                _, chosen = torch.topk(conf[b], k=schedule[b][i])
                x[b, chosen] = x0[b, chosen]
    return x


@pytest.mark.parametrize("gen_length,steps,block_length", [(8, 8, 8), (8, 4, 8), (8, 8, 4), (8, 4, 2), (8, 2, 8)])
def test_greedy_generate_matches_reference(gen_length, steps, block_length):
    model = small_model(gen_length)
    images, prompts = inputs()
    ours = generate(model, images, prompts, gen_length=gen_length, steps=steps, block_length=block_length)
    ref = reference_generate(model, images, prompts, gen_length, steps, block_length, 0.0, "low_confidence")
    assert torch.equal(ours, ref)
    assert not (ours == MASK).any()


@pytest.mark.parametrize("remasking,temperature", [("random", 0.0), ("random", 1.0), ("low_confidence", 0.7)])
def test_seeded_sampling_matches_reference(remasking, temperature):
    model = small_model(8)
    images, prompts = inputs()
    ours = generate(model, images, prompts, gen_length=8, steps=4, block_length=4, temperature=temperature,
                    remasking=remasking, generator=torch.Generator().manual_seed(7))
    ref = reference_generate(model, images, prompts, 8, 4, 4, temperature, remasking,
                             generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, ref)


def test_steps_equal_gen_length_commits_one_token_per_step():
    model = small_model(8)
    images, prompts = inputs()
    committed = []
    original_decode = model.decode  # what every denoising step calls

    def counting_decode(cache, response_ids, *args, **kwargs):
        committed.append((response_ids != MASK).sum(dim=1))
        return original_decode(cache, response_ids, *args, **kwargs)

    model.decode = counting_decode
    out, n_calls = generate(model, images, prompts, gen_length=8, steps=8, block_length=4, return_steps=True)
    assert n_calls == 8 and len(committed) == 8  # the spy saw every step
    for step, count in enumerate(committed):
        assert torch.all(count == step)  # before step s exactly s tokens are committed
    assert not (out == MASK).any()


def test_greedy_is_deterministic_and_vit_runs_once():
    model = small_model(8)
    images, prompts = inputs()
    vit_calls = []
    model.vit.register_forward_hook(lambda *a: vit_calls.append(1))
    a = generate(model, images, prompts, gen_length=8, steps=8, block_length=8)
    assert len(vit_calls) == 1  # the ViT never runs inside the denoising loop
    b = generate(model, images, prompts, gen_length=8, steps=8, block_length=8)
    assert torch.equal(a, b)


def test_threshold_decoding_commits_in_fewer_steps():
    model = small_model(8)
    images, prompts = inputs()
    # threshold 0: every masked position clears it, the block is done in one call
    out, calls = generate(model, images, prompts, gen_length=8, steps=8, block_length=8, threshold=0.0,
                          return_steps=True)
    assert calls == 1 and not (out == MASK).any()
    # threshold above 1: only the top-1 per step, i.e. exactly the steps == gen_length greedy result
    out2, calls2 = generate(model, images, prompts, gen_length=8, steps=8, block_length=8, threshold=1.1,
                            return_steps=True)
    assert calls2 == 8
    assert torch.equal(out2, generate(model, images, prompts, gen_length=8, steps=8, block_length=8))


def test_num_transfer_tokens_schedule():
    block_mask = torch.zeros(2, 8, dtype=torch.bool)
    block_mask[0, :7] = True
    block_mask[1, :3] = True
    schedule = num_transfer_tokens(block_mask, 3)
    assert schedule.tolist() == [[3, 2, 2], [1, 1, 1]]


def test_bad_sampler_arguments():
    model = small_model(8)
    images, prompts = inputs()
    with pytest.raises(ValueError, match="multiple of block_length"):
        generate(model, images, prompts, gen_length=8, steps=8, block_length=3)
    with pytest.raises(ValueError, match="remasking"):
        generate(model, images, prompts, gen_length=8, steps=8, block_length=8, remasking="top")


# --- forward process and loss ---------------------------------------------------------------

def test_forward_noise_only_touches_the_response_with_rate_p():
    response = torch.randint(5, VOCAB, (2000, 400))
    noisy, masked, p = forward_noise(response, MASK, torch.Generator().manual_seed(0))
    assert torch.equal(noisy == MASK, masked)
    assert torch.equal(noisy[~masked], response[~masked])
    assert p.min() >= 1e-3 and p.max() <= 1.0
    # the empirical masking rate per sequence follows p
    assert torch.allclose(masked.float().mean(1), p.squeeze(1), atol=0.15)  # 6 sigma at 400 tokens
    assert abs(masked.float().mean().item() - p.mean().item()) < 0.01


def test_loss_never_noises_image_or_prompt_and_trains_eos_pads():
    model = small_model(8)
    images, prompts = inputs()
    seen = {}
    original_forward = model.forward

    def spy(vision_tokens, prompt_ids, response_ids, vision_mask=None):
        seen["prompt"], seen["vision"], seen["response"] = prompt_ids.clone(), vision_tokens.clone(), response_ids.clone()
        return original_forward(vision_tokens, prompt_ids, response_ids, vision_mask)

    model.forward = spy
    vision_tokens = model.encode_images(images)
    response = torch.full((3, 8), 2)  # an all-[EOS] response: the loss must still be positive
    response[:, 0] = 9
    loss = sft_loss(model, vision_tokens, prompts, response, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen["prompt"], prompts) and torch.equal(seen["vision"], vision_tokens)
    assert (seen["response"] == MASK).any()
    eos_masked = (seen["response"][:, 1:] == MASK).any()
    assert eos_masked and loss.item() > 0


def test_loss_matches_naive_formula():
    model = small_model(8)
    images, prompts = inputs()
    response = torch.randint(5, VOCAB, (3, 8))
    vision_tokens = model.encode_images(images)
    loss = sft_loss(model, vision_tokens, prompts, response, generator=torch.Generator().manual_seed(3))
    noisy, masked, p = forward_noise(response, MASK, torch.Generator().manual_seed(3))
    logits = model(vision_tokens, prompts, noisy)
    total = 0.0
    for b in range(3):
        for i in range(8):
            if masked[b, i]:
                total += F.cross_entropy(logits[b, i][None], response[b, i][None]).item() / p[b, 0].item() / 8
    assert loss.item() == pytest.approx(total / 3, rel=1e-5)


def test_unknown_word_targets_carry_no_loss():
    model = small_model(8)
    images, prompts = inputs()
    vision_tokens = model.encode_images(images)
    response = torch.randint(5, VOCAB, (3, 8))
    unk = response.clone()
    unk[:, 2] = 4  # the model's [UNK] id in this test
    model.unk_id = 4
    noise = forward_noise(response, MASK, torch.Generator().manual_seed(3))
    noisy, masked, p = noise
    logits = model(vision_tokens, prompts, noisy)
    ce = F.cross_entropy(logits.transpose(1, 2), unk, reduction="none")
    keep = masked.clone()
    keep[:, 2] = False
    expected = (ce * keep / p).sum(1).div(8).mean()
    got = sft_loss(model, vision_tokens, prompts, unk, noise=(noisy, masked, p))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    model.unk_id = None
    assert sft_loss(model, vision_tokens, prompts, unk, noise=(noisy, masked, p)).item() > got.item()


# --- vision masking -------------------------------------------------------------------------

def test_all_false_vision_mask_equals_no_mask_and_true_changes_output():
    model = small_model(8)
    images, prompts = inputs()
    vision_tokens = model.encode_images(images)
    response = torch.full((3, 8), MASK)
    plain = model(vision_tokens, prompts, response)
    none_masked = model(vision_tokens, prompts, response, torch.zeros(3, 36, dtype=torch.bool))
    assert torch.equal(plain, none_masked)
    mask = torch.zeros(3, 36, dtype=torch.bool)
    mask[:, 0] = True
    assert not torch.allclose(plain, model(vision_tokens, prompts, response, mask))


def test_masked_image_position_is_exactly_the_mask_embedding():
    model = small_model(8)
    images, prompts = inputs()
    vision_tokens = model.encode_images(images)
    mask = torch.zeros(3, 36, dtype=torch.bool)
    mask[:, 5] = True
    replaced = vision_tokens.clone()
    replaced[:, 5] = model.tok_embed.weight[MASK]
    response = torch.full((3, 8), MASK)
    assert torch.allclose(model(vision_tokens, prompts, response, mask), model(replaced, prompts, response))


def test_wrong_image_size_is_a_clear_error():
    model = small_model(8)
    with pytest.raises(DispError, match=r"\(B, 3, 48, 48\)"):
        model.encode_images(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_forward_matches_a_plain_full_transformer():
    """prefix + decode equal running every block on every position of the whole sequence (written out
    here with the blocks' own layers) under the block attention mask (the image+prompt rows do not see
    the response columns), then slicing the response rows."""
    model = small_model()
    images, prompts = inputs()
    vision = model.encode_images(images)
    response = torch.full((3, 8), MASK)
    response[:, 2] = 7
    vision_mask = torch.zeros(3, model.cfg.n_vision, dtype=torch.bool)
    vision_mask[0, 5] = True
    with torch.no_grad():
        image_part = torch.where(vision_mask[..., None], model.tok_embed.weight[MASK], vision)
        x = torch.cat([image_part, model.tok_embed(torch.cat([prompts, response], dim=1))], dim=1)
        x = x + model.pos_fixed + model.pos_embed
        prefix_len = model.cfg.n_vision + model.cfg.prompt_len
        hidden = torch.zeros(x.shape[1], x.shape[1], dtype=torch.bool)
        hidden[:prefix_len, prefix_len:] = True  # row i may not attend to column j
        for block in model.blocks:
            h = block.ln1(x)
            q, k, v = block.attn.qkv(h).chunk(3, dim=-1)
            split = lambda t: t.unflatten(-1, (block.attn.heads, -1)).transpose(1, 2)  # noqa: E731
            scores = split(q) @ split(k).transpose(-2, -1) / (q.shape[-1] // block.attn.heads) ** 0.5
            att = torch.softmax(scores.masked_fill(hidden, -torch.inf), -1)
            x = x + block.attn.proj((att @ split(v)).transpose(1, 2).flatten(2))
            x = x + block.mlp(block.ln2(x))
        expected = model.lm_head(model.ln(x))[:, -8:]
        got, weights = model(vision, prompts, response, vision_mask, need_weights=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(vision, prompts, response, vision_mask), got)
    assert weights.shape == (3, 2, 8, model.cfg.seq_len)


def test_prefix_ignores_the_response_and_a_batch_1_cache_serves_a_batch():
    model = small_model()
    images, prompts = inputs()
    vision = model.encode_images(images)
    with torch.no_grad():
        cache = model.prefix(vision, prompts)
        response = torch.randint(5, VOCAB, (3, 8))
        torch.testing.assert_close(model.decode(cache, response), model(vision, prompts, response))
        # one sample's cache, broadcast over several responses, gives each response's own logits
        one = [(k[:1], v[:1]) for k, v in cache]
        many = torch.stack([response[0], response[1], torch.full((8,), MASK)])
        expected = torch.cat([model(vision[:1], prompts[:1], r[None]) for r in many])
        torch.testing.assert_close(model.decode(one, many), expected, atol=1e-5, rtol=1e-4)
    assert len(cache) == model.cfg.depth and cache[0][0].shape == (3, 2, 36 + 5, 16)



def test_attention_equals_the_plain_form():
    """The model's attention (no concatenation) against the textbook form: with and without a
    context, and with a batch-1 context broadcast over a batch."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=g) for _ in range(3))
    context = (torch.randn(3, 2, 7, 8, generator=g), torch.randn(3, 2, 7, 8, generator=g))
    for ctx in (None, context, tuple(c[:1] for c in context)):
        (y, w), (y_ref, w_ref) = attention(q, k, v, ctx), plain_attention(q, k, v, ctx)
        torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    assert attention(q, k, v, context)[1].shape == (3, 2, 5, 12)


def test_trace_records_when_and_how_confidently_each_position_was_written():
    model = small_model(8)
    images, prompts = inputs()
    plain = generate(model, images, prompts, gen_length=8, steps=8, block_length=4)
    out, (step, confidence) = generate(model, images, prompts, gen_length=8, steps=8, block_length=4,
                                       return_trace=True)
    assert torch.equal(out, plain)  # tracing changes nothing
    for b in range(len(out)):
        assert sorted(step[b].tolist()) == list(range(8))  # one position per model call, each exactly once
        assert step[b, :4].max() < step[b, 4:].min()  # the first block is written before the second
    # the recorded confidence is the model's probability of the committed token at that step
    b, pos = 0, int(step[0].argmin())  # the first position written: with the whole response masked
    vision = model.encode_images(images[:1])
    masked = torch.full((1, 8), MASK, dtype=torch.long)
    probs = F.softmax(model(vision, prompts[:1], masked).double(), dim=-1)
    assert confidence[b, pos].item() == pytest.approx(probs[0, pos, out[b, pos]].item(), rel=1e-6)


def test_banned_words_are_never_written_and_the_rest_is_the_reference_with_their_logits_removed():
    model = small_model(8)
    images, prompts = inputs()
    free = generate(model, images, prompts, gen_length=8, steps=8, block_length=8)
    banned = torch.zeros(VOCAB, dtype=torch.bool)
    banned[free.flatten().mode().values] = True  # the word greedy decoding writes most
    out = generate(model, images, prompts, gen_length=8, steps=8, block_length=8, banned=banned)
    assert not banned[out].any() and not torch.equal(out, free)
    forward = model.forward  # the reference: the same model with those logits at -inf
    model.forward = lambda *a, **k: forward(*a, **k).masked_fill(banned, float("-inf"))
    assert torch.equal(out, reference_generate(model, images, prompts, 8, 8, 8, 0.0, "low_confidence"))
