"""Feature-space purification: find a shift that a minority of the poisoned set's images share in the
vision tokens, and take it out before the compromised model regenerates the responses.

DiSP masks the vision tokens that sway the first denoising step most. A spread trigger (a faint
blend of noise, a sine grating, a warp) sits in no single token, so there is nothing to mask; but
it moves the vision tokens of every poisoned image the same way, while the clean images vary every
which way. Spectral signatures (Tran et al. 2018) look for exactly that: centre the samples'
representations and take their top singular vectors; along a direction that a poisoned minority
shares, that minority forms a group of its own. We test each of the top `k` directions with the
rule that decides which tokens DiSP masks (disp.saliency.valley_split: two groups, a real valley
between them, the upper one the smaller), and for each direction that splits, move every image to
the larger group's mean along it: `project_out`. The compromised model regenerates the responses
from the moved tokens (the trigger's shift gone, the rest of the image intact), and refinement
teaches it those responses on the triggered images, as in DiSP.

The representation is each image's vision tokens as the language model reads them (the projector's
output, n_vision x dim) flattened into one vector, so that one direction can say "one corner token
moved" (a patch) as well as "every token moved a little, each its own way" (a grating).
"""

from dataclasses import dataclass

import torch

from disp.saliency import valley_split


@dataclass
class Direction:
    """One direction of the set's flattened vision tokens that splits the images into two groups."""
    rank: int  # 0: the top singular vector
    vector: torch.Tensor  # (n_vision * dim,) unit length, oriented so the smaller group lies above
    valley: float  # the two-group valley along it (<= max_valley: a real second group)
    centre: float  # the larger group's mean of x . vector: where project_out moves every image
    flagged: torch.Tensor  # (N_images,) bool, the images above the valley: the smaller group


def top_directions(x, k: int, iters: int = 8, seed: int = 0):
    """The top-k right singular vectors of x (N, D), as (D, k) orthonormal columns, largest first, and
    their singular values (k,): subspace iteration from a seeded random start (Halko et al. 2011),
    enough for the few leading directions and far cheaper than a full SVD of a wide matrix."""
    k = min(k, *x.shape)
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(x.shape[1], k + 8, generator=g, dtype=x.dtype)).Q  # a few spare columns
    for _ in range(iters):
        q = torch.linalg.qr(x.T @ (x @ q)).Q
    _, s, vh = torch.linalg.svd(x @ q, full_matrices=False)  # small: (N, k + 8)
    return (q @ vh.T)[:, :k], s[:k]


def tail_sign(proj) -> float:
    """-1 if the projections' long tail (their skew) points down, else 1: a minority sits on the long
    tail's side, and multiplying by this puts it above."""
    return -1.0 if (proj ** 3).mean() < 0 else 1.0


def find_directions(tokens, k: int = 3, max_valley: float = 0.25, seed: int = 0) -> list:
    """Directions among the top k of the images' centred vision tokens along which a minority forms
    its own group. tokens: (N_images, n_vision, dim). -> [Direction], possibly empty."""
    x = tokens.flatten(1).double()
    centred = x - x.mean(0)
    vectors, _ = top_directions(centred, k, seed=seed)
    found = []
    for rank in range(vectors.shape[1]):
        v = vectors[:, rank]
        proj = centred @ v  # mean 0
        sign = tail_sign(proj)
        v, proj = sign * v, sign * proj
        scale = proj.std().clamp_min(1e-12)  # the rule's fit works in units of the spread
        valley, threshold = valley_split(proj / scale)
        if valley > max_valley:
            continue
        flagged = proj > threshold * scale
        found.append(Direction(rank, v.float(), valley, (x[~flagged] @ v).mean().item(), flagged))
    return found


def project_out(tokens, directions: list):
    """tokens (B, n_vision, dim) with each direction's component set to its larger group's value:
    x <- x - (x . v - centre) v, for the directions' (orthonormal) vectors v."""
    x = tokens.flatten(1).double()
    for d in directions:
        v = d.vector.to(x)  # double, on the tokens' device
        x = x - (x @ v - d.centre)[:, None] * v
    return x.view(tokens.shape).to(tokens.dtype)
