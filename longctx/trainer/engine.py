"""Engines: DeepSpeed ZeRO (stage 0-3) or torch DDP, behind one small interface.

Both reduce gradients over the whole dp x cp world (`mesh.grad_group`) and
average them. Ranks of one cp group hold different tokens of the same row, so
their gradients must be *summed*: `longctx.trainer.loss.cp_normalized_loss` scales
each rank's loss so that the engine's average over dp*cp ranks is sum-over-cp,
mean-over-dp.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.distributed as dist

from longctx.config import Config
from longctx.models.hf import full_shape


def lr_lambda(cfg: Config):
    """Multiplier of optim.lr at a step: linear warmup, then cosine, WSD or constant."""
    o, total = cfg.optim, cfg.train.steps
    warmup = min(o.warmup_steps, max(total - 1, 0))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "wsd":  # warmup, stable, then linear decay over the last decay_fraction
            decay_steps = max(1, int(round(total * o.decay_fraction)))
            decay_start = total - decay_steps
            if step < decay_start:
                return 1.0
            frac = min(1.0, (step - decay_start + 1) / decay_steps)
            return 1.0 - (1.0 - o.min_lr_ratio) * frac
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return fn


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (1-D tensors), as usual for LMs."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(full_shape(p)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: Config, model: torch.nn.Module):
    o = cfg.optim
    # The fused kernel (CPU and CUDA) updates each tensor in one pass, without the
    # temporaries of the foreach path (a model-sized copy at its peak, or, under ZeRO-3,
    # a copy of the rank's whole flat partition).
    device = next(model.parameters()).device.type
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            fused=device in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    return opt, sched


def bf16_autocast(cfg: Config, device: torch.device):
    """Autocast to bf16 when `train.dtype=bf16` (fp32 weights, bf16 compute), else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bf16")


class Engine:
    """What the training loop needs from an engine."""

    module: torch.nn.Module  # call this for the forward pass

    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> Optional[float]: ...  # optimizer step at the accumulation boundary; grad norm
    skipped: bool = False  # the last step() left the weights alone: its gradients were not finite
    def lr(self) -> float: ...
    def save(self, folder: str) -> None: ...  # every rank calls; writes its part
    def load(self, folder: str) -> None: ...
    def full_grads(self) -> dict[str, torch.Tensor]: ...  # after backward, before step (tests)
    def autocast(self): ...


class DDPEngine(Engine):
    def __init__(self, cfg: Config, model: torch.nn.Module, mesh, device: torch.device):
        self.cfg, self.mesh, self.device = cfg, mesh, device
        self.raw = model
        if mesh.world_size > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                process_group=mesh.grad_group, broadcast_buffers=False)
        else:
            self.module = model
        self.optimizer, self.scheduler = build_optimizer(cfg, model)
        self.micro = 0

    def autocast(self):
        return bf16_autocast(self.cfg, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        self.micro += 1
        boundary = self.micro % self.cfg.train.grad_accum == 0
        scaled = loss / self.cfg.train.grad_accum
        if isinstance(self.module, torch.nn.parallel.DistributedDataParallel) and not boundary:
            with self.module.no_sync():  # accumulate locally, reduce once per step
                scaled.backward()
        else:
            scaled.backward()

    def step(self) -> Optional[float]:
        if self.micro % self.cfg.train.grad_accum:
            return None
        clip = self.cfg.optim.grad_clip
        norm = float(torch.nn.utils.clip_grad_norm_(self.raw.parameters(), clip if clip > 0 else float("inf")))
        # As DeepSpeed does: a step whose gradients are not finite changes neither the weights
        # nor the schedule (an AdamW step on NaN would poison every weight).
        self.skipped = not math.isfinite(norm)
        if not self.skipped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in self.raw.named_parameters() if p.grad is not None}

    def save(self, folder: str) -> None:
        # DDP replicas are identical: rank 0 writes the state.
        if self.mesh.rank == 0:
            torch.save({"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "micro": self.micro},
                       os.path.join(folder, "ddp_state.pt"))

    def load(self, folder: str) -> None:
        state = torch.load(os.path.join(folder, "ddp_state.pt"), map_location=self.device, weights_only=True)
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = state["micro"]


def deepspeed_config(cfg: Config) -> dict:
    """The generated DeepSpeed config; `deepspeed.config` from YAML is merged over it."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else 0.0,
        "zero_optimization": zero_buckets(cfg),
        "bf16": {"enabled": cfg.train.dtype == "bf16"},
        # We hand DeepSpeed a torch AdamW: it runs on every device and keeps CPU
        # runs free of DeepSpeed's JIT-compiled optimizer ops.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, cfg.deepspeed.config)


def zero_buckets(cfg: Config) -> dict:
    """`zero_optimization` with buckets sized by the model, not DeepSpeed's defaults (5e8
    elements: a gradient bucket as large as a 100M-parameter model on every rank): the
    reduce bucket and ZeRO-3's prefetch bucket hold about dim^2 elements, and parameters
    under 10 * dim elements (norms, biases) stay whole (the sizes Hugging Face's DeepSpeed
    integration derives from `hidden_size`).

    ZeRO-3 also keeps a gathered parameter whole until it is used again if that reuse is
    within `stage3_max_reuse_distance` elements of parameters, and gathers ahead up to
    `stage3_max_live_parameters`; DeepSpeed's 1e9 for both keeps a whole model of up to
    1e9 parameters gathered from the forward to the backward, from the second step on
    (its trace of the module order is complete after the first). Here a parameter is kept
    only until its block's own recompute and backward (one block), and at most three
    blocks are live. `deepspeed.config` may override each."""
    dim = cfg.model.dim
    zero = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage >= 1:
        zero.update(reduce_bucket_size=dim * dim, allgather_bucket_size=max(dim * dim, 2**22))
    if cfg.deepspeed.zero_stage == 3:
        from longctx.models.estimate import largest_block_params

        block = largest_block_params(cfg.model)
        zero.update(stage3_prefetch_bucket_size=int(0.9 * dim * dim), stage3_param_persistence_threshold=10 * dim,
                    stage3_max_reuse_distance=block, stage3_max_live_parameters=3 * block)
    return zero


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _init_deepspeed_comm(device: torch.device) -> None:
    import importlib

    import deepspeed

    if device.type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce used only by
        # its inference path (about 30 s on a fresh machine); training uses gloo.
        # (`import deepspeed.comm.torch as m` would bind PyTorch: deepspeed.comm
        # re-exports `torch`, so fetch the module itself.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else "gloo",
                               auto_mpi_discovery=False)


def _start_deepspeed(device: torch.device):
    """deepspeed, imported for `device` with its communication up (also in a single process)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not dist.is_initialized():  # a single process: DeepSpeed still wants a process group
        from longctx.trainer.distributed import init_single_process_group
        init_single_process_group()
    _init_deepspeed_comm(device)
    return deepspeed


