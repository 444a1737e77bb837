"""Typed configuration: dataclass schema, YAML + `key=value` loading, strict checks.

The schema's defaults *are* the built-in `tiny` preset (configs/tiny.yaml spells
them out), so `longctx train` with no file trains the CPU default.

Strictness is the point: a mistyped key must fail before any process starts,
naming the key and the closest valid one; a wrong type names the key and the
type it expects.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the key."""


@dataclass
class MemorySectionConfig:
    """`model.memory`: gated memory layers (Titans / GSA / FIFO), see longctx/models/memory."""

    type: str = "none"  # none | a memory module (longctx.models.memory.MEMORY_MODULES)
    variant: str = "mal"  # mac (memory as context) | mag (memory as gate) | mal (memory as a layer)
    layers: Optional[list[int]] = None  # memory layer indices (negative = from the end); None = all
    chunk_size: int = 0  # memory chunk (MAC segment); 0 = the module's default
    window: int = 0  # sliding window of the attention inside memory blocks; 0 = full attention
    swa_layers: list[int] = field(default_factory=list)  # plain layers using sliding-window attention
    heads: int = 0  # memory heads; 0 = model.n_heads
    persistent_tokens: int = 4  # MAC's learned persistent tokens
    options: dict[str, Any] = field(default_factory=dict)  # passed to the memory module


@dataclass
class RopeScalingConfig:
    """`model.rope_scaling`: RoPE frequency scaling for context extension, with the meaning
    (and the numerics) of transformers' `rope_parameters` (longctx/models/rope.py)."""

    rope_type: str = "default"  # default (none) | linear | yarn | llama3
    factor: float = 1.0  # context extension factor (new length / original length)
    original_max_position_embeddings: int = 0  # yarn / llama3: the pretraining length; 0 = model.max_position_embeddings
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn: boundary of the extrapolated (fast) dimensions
    beta_slow: float = 1.0  # yarn: boundary of the interpolated (slow) dimensions
    attention_factor: Optional[float] = None  # yarn: cos/sin scale; None = 0.1 ln(factor) + 1
    mscale: float = 0.0  # yarn, DeepSeek form of the attention factor (with mscale_all_dim); 0 = unused
    mscale_all_dim: float = 0.0
    truncate: bool = True  # yarn: round the correction range to whole dimensions


@dataclass
class ModelConfig:
    init_from: Optional[str] = None  # a local Hugging Face folder: shape, weights and tokenizer from it
    family: str = "llama"  # llama | mistral | qwen2 (q/k/v biases) | qwen3 (per-head q/k RMSNorm)
    vocab_size: int = 0  # 0 = take it from the tokenizer
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: Optional[int] = None  # None = dim // n_heads
    ffn_hidden: Optional[int] = None  # None = Llama rule: 8/3 * dim rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    max_position_embeddings: int = 0  # the context the model is made for (export raises it to data.seq_len); 0 = data.seq_len
    tie_embeddings: bool = True
    init_std: float = 0.02
    attention_backend: str = "auto"  # torch | triton | auto
    memory: MemorySectionConfig = field(default_factory=MemorySectionConfig)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | files | hf
    task: str = "passkey"  # synthetic only: passkey | mqar | lm | mix
    seq_len: int = 1024
    tokenizer: str = "auto"  # "byte", a local path holding a HF tokenizer, or auto (model.init_from's, else byte)
    # files
    paths: list[str] = field(default_factory=list)
    format: Optional[str] = None  # json | jsonl | parquet | txt; None = from the file suffix
    text_field: str = "text"
    # hf
    name: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    eval_split: Optional[str] = None  # None = hold out eval_fraction of the documents
    streaming: bool = False
    # held-out data and synthetic lengths
    eval_fraction: float = 0.05
    min_doc_len: int = 128  # synthetic document length range, in characters
    max_doc_len: int = 900  # tiny preset: a passkey document fits in one 1k-token row
    seed: int = 1234


@dataclass
class ParallelConfig:
    cp: int = 2  # context-parallel size; dp = workers / cp
    strategy: str = "ring"  # a CP strategy (longctx.parallel.STRATEGIES) or auto
    options: dict[str, Any] = field(default_factory=dict)  # strategy-specific options
    cad_scope: str = "cp"  # cad only: "cp" = balance within a cp group, "dp" = across data-parallel ranks
    node_size: int = 0  # ranks per node for topology-aware strategies; 0 = from the launch (LOCAL_WORLD_SIZE)
    intra_node_gbps: float = 450.0  # link bandwidths (GB/s per rank) for the `auto` cost model
    inter_node_gbps: float = 50.0


