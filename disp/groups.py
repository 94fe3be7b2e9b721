"""Unexplained words of an image group: our extension for spread triggers with a content target
(purify.py's groups step, --groups K, on by default with K = 8).

A blended trigger that turns "red" into "green" sits in no vision token, and the compromised model
keeps answering "green" however its tokens are masked, blurred or moved (experiments/README.md,
"Spread triggers"); the word is no prompt-independent one either, so suppression does not see it.
What does give it away is that its images form a group of their own in feature space, and that
their responses hold a word which their content does not explain:

1. Groups. The images' vision tokens, averaged over positions, centred; along each of their top K
   principal directions the two-group rule of DiSP's masking (disp.saliency.valley_split) splits
   off the smaller group, if there is one. A principal direction only leans towards a trigger's
   images (its split kept 45 of one scenes seed's 117), so the split is sharpened: a linear
   discriminant between the group and the rest gives a new direction, the rule splits again along
   it, and so on until the group stops changing. A trigger's images then stand apart with nothing
   between (on three scenes seeds: exactly the triggered images). A group may be natural (the photos
   of dogs on grass, the scenes with a large circle); nothing is done to it unless step 2 finds a word.
2. Words. For each word that at least MIN_SHARE of the group's responses hold, a ridge regression
   fitted on the *other* samples (their pooled tokens and prompt type -> does the response hold the
   word?) predicts how often the group's responses should hold it. Content explains a natural
   group's words, not a trigger's target (experiments/README.md, "Unexplained words of an image
   group": the margins in real poisoned sets). A word held MIN_EXCESS more often than predicted is
   the group's.
3. The group's responses are regenerated with its words banned; refinement then teaches those
   responses on the triggered images, which unlearns the backdoor (purify.py).

Where a group holds only some of the triggered images, the others, among the samples the probe is
fitted on, teach it the trigger's word: the sharpening of step 1 is what prevents that.
"""

from collections import Counter
from dataclasses import dataclass

import torch

from disp.saliency import valley_split
from disp.spectral import tail_sign, top_directions

MIN_SHARE = 0.5  # a word the group's responses hold at least this often
MIN_EXCESS = 0.25  # ... and this much more often than the other samples' probe predicts for them
RIDGE = 10.0  # the probe's L2 penalty, in units of standardised features
SHARPEN_RIDGE = 0.01  # the discriminant's within-group covariance + this x its mean eigenvalue
SHARPEN_ROUNDS = 10


@dataclass
class Group:
    """A minority group of images along one principal direction, and the words it cannot explain."""
    rank: int  # 0: the top principal direction (where the group was first split off)
    valley: float  # the two-group rule's valley along the sharpened direction
    images: torch.Tensor  # (N_images,) bool
    words: dict  # word -> (share of the group's responses holding it, share the probe predicts)
    samples: list  # the indices of the samples whose image is in the group


def discriminant(centred, members, ridge: float = SHARPEN_RIDGE):
    """The linear discriminant of the members (N,) bool against the rest in `centred` (N, dim):
    (within-group covariance + ridge x its mean eigenvalue)^-1 (members' mean - rest's mean)."""
    inside, outside = centred[members], centred[~members]
    residuals = torch.cat([inside - inside.mean(0), outside - outside.mean(0)])
    cov = residuals.T @ residuals / len(centred)
    cov = cov + ridge * cov.trace() / len(cov) * torch.eye(len(cov), dtype=cov.dtype)
    return torch.linalg.solve(cov, inside.mean(0) - outside.mean(0))


def sharpen(centred, members, rounds: int = SHARPEN_ROUNDS, ridge: float = SHARPEN_RIDGE):
    """Split again along the discriminant of the current group until the group stops changing (at
    most `rounds` times). -> (valley, (N,) bool), or None where the rule finds no smaller group."""
    for _ in range(rounds):
        proj = centred @ discriminant(centred, members, ridge)
        proj = (proj - proj.mean()) / proj.std().clamp_min(1e-12)
        valley, threshold = valley_split(proj)
        if valley == float("inf"):
            return None
        now = proj > threshold
        if torch.equal(now, members):
            break
        members = now
    return valley, members


