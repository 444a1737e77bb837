"""Hugging Face checkpoints in and out: Llama (2, 3, 3.1+), Mistral, Qwen2, Qwen3.

- `config_layer(path)`: the folder's `config.json` as a config layer (`model.*`, and
  `data.tokenizer` when the folder has a tokenizer), which `load_config` puts between the
  schema defaults and the user's YAML. Every key of config.json is either mapped, known not
  to change the computation, or an error that names it: nothing is silently ignored.
- `load_weights(model, path)`: copies the folder's `*.safetensors` tensors into an
  already built model (on any device; a meta-built model after `to_empty`), one tensor at a
  time from memory-mapped files, checking every name and shape.
- `from_pretrained(path)` / `save_pretrained(model, out_dir)`: the Python API.

Weight names (ours -> Hugging Face):
    tok_embeddings                    model.embed_tokens
    layers.i.attention.w{q,k,v,o}     model.layers.i.self_attn.{q,k,v,o}_proj   (+ .bias, Qwen2 q/k/v)
    layers.i.attention.{q,k}_norm     model.layers.i.self_attn.{q,k}_norm       (Qwen3)
    layers.i.feed_forward.w1/w3/w2    model.layers.i.mlp.gate_proj/up_proj/down_proj
    layers.i.attention_norm/ffn_norm  model.layers.i.input_layernorm/post_attention_layernorm
    norm, output                      model.norm, lm_head (absent when tied)
Both sides rotate q/k in the "rotate half" layout, so no permutation is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

import torch

from longctx.config import ConfigError

# family -> (architectures[0], model_type)
FAMILIES = {"llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral"),
            "qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3")}

# config.json keys that do not change the computation (ids, caching, dtype of the files, ...).
HARMLESS_KEYS = {
    "architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "torch_dtype",
    "dtype", "transformers_version", "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "tokenizer_class", "initializer_range", "max_position_embeddings", "max_window_layers", "pretraining_tp",
    "id2label", "label2id", "problem_type", "tie_encoder_decoder", "is_decoder", "is_encoder_decoder",
    "add_cross_attention", "chunk_size_feed_forward", "finetuning_task", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "torchscript", "use_return_dict",
    "output_router_logits", "cross_attention_hidden_size", "tf_legacy_loss", "pruned_heads", "bad_words_ids",
    "num_beams", "temperature", "top_p", "top_k", "do_sample", "max_length", "min_length",
}
# Keys whose only accepted value is the one that leaves the computation as longctx does it.
REQUIRED_VALUES = {"hidden_act": ("silu",), "mlp_bias": (False, None), "attention_dropout": (0, 0.0, None),
                   "partial_rotary_factor": (1, 1.0, None), "use_sliding_window": (False, None)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def read_config_json(path: str) -> dict:
    if not os.path.isdir(path):
        raise ConfigError(f"model.init_from='{path}' is not a folder (expected a Hugging Face model folder)")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ConfigError(f"model.init_from='{path}' has no config.json (expected a Hugging Face model folder "
                          f"with config.json and *.safetensors)")
    try:
        with open(file) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"'{file}' is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"'{file}' must hold a JSON object")
    return data


def family_of(hf: dict, source: str) -> str:
    archs = hf.get("architectures") or []
    if archs:
        for family, (arch, _) in FAMILIES.items():
            if archs == [arch]:
                return family
        raise ConfigError(f"{source}: architectures={archs} is not supported; longctx loads "
                          f"{', '.join(a for a, _ in FAMILIES.values())}")
    for family, (_, model_type) in FAMILIES.items():
        if hf.get("model_type") == model_type:
            return family
    raise ConfigError(f"{source}: model_type={hf.get('model_type')!r} (no architectures) is not supported; longctx "
                      f"loads {', '.join(t for _, t in FAMILIES.values())}")


def _rope(hf: dict, source: str) -> dict:
    """`model.rope_theta` and `model.rope_scaling` from either layout: `rope_parameters`
    (transformers 5) or `rope_theta` + `rope_scaling` (older files)."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be a mapping")
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type
        distinct = {json.dumps(v, sort_keys=True) for v in params.values()}
        if len(distinct) > 1:
            raise ConfigError(f"{source}: rope_parameters differ by layer type ({sorted(params)}); not supported")
        params = next(iter(params.values()))
    params = dict(params or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", params.pop("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    from longctx.models.rope import ROPE_TYPES

    if kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope_scaling.rope_type={kind!r} is not supported; longctx implements "
                          f"{', '.join(ROPE_TYPES)}")
    scaling: dict[str, Any] = {"rope_type": kind}
    allowed = {"default": set(), "linear": {"factor"},
               "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                        "mscale", "mscale_all_dim", "truncate"},
               "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}}[kind]
    if params.get("partial_rotary_factor") in (1, 1.0):
        del params["partial_rotary_factor"]
    for key, value in params.items():
        if key not in allowed:
            raise ConfigError(f"{source}: rope_scaling.{key}={value!r} is not supported for rope_type={kind}")
        if value is not None:
            scaling[key] = value
    if kind in ("yarn", "llama3") and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    out["rope_scaling"] = scaling
    return out


def config_layer(path: str) -> dict:
    """The folder's config.json as `{"model": {...}, "data": {...}}` for `load_config`
    (with the folder as an absolute path: workers may start elsewhere)."""
    path = os.path.abspath(os.path.expanduser(path))
    hf = read_config_json(path)
    source = os.path.join(path, "config.json")
    family = family_of(hf, source)
    try:
        dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        model: dict[str, Any] = {
            "family": family, "dim": dim, "n_layers": int(hf["num_hidden_layers"]), "n_heads": n_heads,
            "n_kv_heads": int(hf.get("num_key_value_heads") or n_heads),
            "ffn_hidden": int(hf["intermediate_size"]), "vocab_size": int(hf["vocab_size"]),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "max_position_embeddings": int(hf.get("max_position_embeddings") or 0)}
    except KeyError as err:
        raise ConfigError(f"{source}: missing {err.args[0]!r}") from None
    if hf.get("head_dim") is not None and int(hf["head_dim"]) != dim // n_heads:
        model["head_dim"] = int(hf["head_dim"])
    if hf.get("initializer_range") is not None:
        model["init_std"] = float(hf["initializer_range"])
    model.update(_rope(hf, source))
    mapped = {"hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "intermediate_size",
              "vocab_size", "rms_norm_eps", "tie_word_embeddings", "head_dim", "rope_parameters", "rope_scaling",
              "rope_theta", "sliding_window", "layer_types", "attention_bias"}
    for key, value in hf.items():
        if key in REQUIRED_VALUES:
            if value not in REQUIRED_VALUES[key]:
                raise ConfigError(f"{source}: {key}={value!r} is not supported by longctx "
                                  f"(it implements {key}={REQUIRED_VALUES[key][0]!r})")
        elif key not in mapped and key not in HARMLESS_KEYS:
            raise ConfigError(f"{source}: key {key!r} is not known to longctx, which cannot tell whether it "
                              f"changes the computation; remove it if it does not")
    if hf.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported for {family} (biases on every "
                          f"attention projection); only Qwen2's q/k/v biases are")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):  # per-layer mixes (Ministral, Qwen windows)
        raise ConfigError(f"{source}: layer_types={layer_types} (sliding-window layers) is not supported for {family}")
    window = hf.get("sliding_window")
    if family == "mistral" and window:  # every layer attends to the last `sliding_window` tokens
        model["memory"] = {"window": int(window), "swa_layers": list(range(model["n_layers"]))}
    layer: dict[str, Any] = {"model": {"init_from": path, **model}}
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        layer["data"] = {"tokenizer": path}
    return layer


