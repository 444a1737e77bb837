"""Activation checkpointing changes memory, not numbers: identical loss and gradients."""

from __future__ import annotations

import copy

import torch

from longctx.config import load_config
from longctx.models.llama import Transformer
from longctx.trainer.activation_checkpoint import apply_activation_checkpointing


def _loss_and_grads(model, ids, pos, docs):
    model.zero_grad()
    logits = model(ids, pos, docs)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1)[:-1], ids.flatten()[1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpointed_model_matches_plain():
    cfg = load_config(None, ["model.n_layers=3", "model.attention_backend=torch"])
    torch.manual_seed(0)
    plain = Transformer(cfg.model, 259)
    wrapped = copy.deepcopy(plain)
    assert apply_activation_checkpointing(wrapped) == 3
    assert plain.state_dict().keys() == wrapped.state_dict().keys()  # checkpoints stay compatible
    ids = torch.randint(0, 256, (2, 64))
    pos = torch.arange(64).repeat(2, 1)
    docs = (torch.arange(64) >= 40).long().repeat(2, 1)
    loss_a, grads_a = _loss_and_grads(plain, ids, pos, docs)
    loss_b, grads_b = _loss_and_grads(wrapped, ids, pos, docs)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-9)
    with torch.no_grad():  # evaluation skips the wrapper
        torch.testing.assert_close(wrapped(ids, pos, docs), plain(ids, pos, docs), rtol=0, atol=0)
