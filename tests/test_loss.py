"""The chunked lm-head loss (`longctx.kernels.linear_cross_entropy`) is the plain
cross-entropy of the full logits, without them: same per-token losses, predictions and
gradients of the hidden states and the head (fp32, rtol 1e-5), for tied and untied heads,
with ignored targets and chunks that do not divide the tokens. cp=2 against the full
logits: tests/test_cp_equivalence.py::test_chunked_loss_trains_like_full_logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longctx.config import load_config
from longctx.kernels.linear_cross_entropy import default_chunk_size, linear_cross_entropy
from longctx.models.llama import Transformer

RTOL = 1e-5


def _inputs(n=50, d=16, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float32, requires_grad=True)
    w = (torch.randn(vocab, d, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = -100  # ignored targets
    return h, w, labels


@pytest.mark.parametrize("chunk", [1, 8, 13, 50, 1000])
def test_matches_plain_cross_entropy(chunk):
    h, w, labels = _inputs()
    logits = h @ w.T
    want = F.cross_entropy(logits, labels, reduction="none")
    g_out = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))  # per-token weights
    dh_want, dw_want = torch.autograd.grad((want * g_out).sum(), (h, w))

    losses, preds = linear_cross_entropy(h, w, labels, chunk_size=chunk)
    dh, dw = torch.autograd.grad((losses * g_out).sum(), (h, w))
    torch.testing.assert_close(losses, want, rtol=RTOL, atol=1e-6)
    assert torch.equal(losses[labels == -100], torch.zeros_like(losses[labels == -100]))
    assert torch.equal(preds, logits.argmax(-1))
    # absolute floor 1e-6 x the tensor's largest magnitude, as the CP tests: an element near 0
    # sums many chunks' terms, so it carries that much rounding in any summation order
    torch.testing.assert_close(dh, dh_want, rtol=RTOL, atol=1e-6 * float(dh_want.abs().max()))
    torch.testing.assert_close(dw, dw_want, rtol=RTOL, atol=1e-6 * float(dw_want.abs().max()))


def test_shapes_and_errors():
    h, w, labels = _inputs()
    losses, preds = linear_cross_entropy(h.view(5, 10, 16), w, labels.view(5, 10), chunk_size=4)
    assert losses.shape == preds.shape == (5, 10) and losses.dtype == torch.float32
    with pytest.raises(ValueError, match="labels shape"):
        linear_cross_entropy(h, w, labels[:-1])
    with pytest.raises(ValueError, match=r"weight must be \[vocab, 16\]"):
        linear_cross_entropy(h, w.T, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, labels, chunk_size=0)
    assert default_chunk_size(128256) == 261  # 261 x 128256 fp32 logits <= 128 MiB
    assert default_chunk_size(259) * 259 * 4 <= 128 * 2**20 < (default_chunk_size(259) + 1) * 259 * 4


def test_bf16_autocast_follows_the_linear():
    """Under autocast the head's matmuls run in bf16 like `nn.Linear`'s; the softmax is fp32."""
    h, w, labels = _inputs(n=64, d=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy((h @ w.T).float(), labels, reduction="none")
        losses, _ = linear_cross_entropy(h, w, labels, chunk_size=16)
    torch.testing.assert_close(losses, want, rtol=2e-2, atol=2e-2)
    dh, dw = torch.autograd.grad(losses.sum(), (h, w))
    assert dh.dtype == h.dtype and dw.dtype == w.dtype and torch.isfinite(dw).all()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_model_loss_and_gradients_match_full_logits(tied):
    cfg = load_config(None, ["model.n_layers=2", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.attention_backend=torch", f"model.tie_embeddings={str(tied).lower()}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model, 259)
    ids = torch.randint(0, 256, (2, 40))
    pos = torch.arange(40).repeat(2, 1)
    docs = (torch.arange(40) >= 25).long().repeat(2, 1)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, 24] = labels[:, -1] = -100  # document boundary and row end

    def run(chunk):
        model.zero_grad()
        model.output.chunk_size = chunk
        losses, preds = model(ids, pos, docs, labels=labels)
        losses.sum().backward()
        return losses.detach(), preds, {n: p.grad.clone() for n, p in model.named_parameters()}

    full = run(0)  # the plain reference: logits, then F.cross_entropy
    with torch.no_grad():
        assert torch.equal(full[1], model(ids, pos, docs).argmax(-1))
    for chunk in (7, None):
        losses, preds, grads = run(chunk)
        torch.testing.assert_close(losses, full[0], rtol=RTOL, atol=1e-6)
        assert torch.equal(preds, full[1])
        assert grads.keys() == full[2].keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, full[2][name], rtol=RTOL, atol=1e-6 * float(full[2][name].abs().max()),
                                       msg=lambda m: f"gradient of {name}: {m}")