# ---------------------------------------------------------------------------------------- weights

_LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",
                "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face tensor name (ValueError for a part HF has no name for)."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"parameter '{name}' has no Hugging Face equivalent (gated-memory blocks cannot be exported)")


def _weight_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file, from the index or the single file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"'{index}' has no weight_map")
        files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.isfile(file):
                raise ConfigError(f"'{index}' names '{os.path.basename(file)}', which is not in {path}")
        return files
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise ConfigError(f"model.init_from='{path}' has no model.safetensors or model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape, also while ZeRO-3 holds only this rank's flat partition of it
    (DeepSpeed keeps the real shape in `ds_shape`)."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def match_weights(model: torch.nn.Module, path: str) -> dict[str, tuple[str, torch.Tensor]]:
    """HF name -> (safetensors file, parameter) for every parameter of `model` (meta-built is
    fine), after checking that every parameter has a tensor of its shape in the folder and
    that no tensor is left over. Reads only the files' headers."""
    from safetensors import safe_open

    files = _weight_files(path)
    # named_parameters yields a tied lm head once, as the embedding table
    wanted = {hf_name(n): p for n, p in model.named_parameters()}
    missing = sorted(set(wanted) - set(files))
    if missing:
        raise ConfigError(f"checkpoint '{path}' lacks tensor '{missing[0]}'"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    ignorable = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    extra = sorted(n for n in set(files) - set(wanted) - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ConfigError(f"checkpoint '{path}' has tensor '{extra[0]}' that the model (as configured) does not "
                          f"have" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for file in sorted({files[n] for n in wanted}):
        with safe_open(file, framework="pt") as f:
            for name in (n for n in wanted if files[n] == file):
                shape = tuple(f.get_slice(name).get_shape())
                if shape != full_shape(wanted[name]):
                    raise ConfigError(f"checkpoint '{path}': tensor '{name}' has shape {list(shape)}, the model "
                                      f"expects {list(full_shape(wanted[name]))} ({os.path.basename(file)})")
    return {name: (files[name], p) for name, p in wanted.items()}


def check_weights(cfg, vocab_size: int) -> None:
    """On the driver, before any worker starts: `cfg.init_from` holds every tensor of the
    configured model, with its shape (headers only; the model is built on the meta device)."""
    from longctx.models.llama import Transformer

    with torch.device("meta"):
        model = Transformer(cfg, vocab_size)
    match_weights(model, cfg.init_from)


@torch.no_grad()
def load_weights(model: torch.nn.Module, path: str, *, gather=None, reader: bool = True) -> None:
    """Copy the folder's tensors into `model`'s parameters (their device and dtype), one tensor
    at a time from the memory-mapped files, after `match_weights`' checks.

    Partitioned parameters (ZeRO-3): `gather(param)` is a context manager that makes one
    parameter whole while it is written (`longctx.trainer.engine.zero3_gather`); every rank
    calls it in the same order, and only the `reader` rank opens the files."""
    import contextlib

    from safetensors import safe_open

    matched = match_weights(model, path)
    for file in sorted({f for f, _ in matched.values()}):
        with safe_open(file, framework="pt") if reader else contextlib.nullcontext() as f:
            for name, (_, param) in sorted((n, v) for n, v in matched.items() if v[0] == file):
                with gather(param) if gather else contextlib.nullcontext():
                    if reader:
                        param.copy_(f.get_tensor(name).to(dtype=param.dtype))


def build_model(cfg, vocab_size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A model of `cfg` built on the meta device and materialised on `device`, uninitialised
    (for loading weights into: no random init, no second copy)."""
    from longctx.models.llama import Transformer

    with torch.device("meta"):
        model = Transformer(cfg, vocab_size)
    model.to_empty(device=device)
    model.tie_weights()
    return model.to(dtype)


def from_pretrained(path: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    **overrides):
    """A local Hugging Face folder -> the longctx model. `overrides` are `model.*` keys
    (e.g. `rope_theta=5e5`, `rope_scaling={"rope_type": "yarn", "factor": 4.0}`)."""
    from longctx.config import load_config

    flat = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat += [f"model.{key}.{k}={json.dumps(v)}" for k, v in value.items()]
        else:
            flat.append(f"model.{key}={json.dumps(value) if not isinstance(value, str) else value}")
    cfg = load_config(None, [f"model.init_from={path}", *flat])
    model = build_model(cfg.model, cfg.model.vocab_size, device, dtype)
    load_weights(model, path)
    return model.eval()


# ---------------------------------------------------------------------------------------- export

def hf_config(model, max_position_embeddings: Optional[int] = None, dtype: torch.dtype = torch.float32,
              extra: Optional[dict] = None) -> dict:
    """config.json for `model` (its family, shape and RoPE settings)."""
    m = model.cfg
    arch, model_type = FAMILIES[m.family]
    if m.memory.type != "none":
        raise ConfigError("model.memory: gated-memory blocks have no Hugging Face equivalent; cannot export")
    from longctx.config import ffn_hidden, head_dim

    window = None
    if m.memory.swa_layers:
        if m.family != "mistral" or sorted(set(i % m.n_layers for i in m.memory.swa_layers)) != list(range(m.n_layers)):
            raise ConfigError("model.memory.swa_layers: sliding windows export only as Mistral with a window on "
                              "every layer")
        window = m.memory.window
    r = m.rope_scaling
    scaling = None
    if r.rope_type != "default":
        keys = {"linear": ("factor",),
                "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                         "mscale", "mscale_all_dim", "truncate"),
                "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}
        scaling = {"rope_type": r.rope_type, **{k: getattr(r, k) for k in keys[r.rope_type]
                                                 if getattr(r, k) not in (None, 0.0) or k == "truncate"}}
        if "original_max_position_embeddings" in keys[r.rope_type]:
            from longctx.models.rope import original_context
            scaling["original_max_position_embeddings"] = original_context(m)
    out = {"architectures": [arch], "model_type": model_type, "hidden_size": m.dim,
           "intermediate_size": ffn_hidden(m), "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
           "num_key_value_heads": m.n_kv_heads, "head_dim": head_dim(m), "hidden_act": "silu",
           "max_position_embeddings": int(max_position_embeddings or m.max_position_embeddings),
           "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_scaling": scaling,
           "tie_word_embeddings": m.tie_embeddings, "vocab_size": model.vocab_size,
           "initializer_range": m.init_std, "use_cache": True,
           "torch_dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]}
    if m.family in ("llama", "qwen3"):
        out["attention_bias"] = False
    if m.family == "llama":
        out["mlp_bias"] = False
    if m.family == "mistral":
        out["sliding_window"] = window
    if m.family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    out.update(extra or {})
    return out


def save_pretrained(model, out_dir: str, tokenizer_dir: Optional[str] = None, *,
                    dtype: torch.dtype = torch.float32, max_position_embeddings: Optional[int] = None,
                    max_shard_bytes: int = 2 * 2**30, extra_config: Optional[dict] = None) -> str:
    """Write `model` as a Hugging Face folder: config.json, sharded safetensors with an index,
    generation_config.json, and the tokenizer files of `tokenizer_dir` (if given).

    Written into `<out_dir>.tmp` and renamed when complete; an existing non-empty `out_dir`
    is an error (nothing is overwritten)."""
    from safetensors.torch import save_file

    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"output folder '{out_dir}' exists and is not empty; choose another (nothing was written)")
    config = hf_config(model, max_position_embeddings, dtype, extra_config)
    tensors = {hf_name(n): p.detach().to("cpu", dtype).contiguous() for n, p in model.named_parameters()}
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, os.path.join(tmp, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(tmp, "config.json"), config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(tmp, name))
        src = os.path.join(tokenizer_dir, "generation_config.json")
        if os.path.isfile(src):
            with open(src) as f:
                generation = {**json.load(f), **generation}
    _write_json(os.path.join(tmp, "generation_config.json"), generation)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp, out_dir)
    return out_dir


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


__all__ = ["FAMILIES", "config_layer", "read_config_json", "match_weights", "check_weights", "full_shape", "load_weights", "build_model", "from_pretrained",
           "save_pretrained", "hf_config", "hf_name"]
