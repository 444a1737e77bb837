"""The training loss and why context parallelism does not change it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of this rank's tokens (targets `-100` ignored)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 cross-entropy of each token, `[B, S]` (0 where the target is `-100`): what
    `token_loss_sum` sums, kept per token (perplexity by position)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(labels.shape)


def cp_normalized_loss(loss_sum: torch.Tensor, n_valid: float, mesh) -> torch.Tensor:
    """The loss to call backward on for one micro-batch: this rank's summed token losses
    over `n_valid`, the valid targets of the *whole row* (count them on the full row before
    it is sharded: every rank of a cp group holds the same row, so no collective is needed).

    Why cp=N trains exactly like cp=1. With cp=1 a row's loss is
    ``sum_t loss_t / n_valid``. With cp=N the row's tokens are spread over the N ranks of a
    cp group, which hold the same parameters. Each rank divides *its* token losses by the
    valid targets of the whole row, so the N local losses add up to the cp=1 loss and their
    gradients add up to the cp=1 gradient. The engine then *averages* gradients over all
    dp x cp ranks (`mesh.grad_group`): that is ``(1/dp) sum_dp (1/cp) sum_cp``, one factor
    1/cp too many for the cp sum. Multiplying each rank's loss by `cp`
    (`mesh.loss_scale_for_grad_reduction`) cancels it, leaving the mean over data-parallel
    row groups of the summed cp=1 gradient.
    """
    return (loss_sum / max(float(n_valid), 1.0)) * mesh.loss_scale_for_grad_reduction


def count_targets(labels: torch.Tensor) -> int:
    """Valid (not ignored) targets in `labels`."""
    return int((labels != IGNORE_INDEX).sum())


__all__ = ["token_loss_sum", "token_losses", "cp_normalized_loss", "count_targets", "IGNORE_INDEX"]
