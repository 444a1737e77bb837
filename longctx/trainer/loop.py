"""The training loop that runs on every worker, whoever launched it (Ray, one process, a test).

One step: each micro-batch row is padded to a multiple of 2*cp, sharded along
the sequence by the CP strategy's layout, run through the model (whose
attention is the strategy's), and its token losses are summed and divided by
the valid targets of the whole cp group (ARCHITECTURE.md, "Data flow").
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import time
from dataclasses import dataclass
from typing import Optional

import torch

from longctx.config import Config, ConfigError
from longctx.errors import RunError
from longctx.models.estimate import count_params, flops_per_token, peak_flops
from longctx.models.hf import build_model, load_weights
from longctx.models.llama import Transformer
from longctx.parallel import build_mesh
from longctx.parallel.parallelize import parallelize
from longctx.parallel.stats import StrategyStats
from longctx.trainer import checkpoint as ckpt
from longctx.trainer.distributed import all_gather_object, broadcast_object, pick_device
from longctx.trainer.engine import (bf16_autocast, partitions_on_build, release_freed_host_memory, zero3_build,
                                    zero3_gather)
from longctx.trainer.long_eval import (min_niah_length, plot_niah, run_niah, summary_metrics, train_end_niah,
                                       trains_passkey)
from longctx.trainer.loss import IGNORE_INDEX, configure_loss, count_targets, cp_normalized_loss
from longctx.trainer.metrics import RunLogger
from longctx.trainer.packing import PackedRows, eval_rows, pad_rows
from longctx.trainer.tokenizer import build_tokenizer

logger = logging.getLogger("longctx")


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Builds everything for one worker and runs steps; small enough to drive from tests.

    `cfg` must be resolved (`longctx.launch.resolve.resolve_config`): no `auto` strategy.
    `for_training=False` builds the model and `parallelize` only (no engine, optimizer or
    training stream): what `longctx eval` needs.
    """

    def __init__(self, cfg: Config, ctx: RunContext, *, for_training: bool = True):
        self.cfg, self.ctx = cfg, ctx
        self.device = pick_device(cfg.train.device)
        self.mesh = build_mesh(cfg.parallel.cp, device=self.device)
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.vocab_size = resolve_vocab_size(cfg, self.tokenizer)

        # Same seed on every rank: identical initial weights without a broadcast.
        seed_everything(cfg.train.seed)
        if partitions_on_build(cfg, for_training):  # ZeRO-3: the model is never whole on a rank
            with zero3_build(cfg, self.device):
                model = Transformer(cfg.model, self.vocab_size)
            if cfg.model.init_from:
                load_weights(model, cfg.model.init_from, gather=zero3_gather, reader=self.mesh.rank == 0)
            else:  # the same weights as an unpartitioned build: one block whole at a time
                model.init_weights(gather=zero3_gather)
            release_freed_host_memory()
        elif cfg.model.init_from:  # pretrained: built uninitialised, then each tensor read in place
            model = build_model(cfg.model, self.vocab_size, self.device)
            load_weights(model, cfg.model.init_from)
        else:
            with torch.device(self.device):
                model = Transformer(cfg.model, self.vocab_size)
        configure_loss(model, cfg.train)
        self.parallel = parallelize(model, self.mesh, cfg, self.device, engine=for_training)
        self.model, self.strategy = model, self.parallel.strategy
        self.row_multiple = self.parallel.row_multiple
        self.engine = self.parallel.engine
        self.module = self.engine.module if self.engine is not None else model
        self.data = None
        if for_training:
            self.data = PackedRows(cfg.data, self.tokenizer, seq_len=cfg.data.seq_len,
                                   dp_rank=self.mesh.dp_rank, dp_size=self.mesh.dp_size, split="train")
        # Anything random after init is seeded per data-parallel rank (a cp group shares it).
        seed_everything(cfg.train.seed + 1000 * self.mesh.dp_rank)
        self.step = 0
        self.skipped_steps = 0  # steps whose update was skipped (non-finite loss or gradients), in total
        self.bad_streak = 0  # ... and in a row, up to this step
        self._eval_batches = None
        self._flops_per_token = None

    def autocast(self):
        """The engine's autocast; without an engine (evaluation), the DDP engine's."""
        return self.engine.autocast() if self.engine is not None else bf16_autocast(self.cfg, self.device)

    # -- one micro-batch ------------------------------------------------------------------------
    def shard_batch(self, batch: dict) -> dict:
        batch = pad_rows(batch, self.row_multiple, pad_id=self.tokenizer.pad_id)
        return {k: self.strategy.shard(v, dim=1).contiguous().to(self.device) for k, v in batch.items()}

    def forward_backward(self, batch: dict) -> float:
        """One micro-batch (a full row per dp rank); returns the cp-group loss of this row
        group (the cp=1 loss)."""
        n_valid = count_targets(batch["labels"])  # the whole row, on the host: no collective
        local = self.shard_batch(batch)
        with self.autocast():  # per-token losses from the lm head, without the full logits
            losses, _ = self.module(local["input_ids"], local["position_ids"], local["doc_ids"],
                                    labels=local["labels"])
        loss_sum = losses.sum()
        self.engine.backward(cp_normalized_loss(loss_sum, n_valid, self.mesh))
        return self.mesh.all_reduce([loss_sum.item()], group="cp")[0] / max(n_valid, 1)

    # -- context-parallel accounting -----------------------------------------------------------------
    def _cp_step_stats(self, calls: list) -> dict:
        """This step's CP traffic and attention-FLOP balance over the strategy's group.

        Bytes and FLOPs are summed over every attention call of the step (all layers,
        micro-batches, recomputation); other numeric stats a strategy reports (e.g.
        CAD's planner time) are averaged over calls (`StrategyStats.total`).
        """
        if not calls:
            return {}
        total = StrategyStats.total(calls)
        out = {"cp/bytes_sent": float(total.bytes_sent), "cp/bytes_recv": float(total.bytes_recv)}
        out.update({f"cp/{k}": float(v) for k, v in sorted(total.extras.items())})
        if self.strategy.cp_size > 1:
            group = self.strategy.group
            per_rank = self.mesh.all_gather(total.attn_flops, group=group)
            out["cp/attn_flops_imbalance"] = max(per_rank) / max(sum(per_rank) / len(per_rank), 1e-30)
            out["cp/bytes_sent_max"] = self.mesh.all_reduce([total.bytes_sent], group=group, op="max")[0]
        return out

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.parallel.attention.drain()  # nothing from before this step
        losses = []
        for _ in range(cfg.train.grad_accum):
            losses.append(self.forward_backward(self.data.next_batch(cfg.train.micro_batch_size)))
        grad_norm = self.engine.step()
        lr_used = self.engine.lr()
        # mean over data-parallel groups
        loss = self.mesh.all_reduce([sum(losses) / len(losses)], group="dp")[0] / self.mesh.dp_size
        # The engine left the weights alone if the gradients were not finite; a non-finite
        # loss (the same on every rank: it was reduced) counts as well.
        # A non-finite norm counts too: DeepSpeed's ZeRO-0 in fp32 steps on it without skipping.
        bad = self.engine.skipped or not math.isfinite(loss) or (grad_norm is not None and
                                                                  not math.isfinite(grad_norm))
        self.bad_streak = self.bad_streak + 1 if bad else 0
        self.skipped_steps += int(bad)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.step += 1
        tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * self.mesh.dp_size * cfg.data.seq_len
        m = {"train/loss": float(loss), "train/lr": lr_used, "perf/step_time_s": dt,
             "perf/tokens_per_s": tokens / dt, "train/tokens_seen": float(tokens * self.step),
             "train/skipped_steps": float(self.skipped_steps)}
        if grad_norm is not None:
            m["train/grad_norm"] = grad_norm
        calls = self.parallel.attention.drain()
        peak = peak_flops(self.device, cfg.train.dtype)
        if peak:
            m.update(self._mfu(calls, tokens, dt, peak))
        if self.device.type == "cuda":
            m["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:  # peak resident memory of this process (Linux reports KiB)
            m["perf/peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        m.update(self._cp_step_stats(calls))
        return m

    def _mfu(self, calls: list, tokens: int, dt: float, peak: float) -> dict:
        """Model FLOPs utilisation from what this step computed: 6 x matmul parameters per
        token, plus the attention FLOPs of the visible query-key pairs the strategy reported
        (`attn_flops`; packed documents and windows see far fewer than a causal square),
        summed over all ranks. Each layer's attention backward runs once per micro-batch
        while its forward may be recomputed (activation checkpointing), so the attention
        work is its backward FLOPs x 3.5 / 2.5 (forward once + backward, ARCHITECTURE.md)."""
        if self._flops_per_token is None:  # dense part (and MAC's local segment attention); meta build, once
            self._flops_per_token = flops_per_token(self.cfg.model, self.vocab_size, self.cfg.data.seq_len,
                                                    attn_pairs_per_token=0.0)
        attn = 3.5 / 2.5 * sum(float(c.get("attn_flops_bwd", 0.0)) for c in calls)
        attn = self.mesh.all_reduce([attn], group="world")[0]
        world = self.mesh.world_size
        return {"perf/mfu": (self._flops_per_token * tokens + attn) / dt / (peak * world),
                "perf/attn_tflops": attn / dt / world / 1e12}

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg = self.cfg
        if self._eval_batches is None:
            self._eval_batches = eval_rows(cfg.data, self.tokenizer, seq_len=cfg.data.seq_len,
                                           dp_rank=self.mesh.dp_rank, dp_size=self.mesh.dp_size,
                                           num_batches=cfg.train.eval_batches,
                                           batch_size=cfg.train.micro_batch_size)
        self.module.eval()
        # loss sum, targets, correct targets, answer targets, correct answers
        totals = [0.0] * 5
        for batch in self._eval_batches:
            local = self.shard_batch(batch)
            labels = local["labels"]
            with self.autocast():
                losses, predictions = self.module(local["input_ids"], local["position_ids"], local["doc_ids"],
                                                  labels=labels)
            valid = labels != IGNORE_INDEX
            correct = (predictions == labels) & valid
            answer = local["answer_mask"].bool() & valid
            for i, value in enumerate((losses.double().sum(), valid.sum(), correct.sum(),
                                       answer.sum(), (correct & answer).sum())):
                totals[i] += value.item()
        self.module.train()
        self.parallel.attention.drain()  # evaluation traffic is not a training step's
        # every rank holds distinct tokens of distinct rows
        loss_sum, n, n_correct, n_answer, n_answer_correct = self.mesh.all_reduce(totals, group="world")
        loss = loss_sum / max(n, 1.0)
        out = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
               "eval/token_accuracy": n_correct / max(n, 1.0)}
        if n_answer > 0:
            out["eval/answer_accuracy"] = n_answer_correct / n_answer
        return out

    # -- checkpoints -------------------------------------------------------------------------------------
    def _gather_data_states(self) -> dict:
        gathered = all_gather_object((self.mesh.dp_rank, self.data.state_dict()))
        return {str(r): s for r, s in gathered}

    def save(self) -> str:
        meta = {"launch_id": self.ctx.launch_id, "mlflow_run_id": self.ctx.mlflow_run_id,
                "dp_size": self.mesh.dp_size, "cp_size": self.mesh.cp_size,
                "data": self._gather_data_states(), "skipped_steps": self.skipped_steps,
                "bad_streak": self.bad_streak}
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
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        self.bad_streak = int(meta.get("bad_streak", 0))
        return meta


def resolve_resume(cfg: Config, ctx: RunContext) -> Optional[str]:
    """Which checkpoint this worker starts from.

    A valid checkpoint written by this same launch always wins: that is a restart after
    a worker failure (Ray calls the loop again). Otherwise the one the launcher chose
    (`ctx.resume_from`, already verified), or, with no launcher, `auto` = the newest
    valid one, `none` = fresh. Validity here is the manifest and the file sizes; an
    object store's checksums are checked as the files are downloaded.
    """
    for path in reversed(ckpt.list_checkpoints(ctx.checkpoint_dir)):
        try:
            if not ckpt.verify_checkpoint(path, checksums=False) \
                    and ckpt.read_meta(path).get("launch_id") == ctx.launch_id:
                return path
        except (OSError, ValueError):  # an unreadable meta.json: not this launch's checkpoint
            continue
    if ctx.resume_from:
        return ctx.resume_from
    if cfg.checkpoint.resume == "auto":
        return ckpt.newest_valid_checkpoint(ctx.checkpoint_dir, checksums=False)
    return None


def _load_start(trainer: Trainer, cfg: Config, ctx: RunContext) -> Optional[str]:
    """Load the checkpoint this worker starts from (`resolve_resume`), chosen once by rank 0
    so every rank loads the same one. One that fails its checks while loading (an object
    store's checksums are only seen then) is reported and the next older valid one is used,
    unless the user named it (`checkpoint.resume=PATH`)."""
    mesh = trainer.mesh
    start = broadcast_object(resolve_resume(cfg, ctx) if mesh.rank == 0 else None)
    while start is not None:
        try:
            trainer.load(start)
            return start
        except ckpt.InvalidCheckpoint as err:  # raised on every rank alike
            if cfg.checkpoint.resume not in ("auto", "none"):
                raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume}: {err}") from None
            step = int(ckpt.read_meta(start)["step"])
            start = ckpt.newest_valid_checkpoint(ctx.checkpoint_dir, checksums=False, below=step)
            if start is None:  # never a silent fresh start over existing checkpoints
                raise RunError(f"{err}; no older checkpoint under {ctx.checkpoint_dir} is valid") from None
            logger.warning(f"{err}; using the next older valid one, {start}")
    return None


