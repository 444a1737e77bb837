"""RoPE frequencies, plain or scaled for context extension: `linear`, `yarn`, `llama3`.

`rope_frequencies(cfg)` returns the per-pair inverse frequencies `inv_freq [head_dim/2]`
and the factor that multiplies cos and sin (YaRN's attention factor; 1 otherwise). The
numerics are transformers' `ROPE_INIT_FUNCTIONS` step for step, in fp32 torch ops on
the CPU, because a checkpoint's logits must match it: an inv_freq off by one fp32 ulp is
an angle off by 1e-3 rad at position 32k.

- default: `inv_freq_i = theta^(-2i/d)`.
- linear (position interpolation): `inv_freq / factor`.
- yarn: dimensions that rotate more than `beta_fast` times over the original context keep
  their frequency (extrapolate), those that rotate fewer than `beta_slow` times are
  interpolated (`/ factor`), a linear ramp in between; cos/sin scaled by
  `attention_factor` (default `0.1 ln(factor) + 1`), which sharpens attention.
- llama3: wavelengths longer than `original / low_freq_factor` are divided by `factor`,
  shorter than `original / high_freq_factor` kept, a smooth blend in between.
"""

from __future__ import annotations

import math

import torch

from longctx.config import ModelConfig, head_dim

ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def original_context(m: ModelConfig) -> int:
    """The pretraining context yarn and llama3 scale from."""
    return m.rope_scaling.original_max_position_embeddings or m.max_position_embeddings


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _yarn(m: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    r, base = m.rope_scaling, m.rope_theta
    factor, original = r.factor, original_context(m)

    def mscale(scale: float, coeff: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * coeff * math.log(scale) + 1.0

    attention_factor = r.attention_factor
    if attention_factor is None:
        attention_factor = (float(mscale(factor, r.mscale) / mscale(factor, r.mscale_all_dim))
                            if r.mscale and r.mscale_all_dim else mscale(factor))

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singular ramp
    # (integers converted, not a float constructor: DeepSpeed's zero.Init recasts those)
    ramp = torch.clamp((torch.arange(dim // 2).to(torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 = extrapolate (high frequency), 0 = interpolate
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def _llama3(m: ModelConfig, dim: int) -> torch.Tensor:
    r = m.rope_scaling
    inv_freq = _default_inv_freq(m.rope_theta, dim)
    original = original_context(m)
    low_freq_wavelen = original / r.low_freq_factor
    high_freq_wavelen = original / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / r.factor, inv_freq)
    smooth = (original / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_frequencies(m: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq `[head_dim/2]` fp32 on the CPU, cos/sin scale) for `m.rope_scaling`."""
    dim, kind = head_dim(m), m.rope_scaling.rope_type
    with torch.device("cpu"):  # even inside a meta-device build: these are numbers, not parameters
        if kind == "default":
            return _default_inv_freq(m.rope_theta, dim), 1.0
        if kind == "linear":
            return _default_inv_freq(m.rope_theta, dim) / m.rope_scaling.factor, 1.0
        if kind == "yarn":
            return _yarn(m, dim)
        if kind == "llama3":
            return _llama3(m, dim), 1.0
    raise ValueError(f"model.rope_scaling.rope_type={kind!r}: expected one of {', '.join(ROPE_TYPES)}")


def check_rope_scaling(m: ModelConfig) -> None:
    """ValueError naming the key when `m.rope_scaling` cannot be computed."""
    r = m.rope_scaling
    if r.rope_type == "default":
        return
    if r.factor <= 0:
        raise ValueError(f"model.rope_scaling.factor={r.factor} must be positive")
    if r.rope_type in ("yarn", "llama3") and original_context(m) <= 0:
        raise ValueError(f"model.rope_scaling.rope_type={r.rope_type} needs the pretraining context: set "
                         f"model.rope_scaling.original_max_position_embeddings (or model.max_position_embeddings)")
    if r.rope_type == "llama3" and not 0 < r.low_freq_factor < r.high_freq_factor:
        raise ValueError(f"model.rope_scaling: llama3 needs 0 < low_freq_factor < high_freq_factor "
                         f"(got {r.low_freq_factor}, {r.high_freq_factor})")
    if r.rope_type == "yarn" and not r.beta_fast > r.beta_slow > 0:
        raise ValueError(f"model.rope_scaling: yarn needs beta_fast > beta_slow > 0 (got {r.beta_fast}, {r.beta_slow})")


__all__ = ["ROPE_TYPES", "rope_frequencies", "check_rope_scaling", "original_context"]