@dataclass
class TrainConfig:
    engine: str = "deepspeed"  # deepspeed | ddp
    steps: int = 40
    micro_batch_size: int = 1  # rows per data-parallel rank per micro-step
    grad_accum: int = 1
    dtype: str = "fp32"  # fp32 | bf16
    seed: int = 0
    eval_every: int = 20  # 0 = only at the end
    eval_batches: int = 4
    stop_at_step: Optional[int] = None  # end this launch at this step with a checkpoint; the schedule still targets train.steps
    device: str = "auto"  # auto | cpu | cuda
    # true: recompute each block in backward, keeping only its input; offload: the kept
    # inputs wait in (pinned) CPU memory until backward needs them
    activation_checkpointing: Any = False  # false | true | offload
    loss: str = "chunked"  # chunked: the lm head and cross-entropy a chunk of tokens at a time | full: full logits
    loss_chunk_size: Optional[int] = None  # tokens per chunk; None = one chunk's fp32 logits <= 128 MiB
    max_bad_steps: int = 3  # stop after this many consecutive steps skipped for a non-finite loss/gradient


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 5  # linear warmup; at most train.steps (unset: clamped to train.steps - 1)
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    config: dict[str, Any] = field(default_factory=dict)  # merged over the generated DeepSpeed config


@dataclass
class CheckpointConfig:
    every: int = 20  # steps; 0 = only at the end
    keep: int = 3
    resume: str = "auto"  # auto | none | a checkpoint folder
    dir: Optional[str] = None  # None = <run folder>/checkpoints


@dataclass
class LoggingConfig:
    mlflow: bool = True
    tracking_uri: Optional[str] = None  # None = $MLFLOW_TRACKING_URI, else sqlite in the run folder
    experiment: str = "longctx"
    log_every: int = 5
    system_metrics: bool = True
    progress_bar: bool = True


@dataclass
class RayConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    address: Optional[str] = None  # None = $RAY_ADDRESS, else an embedded local Ray
    max_failures: int = 1
    resource_timeout_s: float = 600.0  # with a cluster address: seconds to wait for the autoscaler's resources


@dataclass
class RunConfig:
    name: Optional[str] = None  # None = <preset>-<timestamp>
    output_dir: str = "runs"


@dataclass
class Config:
    launcher: str = "ray"  # ray | local
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# Keys whose values are free-form mappings handed to another system.
_FREE_FORM = {"parallel.options", "deepspeed.config", "model.memory.options"}

