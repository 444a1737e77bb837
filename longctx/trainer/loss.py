"""The training loss and why context parallelism does not change it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of this rank's tokens (targets `-100` ignored)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def cp_normalized_loss(loss_sum: torch.Tensor, labels: torch.Tensor, mesh) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to call backward on, valid targets of the whole cp group) for one micro-batch.

    Why cp=N trains exactly like cp=1. With cp=1 a row's loss is
    ``sum_t loss_t / n_valid``. With cp=N the row's tokens are spread over the N ranks of a
    cp group, which hold the same parameters. Each rank divides *its* token losses by the
    valid targets of the *whole group* (one all-reduce of a count), so the N local losses add
    up to the cp=1 loss and their gradients add up to the cp=1 gradient. The engine then
    *averages* gradients over all dp x cp ranks (`mesh.grad_group`): that is
    ``(1/dp) sum_dp (1/cp) sum_cp``, one factor 1/cp too many for the cp sum. Multiplying
    each rank's loss by `cp` (`mesh.loss_scale_for_grad_reduction`) cancels it, leaving the
    mean over data-parallel row groups of the summed cp=1 gradient.
    """
    n_valid = mesh.all_reduce([(labels != IGNORE_INDEX).sum().item()], group="cp")[0]
    return (loss_sum / max(float(n_valid), 1.0)) * mesh.loss_scale_for_grad_reduction, n_valid


__all__ = ["token_loss_sum", "cp_normalized_loss", "IGNORE_INDEX"]