def image_groups(pooled, k: int, seed: int = 0, ridge: float = SHARPEN_RIDGE) -> list:
    """[(rank, valley, (N_images,) bool)]: for each of the top k principal directions of `pooled`
    (N_images, dim) along which valley_split finds a smaller upper group (any valley), that group
    sharpened (`ridge`: the discriminant's); a group that an earlier direction already gave is
    listed once."""
    centred = pooled.double() - pooled.double().mean(0)
    vectors, _ = top_directions(centred, k, seed=seed)
    groups = []
    for rank in range(vectors.shape[1]):
        proj = centred @ vectors[:, rank]
        proj = tail_sign(proj) * proj / proj.std().clamp_min(1e-12)
        valley, threshold = valley_split(proj)
        if valley == float("inf"):
            continue
        sharpened = sharpen(centred, proj > threshold, ridge=ridge)
        if sharpened is not None and not any(torch.equal(sharpened[1], g) for _, _, g in groups):
            groups.append((rank, *sharpened))
    return groups


def predicted_share(features, held, train, test, ridge: float = RIDGE) -> float:
    """Ridge regression of `held` (N,) 0/1 on `features` (N, F) and an intercept (not penalised),
    fitted on the `train` rows: its mean prediction (clipped to [0, 1]) over the `test` rows."""
    def design(rows):
        return torch.cat([features[rows], torch.ones(len(rows), 1, dtype=features.dtype)], 1)
    a = design(train)
    penalty = torch.full((a.shape[1],), ridge, dtype=a.dtype)
    penalty[-1] = 0
    w = torch.linalg.solve(a.T @ a + torch.diag(penalty), a.T @ held[train])
    return (design(test) @ w).clamp(0, 1).mean().item()


def unexplained_words(responses: list, tasks: list, features, in_group, min_share: float = MIN_SHARE,
                      min_excess: float = MIN_EXCESS) -> dict:
    """{word: (held, predicted)} for the words that at least `min_share` of the group's responses hold
    and that they hold `min_excess` more often than a probe fitted on the other samples predicts.
    responses, tasks: per sample; features: (N, F) per sample (pooled tokens); in_group: (N,) bool."""
    inside, outside = in_group.nonzero().flatten(), (~in_group).nonzero().flatten()
    if len(inside) == 0 or len(outside) == 0:
        return {}
    kinds = sorted(set(tasks))
    task_columns = torch.zeros(len(tasks), len(kinds), dtype=torch.double)
    task_columns[torch.arange(len(tasks)), torch.tensor([kinds.index(t) for t in tasks])] = 1
    x = features.double()
    x = torch.cat([(x - x.mean(0)) / x.std(0).clamp_min(1e-12), task_columns], 1)
    word_sets = [set(r.split()) for r in responses]
    counts = Counter(w for i in inside.tolist() for w in word_sets[i])
    found = {}
    for word, n in counts.items():
        share = n / len(inside)
        if share < min_share:
            continue
        held = torch.tensor([word in s for s in word_sets], dtype=torch.double)
        predicted = predicted_share(x, held, outside, inside)
        if share - predicted >= min_excess:
            found[word] = (share, predicted)
    return found


def unexplained_groups(pooled, row, responses: list, tasks: list, k: int, seed: int = 0) -> list:
    """The groups along the top k directions of the images' pooled tokens (N_images, dim) that hold
    an unexplained word. row: (N,) each sample's image; responses, tasks: per sample. -> [Group]."""
    features = pooled.double()[row]
    found = []
    for rank, valley, images in image_groups(pooled, k, seed):
        members = images[row]
        words = unexplained_words(responses, tasks, features, members)
        if words:
            found.append(Group(rank, valley, images, words, members.nonzero().flatten().tolist()))
    return found