# Values owned by this schema; the others come from the registries that own them (`choices`).
_OWN_CHOICES = {
    "launcher": ("ray", "local"),
    "data.source": ("synthetic", "files", "hf"),
    "parallel.cad_scope": ("cp", "dp"),
    "train.dtype": ("fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.activation_checkpointing": (False, True, "offload"),
    "train.loss": ("chunked", "full"),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
}


# Numeric ranges: key -> (check, the allowed range in words). Checked after the types.
_RANGES = {
    "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.eps": (lambda v: v > 0, "> 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.grad_clip": (lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    "optim.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "optim.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.decay_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.max_bad_steps": (lambda v: v >= 1, ">= 1"),
    "ray.cpus_per_worker": (lambda v: v > 0, "> 0"),
    "ray.max_failures": (lambda v: v >= -1, ">= 0, or -1 (retry without limit)"),
    "ray.resource_timeout_s": (lambda v: v > 0, "> 0 (seconds)"),
}


def choices() -> dict[str, tuple]:
    """Allowed values of every enumerated key. Names of strategies, memory modules, kernel
    backends, engines, tasks and file formats come from their registries (imported here, on
    use: everything imports this module)."""
    from longctx.kernels import BACKENDS
    from longctx.models.hf import FAMILIES
    from longctx.models.memory import MEMORY_MODULES, VARIANTS
    from longctx.models.rope import ROPE_TYPES
    from longctx.parallel.strategy import STRATEGIES
    from longctx.trainer.engine import ENGINES
    from longctx.trainer.sources import FORMATS
    from longctx.trainer.synthetic import TASKS

    return {**_OWN_CHOICES,
            "model.attention_backend": BACKENDS,
            "model.family": tuple(FAMILIES),
            "model.rope_scaling.rope_type": ROPE_TYPES,
            "model.memory.type": ("none",) + tuple(MEMORY_MODULES),
            "model.memory.variant": tuple(VARIANTS),
            "data.task": tuple(TASKS),
            "data.format": (None,) + tuple(FORMATS),
            "train.engine": tuple(ENGINES),
            "parallel.strategy": tuple(STRATEGIES) + ("auto",)}


def _schema_keys(cls=Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema -> its declared type."""
    keys = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            keys.update(_schema_keys(f.type, name + "."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys[name] = type(default)
            keys.update(_schema_keys(type(default), name + "."))
        else:
            keys[name] = f.type
    return keys


SCHEMA_KEYS = _schema_keys()


def _unknown_key_error(key: str, source: str) -> ConfigError:
    # Compare with the keys at the same depth first ('trian' -> 'train', 'train.stpes' ->
    # 'train.steps'); then with leaf names anywhere ('lr' -> 'optim.lr').
    depth = key.count(".")
    same_depth = [k for k in SCHEMA_KEYS if k.count(".") == depth]
    close = difflib.get_close_matches(key, same_depth, n=1, cutoff=0.6)
    if not close:
        tail = key.rsplit(".", 1)[-1]
        tails = {k.rsplit(".", 1)[-1]: k for k in SCHEMA_KEYS}
        close = [tails[t] for t in difflib.get_close_matches(tail, list(tails), n=1, cutoff=0.6)]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' (from {source}){hint}")


def _check_keys(node: Any, source: str, prefix: str = "") -> None:
    """Reject keys the schema does not know, before OmegaConf merges anything."""
    if not isinstance(node, (dict, DictConfig)):
        return
    for key, value in node.items():
        full = f"{prefix}{key}"
        if full not in SCHEMA_KEYS:
            raise _unknown_key_error(full, source)
        if full in _FREE_FORM:
            if not isinstance(value, (dict, DictConfig)):
                raise ConfigError(f"config key '{full}' (from {source}): expected a mapping, got {value!r}")
            continue
        child_is_section = dataclasses.is_dataclass(SCHEMA_KEYS[full])
        if isinstance(value, (dict, DictConfig)):
            if not child_is_section:
                raise ConfigError(f"config key '{full}' (from {source}) is a value, not a section")
            _check_keys(value, source, full + ".")
        elif child_is_section:
            raise ConfigError(f"config key '{full}' (from {source}) is a section; set its keys, e.g. '{full}.<key>=...'")


def _reformat_omegaconf_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    expected = SCHEMA_KEYS.get(key)
    expected_name = getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
    msg = str(err).splitlines()[0]
    if "list" in expected_name.lower():
        msg = f"write a list, e.g. {key}=[a,b] on the command line"
    return ConfigError(f"config key '{key}' (from {source}): expected {expected_name}; {msg}")


def parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=100)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {overrides}: {err}") from None


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides, strictly checked."""
    merged = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist")
        import yaml

        try:
            with open(path) as f:
                top = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
        if top is not None and not isinstance(top, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level, "
                              f"not a {type(top).__name__}")
        # OmegaConf's own loader for the content: it reads `1e-5` as a float, PyYAML does not.
        layers.append((OmegaConf.load(path) if top else OmegaConf.create({}), path))
    if overrides:
        layers.append((parse_overrides(overrides), "the command line"))
    for layer, source in layers:
        _check_keys(layer, source)
    # A pretrained model's config.json sits between the defaults and the user's layers: the
    # YAML and the command line override only what the user changes (e.g. model.rope_scaling).
    init_from = next((layer.get("model", {}).get("init_from") for layer, _ in reversed(layers)
                      if layer.get("model", {}).get("init_from")), None)
    if init_from:
        from longctx.models.hf import config_layer

        layers.insert(0, (OmegaConf.create(config_layer(init_from)), f"{init_from}/config.json"))
    for layer, source in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _reformat_omegaconf_error(err, source) from None
    cfg: Config = OmegaConf.to_object(merged)
    if not any("warmup_steps" in (layer.get("optim") or {}) for layer, _ in layers):
        # the schema's warmup fits the run (a 2-step smoke test needs no optim key); one the
        # user chose and the run cannot hold is an error (`validate`)
        cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(cfg.train.steps - 1, 0))
    if cfg.model.init_from:  # absolute: workers may start in another folder
        cfg.model.init_from = os.path.abspath(os.path.expanduser(cfg.model.init_from))
    if cfg.data.tokenizer == "auto":  # resolved here, so saved configs name the tokenizer used
        cfg.data.tokenizer = "byte"
    validate(cfg)
    cfg._preset = os.path.splitext(os.path.basename(path))[0] if path else "tiny"  # type: ignore[attr-defined]
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    flat = to_flat_dict(cfg)
    for key, allowed in choices().items():
        if flat[key] not in allowed:
            shown = ", ".join(repr(c) if c is None else str(c).lower() if isinstance(c, bool) else str(c)
                              for c in allowed)
            raise ConfigError(f"config key '{key}' = {flat[key]!r}: expected one of {shown}")
    positive = ["model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads", "data.seq_len",
                "parallel.cp", "train.steps", "train.micro_batch_size", "train.grad_accum",
                "ray.num_workers", "checkpoint.keep", "logging.log_every", "train.eval_batches"]
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"config key '{key}' = {flat[key]}: must be a positive integer")
    for key, (ok, allowed) in _RANGES.items():
        if not (math.isfinite(flat[key]) and ok(flat[key])):
            raise ConfigError(f"config key '{key}' = {flat[key]}: must be {allowed}")
    steps, warmup = cfg.train.steps, cfg.optim.warmup_steps
    if warmup > steps:
        raise ConfigError(f"optim.warmup_steps={warmup} is longer than the run (train.steps={steps}): the warmup "
                          f"must end within it; use e.g. optim.warmup_steps={min(steps - 1, max(1, steps // 10))} "
                          f"(about a tenth of the run), or raise train.steps")
    m = cfg.model
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}")
    if m.head_dim is None and m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}; set model.head_dim")
    if (m.head_dim or m.dim // m.n_heads) % 2:
        raise ConfigError("the head dimension must be even for RoPE (model.dim / model.n_heads or model.head_dim)")
    if cfg.ray.num_workers % cfg.parallel.cp:
        raise ConfigError(
            f"parallel.cp={cfg.parallel.cp} does not divide ray.num_workers={cfg.ray.num_workers}: "
            f"the workers form data-parallel groups of cp ranks each")
    if cfg.model.memory.type != "none" and cfg.parallel.cp > 1 and cfg.parallel.strategy != "ring":
        raise ConfigError(f"model.memory needs contiguous sequence slices under context parallelism (memory state "
                          f"passes rank to rank): use parallel.strategy=ring, not {cfg.parallel.strategy!r}")
    from longctx.models.memory import validate_memory_config
    from longctx.models.rope import check_rope_scaling

    try:
        validate_memory_config(cfg.model.memory)
        check_rope_scaling(cfg.model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.parallel.strategy == "cad" and cfg.parallel.cad_scope == "dp" and cfg.parallel.cp != 1:
        raise ConfigError(f"parallel.cad_scope=dp balances whole rows across data-parallel ranks, so it needs "
                          f"parallel.cp=1 (got {cfg.parallel.cp}); use parallel.cad_scope=cp to split rows")
    if cfg.data.source == "files" and not cfg.data.paths:
        raise ConfigError("data.source=files needs data.paths (a list of json/jsonl/parquet/txt files)")
    if cfg.data.source == "hf" and not cfg.data.name:
        raise ConfigError("data.source=hf needs data.name (a dataset name or local folder)")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1)")
    if cfg.data.min_doc_len > cfg.data.max_doc_len:
        raise ConfigError("data.min_doc_len must not exceed data.max_doc_len")
    if cfg.train.loss_chunk_size is not None and cfg.train.loss_chunk_size <= 0:
        raise ConfigError(f"train.loss_chunk_size={cfg.train.loss_chunk_size} must be a positive number of "
                          f"tokens (or null: sized by the vocabulary)")
    if cfg.train.stop_at_step is not None and cfg.train.stop_at_step <= 0:
        raise ConfigError("train.stop_at_step must be positive (or null)")
    if cfg.checkpoint.every < 0 or cfg.train.eval_every < 0:
        raise ConfigError("checkpoint.every and train.eval_every must be >= 0")


def to_container(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    """`section.key -> value` for every leaf (free-form sections flattened too)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and (prefix.rstrip(".") in SCHEMA_KEYS or not prefix):
            if not node and prefix:
                out[prefix.rstrip(".")] = {}
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = node

    walk(to_container(cfg), "")
    return out


def from_container(data: dict) -> Config:
    """Rebuild a Config from a saved (resolved) mapping, e.g. a run's config.yaml."""
    _check_keys(data, "a saved config")
    cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))
    validate(cfg)
    return cfg


def head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.dim // m.n_heads


def ffn_hidden(m: ModelConfig) -> int:
    if m.ffn_hidden:
        return m.ffn_hidden
    hidden = int(2 * (4 * m.dim) / 3)
    return m.multiple_of * ((hidden + m.multiple_of - 1) // m.multiple_of)


__all__ = ["Config", "ConfigError", "load_config", "validate", "to_yaml", "to_container", "to_flat_dict",
           "from_container", "parse_overrides", "SCHEMA_KEYS", "ListConfig"]
