"""Generating over a dataset (the ViT runs once per distinct image, and nothing else changes), and the
results it is reported in: metric lines, the results table, the sweep figure."""

import torch

from disp.config import ModelConfig
from disp.data.dataset import VLDataset
from disp.diffusion import generate
from disp.evaluation import detection, generate_responses, quality_line, score, token_scores
from disp.model import DiffusionVLM
from disp.data.tokenizer import Tokenizer


def setup():
    tokenizer = Tokenizer.build(["a red square", "what color is it ?", "red", "describe the image ."])
    torch.manual_seed(0)
    cfg = ModelConfig(vit_dim=32, vit_depth=1, vit_heads=2, dim=32, depth=2, heads=2, vocab_size=len(tokenizer),
                      prompt_len=5, response_len=4)
    model = DiffusionVLM(cfg, mask_id=tokenizer.mask_id).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8, generator=g)
    prompts = ["describe the image .", "what color is it ?"]
    # image 1 has two prompts, image 2 two, image 0 one; samples are not grouped by image
    samples = [{"image": m, "task": "t", "prompt": p, "response": "red", "answers": ["red"]}
               for m, p in [(1, prompts[0]), (2, prompts[1]), (1, prompts[1]), (0, prompts[0]), (2, prompts[0])]]
    return model, tokenizer, VLDataset(images=images, samples=samples)


def test_generate_responses_runs_the_vit_once_per_image_and_matches_per_sample_generation():
    model, tokenizer, data = setup()
    seen = []
    model.vit.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    got = generate_responses(model, tokenizer, data, [4, 0, 2, 1], batch_size=3)
    assert sum(seen) == 2  # images 1 and 2 only, each encoded once
    expected = []
    for i in [4, 0, 2, 1]:  # one sample at a time, its own image through the ViT
        s = data.samples[i]
        ids = generate(model, data.images[s["image"]][None], tokenizer.encode_prompts([s["prompt"]], 5),
                       gen_length=4, steps=4, block_length=4)
        expected.append(tokenizer.decode(ids[0]))
    assert got == expected
    assert generate_responses(model, tokenizer, data, []) == []


def test_token_scores_give_one_row_per_requested_sample_in_order():
    model, tokenizer, data = setup()
    scores = token_scores(model, tokenizer, data, [3, 0, 2], "kl", batch_size=2)
    assert scores.shape == (3, 36) and torch.all(scores > 0)
    for row, i in enumerate([3, 0, 2]):  # each row is that sample's own score, whatever its batch
        torch.testing.assert_close(token_scores(model, tokenizer, data, [i], "kl")[0], scores[row], atol=1e-5, rtol=1e-4)
    assert token_scores(model, tokenizer, data, [], "kl").shape == (0, 36)


def test_majority_answer_is_the_most_frequent_training_answer_and_its_rate_on_test_questions():
    from disp.evaluation import answer_rate, majority_answer

    def dataset(pairs):
        return VLDataset(torch.zeros(1, 3, 48, 48, dtype=torch.uint8),
                         [{"image": 0, "task": task, "prompt": "p", "response": answer, "answers": [answer]}
                          for task, answer in pairs])

    train = dataset([("color", "red"), ("count", "2"), ("color", "red"), ("caption", "a red thing")] +
                    [("caption", "red")] * 5)  # captions do not count as answers
    test = dataset([("color", "red"), ("count", "3"), ("shape", "circle"), ("caption", "red")])
    assert majority_answer(train) == "red" and answer_rate("red", test) == 1 / 3
    assert majority_answer(dataset([("caption", "x")])) is None
    assert answer_rate("red", dataset([("caption", "red")])) is None


def test_samples_sharing_image_prompt_and_mask_are_computed_once_with_the_same_result():
    model, tokenizer, data = setup()
    # samples 5 and 6 repeat sample 0 (another caption of the same image and prompt)
    data.samples += [dict(data.samples[0], response="a red square"), dict(data.samples[0])]
    calls = []
    original = model.prefix
    model.prefix = lambda v, p, m=None: calls.append(len(p)) or original(v, p, m)
    got = generate_responses(model, tokenizer, data, [0, 5, 1, 6])
    assert sum(calls) == 2 and got[0] == got[1] == got[3]
    masks = torch.zeros(len(data.samples), model.cfg.n_vision, dtype=torch.bool)
    masks[6, :5] = True  # another mask: computed on its own
    calls.clear()
    got = generate_responses(model, tokenizer, data, [0, 5, 6], vision_masks=masks)
    assert sum(calls) == 2
    masked_alone = generate_responses(model, tokenizer, data, [6], vision_masks=masks)
    assert got[2] == masked_alone[0]
    scores = token_scores(model, tokenizer, data, [5, 1, 0], "kl")
    assert torch.equal(scores[0], scores[2])  # one computation, copied
    assert torch.allclose(scores[1], token_scores(model, tokenizer, data, [1], "kl")[0], atol=1e-6)


