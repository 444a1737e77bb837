"""The training loop that runs on every worker, whoever launched it (Ray, one process, a test).

One step: each micro-batch row is padded to a multiple of 2*cp, sharded along
the sequence by the CP strategy's layout, run through the model (whose
attention is the strategy's), and its token losses are summed and divided by
the valid targets of the whole cp group (ARCHITECTURE.md, "Data flow").
"""

from __future__ import annotations

import json
import os
import random
import resource
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx.config import Config, ConfigError
from longctx.models.estimate import causal_pairs_per_token, flops_per_token, peak_flops
from longctx.models.llama import Transformer, TransformerBlock
from longctx.parallel import build_mesh, build_strategy
from longctx.parallel.auto import apply_auto
from longctx.trainer import checkpoint as ckpt
from longctx.trainer.activation_checkpoint import apply_activation_checkpointing
from longctx.trainer.distributed import pick_device
from longctx.trainer.engine import build_engine
from longctx.trainer.metrics import RunLogger
from longctx.trainer.packing import PackedRows, eval_rows, pad_rows
from longctx.trainer.tokenizer import build_tokenizer


@dataclass
class RunContext:
    """What the launcher resolved before any worker started."""

    run_dir: str
    checkpoint_dir: str
    launch_id: str
    mlflow_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    resume_from: Optional[str] = None  # a checkpoint folder chosen by the launcher, if any
    interactive: bool = False  # the launching terminal is a TTY: draw a progress bar


def resolve_vocab_size(cfg: Config, tokenizer) -> int:
    """model.vocab_size, or the tokenizer's when it is 0; never smaller than the tokenizer's."""
    size = cfg.model.vocab_size or tokenizer.vocab_size
    if size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
                          f"data.tokenizer={cfg.data.tokenizer!r} ({tokenizer.vocab_size} tokens)")
    return size


