"""Collation: a VLDataset's samples -> fixed-size id tensors, and a resumable shuffled batch order.

Every sequence has the same shape ([image ; prompt ; response] of fixed lengths), so a whole
dataset is three tensors and a batch is an index into them.
"""

from dataclasses import dataclass

import torch

from disp.data.dataset import VLDataset


@dataclass
class EncodedData:
    image_index: torch.Tensor  # (N,) long, row of the dataset's images
    prompt_ids: torch.Tensor  # (N, prompt_len)
    response_ids: torch.Tensor  # (N, response_len)

    def __len__(self):
        return len(self.image_index)


def encode_dataset(dataset: VLDataset, tokenizer, model_cfg) -> EncodedData:
    samples = dataset.samples
    return EncodedData(
        image_index=torch.tensor([s["image"] for s in samples], dtype=torch.long),
        prompt_ids=tokenizer.encode_prompts([s["prompt"] for s in samples], model_cfg.prompt_len),
        response_ids=tokenizer.encode_responses([s["response"] for s in samples], model_cfg.response_len),
    )


class BatchOrder:
    """Batch b of a run is a pure function of (seed, b): an interrupted run resumes exactly.

    The sample stream is a concatenation of seeded permutations, one per epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms = {}

    def _perm(self, epoch: int):
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # keep only the current epoch
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        positions = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)  # in the sample stream
        epochs = positions // self.n
        out = torch.empty(self.batch_size, dtype=torch.long)
        for epoch in epochs.unique().tolist():  # a batch spans at most a few epochs
            here = epochs == epoch
            out[here] = self._perm(epoch)[positions[here] % self.n]
        return out