def test_painted_masks_re_encode_the_painted_image_for_generation_and_scores():
    from disp.model import paint_patches
    model, tokenizer, data = setup()
    masks = torch.zeros(len(data.samples), model.cfg.n_vision, dtype=torch.bool)
    masks[0, [0, 1, 6, 7]] = True  # sample 0's top-left 2 x 2 patches; sample 3 keeps its image whole
    seen = []
    model.vit.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    got = generate_responses(model, tokenizer, data, [0, 3], vision_masks=masks, paint=True)
    corner = seen[-1][0, :, :16, :16]  # the ViT's last input: sample 0's image, its masked patches painted
    assert torch.all(corner == corner[:, :1, :1])
    expected = []
    for i in (0, 3):
        s = data.samples[i]
        painted = paint_patches(data.images[s["image"]][None].float() / 255, masks[i:i + 1], 8)
        ids = generate(model, None, tokenizer.encode_prompts([s["prompt"]], 5), gen_length=4, steps=4, block_length=4,
                       vision_tokens=model.encode_images(painted), vision_mask=masks[i:i + 1])
        expected.append(tokenizer.decode(ids[0]))
    assert got == expected
    with torch.no_grad():  # the painted patches move the tokens the mask does not cover
        whole, painted = model.encode_images(data.images[1:2]), model.encode_images(data.images[1:2], paint=masks[:1])
    assert not torch.allclose(whole[0, 20], painted[0, 20])
    scores = token_scores(model, tokenizer, data, [0, 3], "kl", paint=True)
    assert not torch.allclose(scores, token_scores(model, tokenizer, data, [0, 3], "kl"), rtol=0.05)


def test_distinct_captions_counts_the_different_caption_outputs_only():
    samples = [{"image": i, "task": "caption", "prompt": "describe", "response": "x", "answers": ["a dog runs"]}
               for i in range(4)] + [{"image": 0, "task": "color", "prompt": "what color ?", "response": "red",
                                      "answers": ["red"]}]
    data = VLDataset(images=torch.zeros(4, 3, 48, 48, dtype=torch.uint8), samples=samples)
    outputs = ["a dog runs", "a dog runs", "two dogs play", "a dog runs", "two dogs play"]
    assert score(data, range(5), outputs)["distinct_captions"] == 2  # the answer "two dogs play" is no caption
    assert score(data, range(4), ["a", "b", "c", "d"])["distinct_captions"] == 4
    assert "distinct_captions" not in score(data, [4], ["red"])  # no caption, no count


def test_quality_line_shows_the_measured_tasks_only():
    """A questions-only run (DAQUAR) prints its VQA accuracy, not a CIDEr-D of 0.000 for captions it has none of."""
    samples = [{"image": 0, "task": "caption", "prompt": "describe", "response": "x", "answers": ["a dog runs"]},
               {"image": 0, "task": "color", "prompt": "what color ?", "response": "red", "answers": ["red"]}]
    data = VLDataset(images=torch.zeros(1, 3, 48, 48, dtype=torch.uint8), samples=samples)
    assert quality_line(score(data, [1], ["red"])) == "VQA 1.000"
    both = quality_line(score(data, [0, 1], ["a dog runs", "blue"]))
    assert both.startswith("CIDEr-D ") and "BLEU-4 " in both and both.endswith("VQA 0.000")


def test_detection_scores_changed_and_masked_samples_against_the_manifest():
    rows = [{"index": i, "changed": c, "masked_tokens": m} for i, (c, m) in
            enumerate([(True, [3]), (True, []), (False, []), (True, [0, 5]), (False, [])])]
    found = detection(rows, poisoned={0, 2})
    assert found["n_changed"] == 3
    assert found["precision"] == 1 / 3 and found["recall"] == 1 / 2  # changed {0, 1, 3}, poisoned {0, 2}
    assert found["trigger_sample_masked_rate"] == 1 / 2 and found["clean_sample_masked_rate"] == 1 / 3
    nothing = detection([dict(r, changed=False, masked_tokens=[]) for r in rows], poisoned={0})
    assert nothing["precision"] == 0 and nothing["recall"] == 0 and nothing["clean_sample_masked_rate"] == 0
    assert nothing["n_flagged"] == 0  # a file written without the spectral step
    flagged = detection([dict(r, flagged=r["index"] in (2, 4)) for r in rows], poisoned={0, 2})
    assert (flagged["n_flagged"], flagged["flagged_precision"], flagged["flagged_recall"]) == (2, 1 / 2, 1 / 2)