def build_model(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """The Llama model, or a hybrid with gated memory layers when `model.memory.type` is set."""
    if cfg.model.memory.type == "none" and not cfg.model.memory.swa_layers:
        return Transformer(cfg.model, vocab_size)
    from longctx.models.memory.hybrid import build_hybrid_model

    return build_hybrid_model(cfg.model, vocab_size, cfg.model.memory)


def build_trainer_strategy(cfg: Config, mesh):
    """The attention strategy for this worker and the group it spans.

    Normally the cp group. CAD with `parallel.cad_scope=dp` instead balances core
    attention across data-parallel ranks that hold different whole rows (cp=1), so
    it spans the dp group.
    """
    options = {"backend": cfg.model.attention_backend, **cfg.parallel.options}
    group = mesh.cp_group
    if cfg.parallel.strategy == "cad":
        options.setdefault("scope", cfg.parallel.cad_scope)
        if cfg.parallel.cad_scope == "dp":
            group = mesh.dp_group
    return build_strategy(cfg.parallel.strategy, group=group, **options)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Builds everything for one worker and runs steps; small enough to drive from tests."""

    def __init__(self, cfg: Config, ctx: RunContext):
        self.cfg, self.ctx = cfg, ctx
        self.device = pick_device(cfg.train.device)
        self.mesh = build_mesh(cfg.parallel.cp)
        apply_auto(cfg)  # normally already resolved by the launcher; deterministic either way
        self.strategy = build_trainer_strategy(cfg, self.mesh)
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.vocab_size = resolve_vocab_size(cfg, self.tokenizer)

        # Same seed on every rank: identical initial weights without a broadcast.
        seed_everything(cfg.train.seed)
        with torch.device(self.device):
            model = build_model(cfg, self.vocab_size)
        model.set_attention(self._attention)
        if hasattr(model, "set_cp_group"):  # memory layers pass their state over the cp group
            model.set_cp_group(self.mesh.cp_group, self.strategy.layout)
        self.row_multiple = model.seq_multiple(self.mesh.cp_size) if hasattr(model, "seq_multiple") \
            else 2 * self.mesh.cp_size
        if cfg.train.activation_checkpointing:
            # Only plain attention blocks: recomputing a memory block would repeat its
            # rank-to-rank state exchange inside backward and deadlock.
            apply_activation_checkpointing(model, only=TransformerBlock)
        self.model = model
        self.engine = build_engine(cfg, model, self.mesh, self.device)
        self.data = PackedRows(cfg.data, self.tokenizer, seq_len=cfg.data.seq_len,
                               dp_rank=self.mesh.data_rank, dp_size=self.mesh.data_world, split="train")
        # Anything random after init is seeded per data-parallel rank (a cp group shares it).
        seed_everything(cfg.train.seed + 1000 * self.mesh.dp_rank)
        self.step = 0
        self._eval_batches = None
        self._attn_stats: list[dict] = []

    # -- attention hook handed to the model -------------------------------------------------
    def _attention(self, q, k, v, doc_ids):
        out = self.strategy.attention(q, k, v, doc_ids=doc_ids, causal=True)
        # The strategy fills this dict in forward and again in the matching backward;
        # read them all after the step (see `_cp_step_stats`).
        self._attn_stats.append(self.strategy.last_stats)
        return out

    # -- one micro-batch ------------------------------------------------------------------------
    def shard_batch(self, batch: dict) -> dict:
        batch = pad_rows(batch, self.row_multiple, pad_id=self.tokenizer.pad_id)
        return {k: self.strategy.shard(v, dim=1).contiguous().to(self.device) for k, v in batch.items()}

    def _cp_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.mesh.cp_size > 1:
            dist.all_reduce(t, group=self.mesh.cp_group)
        return t

    def forward_loss(self, local: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss for backward, summed token loss of this rank, valid targets in the cp group)."""
        with self.engine.autocast():
            logits = self.engine.module(local["input_ids"], local["position_ids"], local["doc_ids"])
        labels = local["labels"]
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="sum")
        n_valid = self._cp_sum((labels != -100).sum().to(torch.float64))
        loss = loss_sum / n_valid.clamp(min=1).to(loss_sum.dtype)
        return loss, loss_sum.detach(), n_valid

    def forward_backward(self, batch: dict) -> float:
        """One micro-batch; returns the cp-group loss of this row group (the cp=1 loss)."""
        loss, loss_sum, n_valid = self.forward_loss(self.shard_batch(batch))
        self.engine.backward(loss * self.mesh.loss_scale_for_grad_reduction)
        group_loss = self._cp_sum(loss_sum.to(torch.float64)) / n_valid.clamp(min=1)
        return float(group_loss)

    # -- context-parallel accounting -----------------------------------------------------------------
    _SUMMED = ("bytes_sent", "bytes_recv", "attn_flops")

    def _cp_step_stats(self) -> dict:
        """This step's CP traffic and attention-FLOP balance over the strategy's group.

        Bytes and FLOPs are summed over every attention call of the step (all layers,
        micro-batches, recomputation); other numeric stats a strategy reports (e.g.
        CAD's planner time) are averaged over calls.
        """
        calls, self._attn_stats = self._attn_stats, []
        if not calls:
            return {}
        totals = {k: float(sum(c.get(k, 0.0) for c in calls)) for k in self._SUMMED}
        out = {"cp/bytes_sent": totals["bytes_sent"], "cp/bytes_recv": totals["bytes_recv"]}
        extra = sorted({k for c in calls for k, v in c.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in self._SUMMED})
        for key in extra:
            vals = [float(c[key]) for c in calls if key in c]
            out[f"cp/{key}"] = sum(vals) / len(vals)
        group = getattr(self.strategy, "group", None)
        size = getattr(self.strategy, "cp_size", 1)
        if size > 1:
            flops = torch.tensor([totals["attn_flops"]], dtype=torch.float64)
            gathered = [torch.zeros_like(flops) for _ in range(size)]
            dist.all_gather(gathered, flops, group=group)
            per_rank = torch.cat(gathered)
            out["cp/attn_flops_imbalance"] = float(per_rank.max() / per_rank.mean().clamp(min=1e-30))
            sent = torch.tensor([totals["bytes_sent"]], dtype=torch.float64)
            dist.all_reduce(sent, op=dist.ReduceOp.MAX, group=group)
            out["cp/bytes_sent_max"] = float(sent)
        return out

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        self._attn_stats = []
        losses = []
        for _ in range(cfg.train.grad_accum):
            losses.append(self.forward_backward(self.data.next_batch(cfg.train.micro_batch_size)))
        grad_norm = self.engine.step()
        lr_used = self.engine.lr()
        loss = torch.tensor(sum(losses) / len(losses), dtype=torch.float64)
        if self.mesh.dp_size > 1:  # mean over data-parallel groups
            dist.all_reduce(loss, group=self.mesh.dp_group)
            loss /= self.mesh.dp_size
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.step += 1
        tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * self.mesh.dp_size * cfg.data.seq_len
        m = {"train/loss": float(loss), "train/lr": lr_used, "perf/step_time_s": dt,
             "perf/tokens_per_s": tokens / dt, "train/tokens_seen": float(tokens * self.step)}
        if grad_norm is not None:
            m["train/grad_norm"] = grad_norm
        peak = peak_flops(self.device, cfg.train.dtype)
        if peak:
            fpt = flops_per_token(cfg.model, self.vocab_size, cfg.data.seq_len,
                                  causal_pairs_per_token(cfg.data.seq_len))
            m["perf/mfu"] = fpt * tokens / dt / (peak * self.mesh.world_size)
        if self.device.type == "cuda":
            m["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:  # peak resident memory of this process (Linux reports KiB)
            m["perf/peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        m.update(self._cp_step_stats())
        return m

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg = self.cfg
        if self._eval_batches is None:
            self._eval_batches = eval_rows(cfg.data, self.tokenizer, seq_len=cfg.data.seq_len,
                                           dp_rank=self.mesh.data_rank, dp_size=self.mesh.data_world,
                                           num_batches=cfg.train.eval_batches,
                                           batch_size=cfg.train.micro_batch_size)
        self.engine.module.eval()
        # loss sum, targets, correct targets, answer targets, correct answers
        totals = torch.zeros(5, dtype=torch.float64)
        for batch in self._eval_batches:
            local = self.shard_batch(batch)
            with self.engine.autocast():
                logits = self.engine.module(local["input_ids"], local["position_ids"], local["doc_ids"]).float()
            labels = local["labels"]
            valid = labels != -100
            totals[0] += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                         reduction="sum").double().cpu()
            correct = (logits.argmax(-1) == labels) & valid
            answer = local["answer_mask"].bool() & valid
            totals[1] += valid.sum().item()
            totals[2] += correct.sum().item()
            totals[3] += answer.sum().item()
            totals[4] += (correct & answer).sum().item()
        self.engine.module.train()
        self._attn_stats = []  # evaluation traffic is not a training step's
        if self.mesh.world_size > 1:  # every rank holds distinct tokens of distinct rows
            dist.all_reduce(totals)
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        out = {"eval/loss": loss, "eval/perplexity": float(torch.exp(torch.tensor(min(loss, 50.0)))),
               "eval/token_accuracy": (totals[2] / totals[1].clamp(min=1)).item()}
        if totals[3] > 0:
            out["eval/answer_accuracy"] = (totals[4] / totals[3]).item()
        return out

    # -- checkpoints -------------------------------------------------------------------------------------
    def _gather_data_states(self) -> dict:
        state = self.data.state_dict()
        if self.mesh.world_size == 1:
            return {"0": state}
        gathered = [None] * self.mesh.world_size
        dist.all_gather_object(gathered, (self.mesh.dp_rank, state))
        return {str(r): s for r, s in gathered}

    def save(self) -> str:
        meta = {"launch_id": self.ctx.launch_id, "mlflow_run_id": self.ctx.mlflow_run_id,
                "dp_size": self.mesh.dp_size, "cp_size": self.mesh.cp_size,
                "data": self._gather_data_states()}
        return ckpt.save_checkpoint(self.ctx.checkpoint_dir, self.step, self.engine, meta,
                                    rank=self.mesh.rank, keep=self.cfg.checkpoint.keep)

    def load(self, path: str) -> dict:
        meta = ckpt.load_checkpoint(path, self.engine, rank=self.mesh.rank)
        states = meta["data"]
        if str(self.mesh.dp_rank) not in states or meta.get("dp_size") != self.mesh.dp_size:
            raise ValueError(f"checkpoint '{path}' was written with dp={meta.get('dp_size')}; this run has "
                             f"dp={self.mesh.dp_size}. Resume with the same ray.num_workers / parallel.cp.")
        self.data.load_state_dict(states[str(self.mesh.dp_rank)])
        self.step = int(meta["step"])
        return meta


def resolve_resume(cfg: Config, ctx: RunContext) -> Optional[str]:
    """Which checkpoint this worker starts from.

    A checkpoint written by this same launch always wins: that is a restart after
    a worker failure (Ray calls the loop again). Otherwise: `auto` = the newest in
    the run's checkpoint folder, `none` = fresh, a path = that checkpoint.
    """
    found = ckpt.list_checkpoints(ctx.checkpoint_dir)
    for path in reversed(found):
        if ckpt.read_meta(path).get("launch_id") == ctx.launch_id:
            return path
    if ctx.resume_from:
        return ctx.resume_from
    if cfg.checkpoint.resume == "auto":
        return found[-1] if found else None
    return None


def _write_pid_file(run_dir: str, rank: int) -> None:
    # Operators (and the failure test) find worker processes here.
    folder = os.path.join(run_dir, "workers")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))


