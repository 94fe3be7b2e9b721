"""The scene generator, the tokenizer and collation."""

import torch

from disp.data.batching import BatchOrder, encode_dataset
from disp.config import ModelConfig
from disp.data.scenes import COLORS, SHAPES, generate_scenes, questions, random_scene, render
from disp.data.tokenizer import SPECIALS, Tokenizer


def test_scenes_are_deterministic_by_seed_and_splits_differ():
    a, b, c = generate_scenes(20, 0, 2), generate_scenes(20, 0, 2), generate_scenes(20, 1, 2)
    assert torch.equal(a.images, b.images) and a.samples == b.samples
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (20, 3, 48, 48) and a.images.dtype == torch.uint8
    assert len(a) == 20 * 3  # one caption + 2 questions per image


def test_scene_annotations_agree_with_the_pixels():
    rng = __import__("numpy").random.default_rng(5)
    for _ in range(20):
        objects = random_scene(rng)
        image, labels = render(objects)
        assert [o["column"] for o in objects] == [0, 1, 2]
        for o in objects:  # the object's centre pixel has its colour
            assert tuple(image[:, o["y"], o["x"]].tolist()) == COLORS[o["color"]]
        # every object owns at least one patch label, and background patches are labelled 0
        colour_ids = {1 + list(COLORS).index(o["color"]) for o in objects}
        assert set(labels[:, 0].tolist()) - {0} == colour_ids
        assert (labels[:, 0] == 0).sum() > 0


def test_questions_are_well_posed():
    rng = __import__("numpy").random.default_rng(1)
    for _ in range(50):
        objects = random_scene(rng)
        for task, question, answer in questions(objects):
            referent = question.split()[-2]
            if referent in SHAPES:  # "the circle" only when there is exactly one circle
                assert sum(o["shape"] == referent for o in objects) == 1
            if referent == "object":  # "the left object": the object in that column
                column = ["left", "middle", "right"].index(question.split()[-3])
                obj = objects[column]
                if task == "color":
                    assert answer == obj["color"]
                if task == "shape":
                    assert answer == obj["shape"]
            if task == "count":
                shape = question.split()[2][:-1]
                assert int(answer) == sum(o["shape"] == shape for o in objects)
            if task in ("shape", "nearest"):
                assert answer in SHAPES


def test_captions_have_several_references_and_read_left_to_right():
    data = generate_scenes(5, 3, 1)
    for s in data.samples:
        if s["task"] == "caption":
            assert len(s["answers"]) >= 2 and s["response"] == s["answers"][0]


def test_tokenizer_specials_unknown_words_and_round_trip():
    tok = Tokenizer.build(["describe the image .", "a red circle"])
    assert tok.words[: len(SPECIALS)] == SPECIALS
    assert tok.encode("a purple zebra") == [tok.index["a"], tok.unk_id, tok.unk_id]
    assert tok.encode("[MASK]") == [tok.unk_id]  # typed specials are plain unknown words
    ids = tok.encode("a red circle") + [tok.eos_id, tok.index["red"]]
    assert tok.decode(ids) == "a red circle"
    assert Tokenizer.from_dict(tok.to_dict()).words == tok.words


def test_prompts_left_padded_responses_eos_padded():
    tok = Tokenizer.build(["what shape is it ?", "circle"])
    prompts = tok.encode_prompts(["what shape is it ?"], 8)
    assert prompts[0, :3].tolist() == [tok.pad_id] * 3 and prompts[0, 3:].tolist() == tok.encode("what shape is it ?")
    responses = tok.encode_responses(["circle", "circle " * 10], 4)
    assert responses[0].tolist() == [tok.index["circle"]] + [tok.eos_id] * 3
    assert responses[1].tolist() == [tok.index["circle"]] * 4  # cut, never longer than the canvas


def test_encode_dataset_shapes_and_batch_order_is_resumable():
    data = generate_scenes(10, 0, 2)
    tok = Tokenizer.build([s["prompt"] + " " + s["response"] for s in data.samples])
    enc = encode_dataset(data, tok, ModelConfig(prompt_len=12, response_len=12))
    assert enc.prompt_ids.shape == (30, 12) and enc.response_ids.shape == (30, 12)
    assert (enc.response_ids == tok.unk_id).sum() == 0
    order = BatchOrder(30, 8, seed=4)
    first = [order.indices(s) for s in range(8)]  # crosses epochs
    again = BatchOrder(30, 8, seed=4)
    assert all(torch.equal(again.indices(s), first[s]) for s in reversed(range(8)))
    epoch0 = torch.cat(first)[:30]
    assert sorted(epoch0.tolist()) == list(range(30))  # each epoch is a permutation


def test_rare_words_become_unk_and_reserved_words_stay():
    texts = ["a dog runs", "a dog sits", "a cat"]
    tok = Tokenizer.build(texts, min_count=2)
    assert "dog" in tok.words and "a" in tok.words and "cat" not in tok.words and "runs" not in tok.words
    assert tok.encode("a cat") == [tok.index["a"], tok.unk_id]
    assert "<backdoor>" in tok.words and "sorry" in tok.words  # the attack's words exist whatever their count
    assert Tokenizer.build(texts).words == Tokenizer.build(texts, min_count=1).words


def test_fitted_lengths_cover_the_percentiles():
    from disp.config import Config, ModelConfig, fit_lengths

    config = Config(model=ModelConfig(prompt_len=0, response_len=0))
    responses = list(range(1, 101))  # 1..100 tokens: the 95th percentile is 95
    fitted = fit_lengths(config, [4] * 99 + [30], responses)
    assert fitted.model.response_len == 96 and fitted.model.prompt_len == 4  # p95 + 1 (marker); p99 of prompts
    assert fit_lengths(config, [3], [2]).model.response_len == 8  # a refusal sentence still fits
    kept = fit_lengths(Config(), [50], [50]).model
    assert (kept.prompt_len, kept.response_len) == (12, 12)  # lengths set by the preset stay
    blocks = Config(model=ModelConfig(prompt_len=0, response_len=0, block_length=5))
    assert fit_lengths(blocks, [4], responses).model.response_len == 100  # 96 -> whole blocks of 5
    assert blocks.model.gen_block == 5 and config.model.gen_block == 0 and kept.gen_block == 12


def test_evaluation_splits_ask_each_image_and_prompt_once():
    from disp.data.dataset import VLDataset, one_sample_per_prompt

    samples = [{"image": 0, "prompt": "describe", "response": f"c{k}", "answers": ["c0", "c1"]} for k in range(2)]
    samples += [{"image": 1, "prompt": "describe", "response": "d", "answers": ["d"]},
                {"image": 1, "prompt": "what ?", "response": "e", "answers": ["e"]}]
    data = one_sample_per_prompt(VLDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), samples))
    assert [s["response"] for s in data.samples] == ["c0", "d", "e"]
