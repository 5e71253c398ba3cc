"""Loss functions shared by the methods, each a plain function of tensors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.

    The T^2 factor (Hinton et al. 2015) keeps the soft term's gradients on the scale of the
    hard term's as T changes. Computed in float32 whatever the logits' precision.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * (t * t)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
            alpha: float) -> Tensor:
    """The paper's equation (2): alpha * CE(s, y) + (1 - alpha) * T^2 * KL(teacher_T || student_T).

    KL is averaged over the batch (the "batchmean" of a KL divergence, so it equals the
    cross-entropy of the soft targets minus their entropy, per example). Returns a scalar.
    """
    ce = F.cross_entropy(student_logits.float(), targets)
    return alpha * ce + (1.0 - alpha) * soft_kl(student_logits, teacher_logits, temperature)


def paper_snippet_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
                       alpha: float) -> Tensor:
    """The loss the paper's Figure 4 code computes, kept only as an ablation; it is NOT equation (2).

    It feeds probabilities (not log-probabilities) to KLDivLoss with its default mean over every
    element, negates it and scales by T+1. What is left depends on the student only through
    +mean(p_t * p_s): minimising it pushes the student's soft distribution *away* from the
    teacher's (tests/test_loss.py checks that its gradient opposes equation (2)'s).
    """
    t = temperature
    p_s = F.softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    # KLDivLoss(input, target) with reduction "mean" computes mean(target * (log(target) - input)).
    kl_elementwise = torch.xlogy(p_t, p_t) - p_t * p_s
    distill = -kl_elementwise.mean() * (t + 1)
    return alpha * F.cross_entropy(student_logits.float(), targets) + (1 - alpha) * distill


_F = TypeVar("_F", bound=Callable[..., Tensor])


def _full_precision(fn: _F) -> _F:
    """Run `fn` with autocast off: under bf16 autocast a float32 matmul would still run in bf16,
    and similarity and distance matrices need the precision (their inputs are cast by `.float()`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# --- Response-based: Decoupled KD -----------------------------------------------------------------


def non_target_index(targets: Tensor, num_classes: int) -> Tensor:
    """(N, C-1) column indices of every class but each row's target, in class order: column j is class
    j below the target and j + 1 from it on."""
    columns = torch.arange(num_classes - 1, device=targets.device)
    return columns + (columns >= targets.view(-1, 1)).long()


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
              temperature: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD) of Decoupled KD (Zhao et al., CVPR 2022), each T^2-scaled and batch-averaged.

    TCKD is the KL between the teacher's and the student's binary distributions (target class vs
    all others); NCKD is the KL between their distributions over the non-target classes alone
    (renormalised without the target). Both are computed from log-sum-exps of the logits, so no
    probability is subtracted from 1 and no masked logit is shifted by a large constant.
    """
    t = temperature
    s, z = student_logits.float() / t, teacher_logits.float() / t
    # Gathers, not boolean masks: a mask selects through `nonzero`, which waits for the device and has
    # a data-dependent shape, so a step using it could not be captured as a CUDA graph.
    target = targets.view(-1, 1)
    others = non_target_index(targets, s.shape[1])
    # Non-target logits as an (N, C-1) matrix, classes in order: its softmax is the "non-target" distribution.
    s_other, z_other = s.gather(1, others), z.gather(1, others)

    def binary_log_probs(all_logits: Tensor, other_logits: Tensor) -> Tensor:
        lse = torch.logsumexp(all_logits, dim=1)
        log_p_target = all_logits.gather(1, target).squeeze(1) - lse
        log_p_rest = torch.logsumexp(other_logits, dim=1) - lse
        return torch.stack([log_p_target, log_p_rest], dim=1)

    b_s, b_t = binary_log_probs(s, s_other), binary_log_probs(z, z_other)
    tckd = F.kl_div(b_s, b_t, log_target=True, reduction="batchmean") * (t * t)
    nckd = F.kl_div(F.log_softmax(s_other, dim=1), F.log_softmax(z_other, dim=1), log_target=True,
                    reduction="batchmean") * (t * t)
    return tckd, nckd


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
             alpha: float, beta: float) -> Tensor:
    """Decoupled KD: alpha * TCKD + beta * NCKD (see `dkd_parts`)."""
    tckd, nckd = dkd_parts(student_logits, teacher_logits, targets, temperature)
    return alpha * tckd + beta * nckd


# --- Feature-based: FitNets hints and attention transfer ------------------------------------------


def pool_to(feat: Tensor, size: tuple[int, int]) -> Tensor:
    """Adaptive average pooling to `size`, skipped when the map already has that size."""
    return feat if tuple(feat.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(feat, size)


def smaller_size(a: Tensor, b: Tensor) -> tuple[int, int]:
    """The spatial size both maps can be pooled to: the smaller height and the smaller width."""
    return min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])


def hint_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNets' hint loss: mean squared error between the regressed student feature and the hint.

    Maps of different spatial sizes are average-pooled to the smaller size first.
    """
    size = smaller_size(student_feat, teacher_feat)
    return F.mse_loss(pool_to(student_feat.float(), size), pool_to(teacher_feat.float(), size))