def partitions_on_build(cfg: Config, for_training: bool) -> bool:
    """ZeRO-3 training: parameters are partitioned as they are created (`zero3_build`) and
    then initialised or filled from the checkpoint's files a block or a tensor at a time
    (`zero3_gather`), never whole on every rank."""
    return for_training and cfg.train.engine == "deepspeed" and cfg.deepspeed.zero_stage == 3


def zero3_build(cfg: Config, device: torch.device):
    """Context manager: modules built inside have their parameters partitioned over the
    ranks as each is created (`deepspeed.zero.Init` with the run's DeepSpeed config)."""
    deepspeed = _start_deepspeed(device)
    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg))


def release_freed_host_memory() -> None:
    """Hand memory the allocator has freed back to the OS (glibc's `malloc_trim`). A
    partitioned build frees each module's whole tensors as it partitions them; glibc keeps
    most of that in its heap, so without this the process looks as large as the model.

    First a garbage collection: a parameter DeepSpeed converted and the model then dropped
    (a tied lm head's own weight, replaced by the embedding table) refers to itself through
    the methods DeepSpeed attaches, so only the cycle collector frees its partition."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def zero3_gather(params):
    """Context manager: a parameter (or a list of them) whole on every rank; what rank 0
    writes into it is kept (broadcast, then partitioned again on exit)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params if isinstance(params, (list, tuple)) else [params],
                                             modifier_rank=0)


def share_master_partition(zero3_optimizer) -> None:
    """Let ZeRO-3's optimizer update the model's own partition when the two would be copies.

    DeepSpeed keeps a master-weight partition beside the model's partition and skips the
    copy when both have the master dtype on the optimizer's device, but it compares a
    `torch.device` with the device's name (a string), which is never equal (DeepSpeed
    0.19): fp32 training holds its partition twice, 4 bytes a parameter over the ranks
    for nothing. Here each such master partition takes the model partition's storage, the
    state DeepSpeed's own aliasing leaves (its copy back after a step, and a checkpoint
    load, then copy a tensor onto itself). bf16 and offloaded partitions differ in dtype
    or device (and swapped-out ones in shape) and are left alone."""
    for part, master in zip(zero3_optimizer.fp16_partitioned_groups_flat,
                            zero3_optimizer.fp32_partitioned_groups_flat):
        if part is None or (master.dtype, master.device, master.shape) != (part.dtype, part.device, part.shape):
            continue
        master.data = part.data  # the same tensor object: the optimizer's groups and state keep their keys


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: Config, model: torch.nn.Module, mesh, device: torch.device):
        deepspeed = _start_deepspeed(device)
        self.cfg, self.mesh, self.device = cfg, mesh, device
        optimizer, scheduler = build_optimizer(cfg, model)
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg),
            dist_init_required=False)
        self.raw = model
        if cfg.deepspeed.zero_stage == 3:
            share_master_partition(self.optimizer)

    def autocast(self):
        return torch.autocast(self.device.type, enabled=False)  # DeepSpeed casts the module itself

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed counts micro-steps in `step()`: it must follow every backward. Inside
        # an accumulation window that call only advances the count; the optimizer runs
        # at the boundary, in our `step()`.
        boundary = self.module.is_gradient_accumulation_boundary()
        self.module.backward(loss)  # scales by 1/grad_accum itself
        if not boundary:
            self.module.step()

    def step(self) -> Optional[float]:
        if not self.module.is_gradient_accumulation_boundary():
            return None
        skipped_before = self.module.skipped_steps
        self.module.step()  # DeepSpeed skips a step whose gradients overflow (and counts it)
        self.skipped = self.module.skipped_steps > skipped_before
        norm = self.module.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def lr(self) -> float:
        return self.module.get_lr()[0]

    def full_grads(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for name, p in self.module.module.named_parameters():
            g = safe_get_full_grad(p)
            if g is not None:
                out[name] = g.detach().float().clone()
        return out

    def save(self, folder: str) -> None:
        self.module.save_checkpoint(folder, tag="engine", save_latest=False)

    def load(self, folder: str) -> None:
        path, _ = self.module.load_checkpoint(folder, tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no engine state in checkpoint '{folder}'")


ENGINES = ("deepspeed", "ddp")  # train.engine


def build_engine(cfg: Config, model: torch.nn.Module, mesh, device: torch.device) -> Engine:
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(cfg, model, mesh, device)
    return DDPEngine(cfg, model, mesh, device)
