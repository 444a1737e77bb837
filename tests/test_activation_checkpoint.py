"""Activation checkpointing changes memory, not numbers: identical loss and gradients."""

from __future__ import annotations

import copy

import pytest
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


class _CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """`save_on_cpu` that records the device of what it moved (CPU-only machines see no move)."""

    packed: list = []

    def __init__(self, pin_memory=False, device_type="cuda"):
        super().__init__(pin_memory, device_type)
        pack = self.pack_hook

        def counting(t):
            out = pack(t)
            _CountingSaveOnCpu.packed.append(out[1].device.type)
            return out

        self.pack_hook = counting


@pytest.mark.parametrize("offload", [False, True], ids=["checkpoint", "offload"])
def test_checkpointed_model_matches_plain(offload, monkeypatch):
    cfg = load_config(None, ["model.n_layers=3", "model.attention_backend=torch"])
    torch.manual_seed(0)
    plain = Transformer(cfg.model, 259)
    wrapped = copy.deepcopy(plain)
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", _CountingSaveOnCpu)
    _CountingSaveOnCpu.packed = []
    assert apply_activation_checkpointing(wrapped, offload=offload) == 3
    assert plain.state_dict().keys() == wrapped.state_dict().keys()  # checkpoints stay compatible
    ids = torch.randint(0, 256, (2, 64))
    pos = torch.arange(64).repeat(2, 1)
    docs = (torch.arange(64) >= 40).long().repeat(2, 1)
    loss_a, grads_a = _loss_and_grads(plain, ids, pos, docs)
    loss_b, grads_b = _loss_and_grads(wrapped, ids, pos, docs)
    # offload: each block's kept input (and RoPE tables) went through the CPU hook
    assert (len(_CountingSaveOnCpu.packed) >= 3 and set(_CountingSaveOnCpu.packed) == {"cpu"}) if offload \
        else not _CountingSaveOnCpu.packed
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-9)
    with torch.no_grad():  # evaluation skips the wrapper
        torch.testing.assert_close(wrapped(ids, pos, docs), plain(ids, pos, docs), rtol=0, atol=0)