def attention_map(feat: Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> Tensor:
    """Spatial attention of Zagoruyko & Komodakis (2017): channel mean of |f|^p, flattened, L2-normalised.

    `size` average-pools the (un-normalised) map first, so maps from stages of different
    resolutions compare like with like: pooling the energy keeps where it is, at a coarser grid.
    Returns (N, H*W).
    """
    energy = feat.float().abs().pow(p).mean(dim=1, keepdim=True)
    if size is not None:
        energy = pool_to(energy, size)
    return F.normalize(energy.flatten(1), dim=1)


def at_loss(student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0) -> Tensor:
    """Attention-transfer distance of one stage pair: mean over batch and positions of the squared
    difference of the normalised attention maps (the authors' code's form of the paper's
    ||Q_s/|Q_s| - Q_t/|Q_t|||_2^2, divided by N*H*W)."""
    size = smaller_size(student_feat, teacher_feat)
    diff = attention_map(student_feat, p, size) - attention_map(teacher_feat, p, size)
    return diff.pow(2).mean()


# --- Relation-based: RKD and similarity-preserving KD ---------------------------------------------


@_full_precision
def pairwise_distances(emb: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance matrix (N, N) of the rows of `emb`, with an exact zero diagonal.

    The clamp keeps sqrt's gradient finite where two rows coincide (its gradient there is zero).
    """
    e = emb.float().flatten(1)
    sq = e.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * e @ e.t()).clamp(min=eps)
    off_diag = 1.0 - torch.eye(len(e), device=e.device, dtype=e.dtype)
    return d2.sqrt() * off_diag


def rkd_distance_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD distance-wise loss (Park et al. 2019): Huber (smooth L1, delta 1) between the two
    models' pairwise distances, each divided by its mean distance; averaged over the N*(N-1)
    ordered pairs of distinct examples. Embedding sizes may differ: only distances are compared."""
    n = len(student_emb)
    pairs = n * (n - 1)
    d_s, d_t = pairwise_distances(student_emb), pairwise_distances(teacher_emb)
    # The diagonal is exactly zero in both, so sums over the full matrix are sums over pairs.
    d_s = d_s / (d_s.sum() / pairs)
    d_t = d_t / (d_t.sum() / pairs)
    return F.smooth_l1_loss(d_s, d_t, reduction="sum") / pairs


@_full_precision
def triplet_cosines(emb: Tensor) -> Tensor:
    """cos of the angle at vertex j between x_i - x_j and x_k - x_j, as an (N, N, N) tensor [j, i, k].

    Entries with i == j or k == j are exactly 0 (the zero vector normalises to zero).
    """
    e = emb.float().flatten(1)
    unit = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # unit[j, i] = (x_i - x_j) / |.|
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_angle_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD angle-wise loss: Huber between the two models' triplet cosines, averaged over the
    N*(N-1)^2 triplets whose vertex differs from both ends (the others are zero in both)."""
    n = len(student_emb)
    triplets = n * (n - 1) ** 2
    huber = F.smooth_l1_loss(triplet_cosines(student_emb), triplet_cosines(teacher_emb), reduction="sum")
    return huber / triplets


@_full_precision
def similarity_matrix(feat: Tensor) -> Tensor:
    """Similarity-preserving KD's batch similarity: G = F F^T with each row L2-normalised, (N, N)."""
    f = feat.float().flatten(1)
    return F.normalize(f @ f.t(), dim=1)


def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Similarity-preserving loss of one stage pair (Tung & Mori 2019): ||G_t - G_s||_F^2 / N^2."""
    n = len(student_feat)
    return (similarity_matrix(teacher_feat) - similarity_matrix(student_feat)).pow(2).sum() / (n * n)


# --- Online and self distillation ------------------------------------------------------------------


def mutual_kl(logits: list[Tensor], temperature: float = 1.0) -> list[Tensor]:
    """Deep mutual learning's mimicry terms: for each network i, the mean over the other networks j
    of T^2 * KL(p_j || p_i). Each p_j is a constant target (detached) in network i's term, so each
    network is pulled toward the others and none is pulled toward itself through their terms."""
    k = len(logits)
    if k < 2:
        raise ValueError("mutual_kl needs at least two networks")
    return [sum(soft_kl(logits[i], logits[j].detach(), temperature) for j in range(k) if j != i) / (k - 1)
            for i in range(k)]
