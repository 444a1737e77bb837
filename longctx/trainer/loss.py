"""The training loss and why context parallelism does not change it."""

from __future__ import annotations

import torch

from longctx.kernels.linear_cross_entropy import IGNORE_INDEX


def configure_loss(model, train_cfg) -> None:
    """Hand the lm head the configured loss (`train.loss`, `train.loss_chunk_size`): the model
    then returns per-token losses and predictions when called with `labels`, computed a chunk
    of tokens at a time (`longctx.kernels.linear_cross_entropy`) or from the full logits."""
    model.output.chunk_size = 0 if train_cfg.loss == "full" else train_cfg.loss_chunk_size


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


__all__ = ["configure_loss", "cp_normalized_loss", "count_targets", "IGNORE_INDEX"]