def _write_pid_file(run_dir: str, rank: int) -> None:
    # Operators (and the failure test) find worker processes here.
    folder = os.path.join(run_dir, "workers")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))


class TrainingDiverged(RunError):
    """`train.max_bad_steps` steps in a row were skipped for a non-finite loss or gradients.
    Not a fault a restart can fix: the launcher reports it instead of retrying."""


def _diverged_message(trainer: Trainer, m: dict, last_good: Optional[str]) -> str:
    what = []
    if not math.isfinite(m["train/loss"]):
        what.append(f"loss {m['train/loss']}")
    if not math.isfinite(m.get("train/grad_norm", 0.0)):
        what.append(f"gradient norm {m['train/grad_norm']}")
    what = " and ".join(what) or "gradients (overflow)"
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
    n = trainer.cfg.train.max_bad_steps
    return (f"step {trainer.step}: non-finite {what}; {n} step{'s' * (n > 1)} in a row skipped "
            f"(train.max_bad_steps={n}), so the run stops. {kept}. Lower optim.lr "
            f"(now {trainer.cfg.optim.lr:g}) or optim.grad_clip, or check the data.")


def train_worker(cfg: Config, ctx: RunContext) -> dict:
    """Entry point of every worker. Returns a summary (meaningful on rank 0): `interrupted`
    when the driver asked for a stop (a checkpoint was written at `step`). Raises
    `TrainingDiverged` after `train.max_bad_steps` skipped steps in a row."""
    from longctx.trainer.interrupt import WorkerStop

    trainer = Trainer(cfg, ctx)
    mesh = trainer.mesh
    _write_pid_file(ctx.run_dir, mesh.rank)
    start = _load_start(trainer, cfg, ctx)
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
        if ckpt.read_meta(start).get("launch_id") == ctx.launch_id:
            log.warning("a worker failed and Ray restarted the workers; its error is in the run's "
                        "logs/framework.log")
    log.info(f"world={mesh.world_size} dp={mesh.dp_size} cp={mesh.cp_size} strategy={cfg.parallel.strategy} "
             f"engine={cfg.train.engine} device={trainer.device} params={count_params(cfg.model, trainer.vocab_size):,}")
    last_eval, history, niah = {}, [], {}
    every = cfg.checkpoint.every
    stop_request = WorkerStop(ctx.launch_id)
    interrupted, saved_at, last_good = False, None, start

    def evaluate_and_log():
        nonlocal last_eval
        last_eval = trainer.evaluate()
        log.log(trainer.step, last_eval)
        log.info(f"eval @ {trainer.step}: " + " ".join(f"{k[5:]} {v:.4f}" for k, v in last_eval.items()))

    try:
        while trainer.step < stop:
            m = trainer.train_step()
            history.append((trainer.step, m["train/loss"]))
            log.step(trainer.step, m)
            if trainer.bad_streak >= cfg.train.max_bad_steps:
                raise TrainingDiverged(_diverged_message(trainer, m, last_good))
            if cfg.train.eval_every and trainer.step % cfg.train.eval_every == 0 and trainer.step < stop:
                evaluate_and_log()
            # No checkpoint in a run of skipped steps: the last good one must survive rotation.
            if every and trainer.step % every == 0 and trainer.step < stop and trainer.bad_streak == 0:
                last_good, saved_at = trainer.save(), trainer.step
                log.info(f"checkpoint {last_good}")
            if trainer.step < stop and stop_request.requested(mesh):  # collective: all ranks leave here
                interrupted = True
                break
        if interrupted:  # a checkpoint at this step, unless the periodic one just wrote it
            path = last_good if saved_at == trainer.step else trainer.save()
            log.info(f"stopped at step {trainer.step} on request; checkpoint {path}")
        elif trainer.step == stop and trainer.step > start_step:  # not when resuming a finished run
            evaluate_and_log()
            path = trainer.save()
            log.info(f"checkpoint {path}")
            if trainer.step >= cfg.train.steps and trains_passkey(cfg) \
                    and cfg.data.seq_len >= min_niah_length(trainer.tokenizer):
                niah = final_niah(trainer, log)
    finally:
        log.close()
    summary = {"step": trainer.step, "finished": trainer.step >= cfg.train.steps, "eval": last_eval,
               "losses": history, "interrupted": interrupted, "skipped_steps": trainer.skipped_steps}
    if mesh.is_logging_rank and not interrupted:
        extra = {**summary_metrics(niah), "niah": niah} if niah else {}
        with open(os.path.join(ctx.run_dir, "eval_results.json"), "w") as f:
            json.dump({"step": trainer.step, **last_eval, **extra}, f, indent=2)
    return summary


NIAH_PNG = "niah_heatmap.png"


def final_niah(trainer: Trainer, log: RunLogger) -> dict:
    """Needle in a haystack on the model just trained, at lengths up to its training length
    (`long_eval.train_end_niah`: a few seconds on a CPU). Logs `niah/accuracy` (and per
    length) and writes the heatmap <run>/niah_heatmap.png on the logging rank."""
    results = run_niah(trainer, train_end_niah(trainer.cfg, trainer.tokenizer))
    log.log(trainer.step, summary_metrics(results))
    by_length = " ".join(f"{n}: {v:.2f}" for n, v in results["accuracy_by_length"].items())
    log.info(f"niah @ {trainer.step}: accuracy {results['accuracy']:.3f} (by length {by_length})")
    if trainer.mesh.is_logging_rank:
        plot_niah(results, os.path.join(trainer.ctx.run_dir, NIAH_PNG))
    return results