def test_generation_writes_in_the_models_sampler_blocks(monkeypatch):
    """generate_responses and denoising_trace decode in blocks of the model's block_length (0: one block)."""
    import disp.evaluation as evaluation
    from disp.evaluation import denoising_trace

    model, tokenizer, data = setup()
    seen = []
    real = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", lambda *a, **kw: seen.append(kw["block_length"]) or real(*a, **kw))
    generate_responses(model, tokenizer, data, [0])
    model.cfg.block_length = 2
    generate_responses(model, tokenizer, data, [0])
    denoising_trace(model, tokenizer, data, 0)
    assert seen == [4, 2, 2]


def test_sampling_at_the_models_temperature_is_reproducible_and_leaves_the_global_stream_alone():
    """cfg.temperature > 0 samples (other responses than greedy), the same ones on every call, from
    its own seeded noise: training's random stream, which train.py's evaluations run inside, is untouched."""
    model, tokenizer, data = setup()
    greedy = generate_responses(model, tokenizer, data, batch_size=2)
    model.cfg.temperature = 1.0
    state = torch.get_rng_state()
    sampled = generate_responses(model, tokenizer, data, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert sampled != greedy
    assert generate_responses(model, tokenizer, data, batch_size=2) == sampled


def test_results_sweep_table_shows_the_tasks_the_data_has():
    """A questions-only run's mask-ratio sweep has a VQA column and no CIDEr-D column of zeros."""
    from disp.support.report import results_markdown

    cfg = {"trigger": "patch", "target": "insert", "poison_rate": 0.2, "attack_trainable": "projector+lm",
           "saliency": "kl", "rule": "adaptive", "suppress": 0.01, "mask_ratio": 0.05, "preset": "daquar", "seed": 0}
    sweep = {"kl": {"ratio": [0.0, 0.1], "asr": [0.9, 0.1], "vqa_accuracy": [0.2, 0.18]}}
    results = {"config": cfg, "clean": {"asr": 0.0, "false_trigger_rate": 0.0, "vqa_accuracy": 0.2}, "sweep": sweep,
               "examples": []}
    text = results_markdown(results, {"clean": results["clean"]}, "runs/x")
    assert "| selection | ratio | ASR | clean VQA |\n|---|---:|---:|---:|\n| kl | 0.00 | 0.900 | 0.200 |\n" in text
    assert "clean CIDEr-D" not in text
    sweep["kl"]["cider"] = [0.3, 0.25]  # a run with captions too keeps both columns
    assert "| kl | 0.10 | 0.100 | 0.180 | 0.250 |" in results_markdown(results, {"clean": results["clean"]}, "runs/x")


def test_sweep_figure_draws_the_tasks_the_data_has(monkeypatch, tmp_path):
    """Questions only: one panel, ASR and VQA; captions only: ASR alone beside the CIDEr-D panel."""
    import matplotlib.pyplot as plt

    from disp.support import figures

    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig))
    curve = {"ratio": [0.0, 0.1], "asr": [0.9, 0.1]}
    figures.sweep_curves(tmp_path / "a.png", {"kl": {**curve, "vqa_accuracy": [0.2, 0.1]}})
    figures.sweep_curves(tmp_path / "b.png", {"kl": {**curve, "cider": [0.3, 0.2]}})
    assert [len(fig.axes) for fig in saved] == [1, 2]
    assert [len(fig.axes[0].lines) for fig in saved] == [2, 1]
    for fig in saved:
        plt.close(fig)


def test_the_mask_ratio_sweep_records_only_the_tasks_measured():
    """On questions-only data the sweep holds VQA accuracy and no CIDEr-D column of zeros."""
    from disp.test_time import ratio_sweep

    class QuestionsOnly:  # HeldOutSet.measure's first row, as on DAQUAR: no caption metrics
        def measure(self, model, limit, clean_masks, triggered_masks):
            return [{"asr": 1.0 - clean_masks.float().mean().item(), "false_trigger_rate": 0.0, "vqa_accuracy": 0.2}]

    scores = torch.rand(3, 10)
    curve = ratio_sweep(QuestionsOnly(), None, scores, scores, [0.0, 0.5], 3)
    assert curve == {"ratio": [0.0, 0.5], "asr": [1.0, 0.5], "vqa_accuracy": [0.2, 0.2]}