def train_worker(cfg: Config, ctx: RunContext) -> dict:
    """Entry point of every worker. Returns a summary (meaningful on rank 0)."""
    trainer = Trainer(cfg, ctx)
    mesh = trainer.mesh
    _write_pid_file(ctx.run_dir, mesh.rank)
    start = resolve_resume(cfg, ctx)
    if start is not None:
        trainer.load(start)
    resumed = start is not None
    start_step = trainer.step  # the start checkpoint may be rotated away while we train
    stop = min(cfg.train.steps, cfg.train.stop_at_step or cfg.train.steps)
    log = RunLogger(enabled=mesh.is_logging_rank, run_id=ctx.mlflow_run_id, tracking_uri=ctx.tracking_uri,
                    total_steps=cfg.train.steps, start_step=trainer.step, log_every=cfg.logging.log_every,
                    progress_bar=cfg.logging.progress_bar and ctx.interactive,
                    system_metrics=cfg.logging.system_metrics and ctx.mlflow_run_id is not None,
                    resumed=resumed)
    if resumed:
        log.info(f"resumed from {start} at step {trainer.step}")
    log.info(f"world={mesh.world_size} dp={mesh.dp_size} cp={mesh.cp_size} strategy={cfg.parallel.strategy} "
             f"engine={cfg.train.engine} device={trainer.device} params={trainer.model.num_params():,}")
    last_eval, history = {}, []
    every = cfg.checkpoint.every
    try:
        while trainer.step < stop:
            m = trainer.train_step()
            history.append((trainer.step, m["train/loss"]))
            log.step(trainer.step, m)
            if cfg.train.eval_every and trainer.step % cfg.train.eval_every == 0 and trainer.step < stop:
                last_eval = trainer.evaluate()
                log.log(trainer.step, last_eval)
                log.info(f"eval @ {trainer.step}: " + " ".join(f"{k[5:]} {v:.4f}" for k, v in last_eval.items()))
            if every and trainer.step % every == 0 and trainer.step < stop:
                trainer.save()
        if trainer.step == stop and trainer.step > start_step:  # not when resuming an already finished run
            last_eval = trainer.evaluate()
            log.log(trainer.step, last_eval)
            log.info(f"eval @ {trainer.step}: " + " ".join(f"{k[5:]} {v:.4f}" for k, v in last_eval.items()))
            path = trainer.save()
            log.info(f"checkpoint {path}")
    finally:
        log.close()
    summary = {"step": trainer.step, "finished": trainer.step >= cfg.train.steps, "eval": last_eval,
               "losses": history}
    if mesh.is_logging_rank:
        with open(os.path.join(ctx.run_dir, "eval_results.json"), "w") as f:
            json.dump({"step": trainer.step, **last_eval}, f, indent=2)
    return summary
