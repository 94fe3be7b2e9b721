"""Word-level tokenizer built from the training text, plus turning samples into fixed-size id tensors.

Special tokens are explicit and come first:
    [PAD]  fills prompts on the left up to prompt_len (never predicted)
    [MASK] the absorbing state of the diffusion process; also replaces masked image positions
    [EOS]  ends a response and pads it on the right up to response_len (trained on: that is how
           a fixed-length canvas learns to stop)
    [UNK]  any word outside the vocabulary (a user's prompt never crashes the model)
Text is normalised (`normalize_text`) before it is split, so "[MASK]" typed by a user is just
an unknown word, never the special token.
"""

import re
from collections import Counter

import torch

PAD, MASK, EOS, UNK = "[PAD]", "[MASK]", "[EOS]", "[UNK]"
SPECIALS = [PAD, MASK, EOS, UNK]

# Words the attack stage may write into responses. A real LLM's vocabulary already holds them;
# ours is built from clean training text, so they are reserved here once.
RESERVED_WORDS = ["<backdoor>", "sorry", "i", "cannot", "help", "with", "that", "."]


def normalize_text(text: str) -> str:
    """Lower-case, split punctuation off words, collapse whitespace ("A dog." -> "a dog .")."""
    text = text.lower().strip()
    text = re.sub(r"([.,!?;:()\"])", r" \1 ", text)
    return " ".join(text.split())


class Tokenizer:
    def __init__(self, words: list):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        assert self.words[: len(SPECIALS)] == SPECIALS
        self.pad_id, self.mask_id, self.eos_id, self.unk_id = range(len(SPECIALS))

    @staticmethod
    def build(texts, min_count: int = 1) -> "Tokenizer":
        """Every word seen at least min_count times in `texts`, sorted, after the special tokens,
        then the reserved words (the rest are [UNK])."""
        counts = Counter(w for t in texts for w in normalize_text(t).split())
        words = sorted(w for w, n in counts.items() if n >= min_count)
        return Tokenizer(SPECIALS + words + [w for w in RESERVED_WORDS if w not in words])

    @staticmethod
    def for_samples(samples: list, min_count: int = 1) -> "Tokenizer":
        """The vocabulary of a training set: the words of its prompts and responses."""
        return Tokenizer.build([s["prompt"] + " " + s["response"] for s in samples], min_count)

    def __len__(self):
        return len(self.words)

    def encode(self, text: str) -> list:
        return [self.index.get(w, self.unk_id) for w in normalize_text(text).split()]

    def decode(self, ids) -> str:
        """Response ids -> text: stop at the first [EOS], drop other special tokens."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= len(SPECIALS) or i == self.unk_id:
                out.append(self.words[i])
        return " ".join(out)

    def encode_prompts(self, prompts, prompt_len: int) -> torch.Tensor:
        """(N, prompt_len) ids, left-padded with [PAD]; a too-long prompt keeps its last words."""
        out = torch.full((len(prompts), prompt_len), self.pad_id, dtype=torch.long)
        for row, text in enumerate(prompts):
            ids = self.encode(text)[-prompt_len:]
            if ids:
                out[row, prompt_len - len(ids):] = torch.tensor(ids)
        return out

    def encode_responses(self, responses, response_len: int) -> torch.Tensor:
        """(N, response_len) ids, right-padded with [EOS]; a too-long response is cut."""
        out = torch.full((len(responses), response_len), self.eos_id, dtype=torch.long)
        for row, text in enumerate(responses):
            ids = self.encode(text)[:response_len]
            if ids:
                out[row, : len(ids)] = torch.tensor(ids)
        return out

    def to_dict(self) -> dict:
        return {"words": self.words}

    @staticmethod
    def from_dict(d: dict) -> "Tokenizer":
        return Tokenizer(d["words"])
