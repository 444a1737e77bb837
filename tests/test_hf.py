"""Hugging Face checkpoints: longctx's logits equal transformers' for every family and RoPE
scaling (fp32, relative 1e-4, positions up to 4x the original context), the folder's
config.json drives the model shape with YAML overrides on top, `save_pretrained` writes
what transformers loads, and bad folders fail with an error that names the problem."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_cases import CASES, LLAMA3_8B, ORIGINAL_CONTEXT, make_checkpoint
from longctx.config import ConfigError, load_config
from longctx.models import from_pretrained, save_pretrained
from longctx.models.hf import config_layer

import transformers  # noqa: E402  (a test dependency: the reference)

TOL = 1e-4


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def logits_pair(ours, theirs, seq_len: int = 4 * ORIGINAL_CONTEXT):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, theirs.config.vocab_size, (2, seq_len), generator=gen)
    pos = torch.arange(seq_len).expand_as(ids)
    with torch.no_grad():
        return ours(ids, pos), theirs(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers(case, tmp_path):
    theirs = make_checkpoint(case, str(tmp_path))
    ours = from_pretrained(str(tmp_path))
    a, b = logits_pair(ours, theirs)
    err = relative_error(a, b)
    print(f"{case}: relative logits error {err:.2e} at {a.shape[1]} positions")
    assert err <= TOL
    # The comparison is sensitive: without the checkpoint's RoPE scaling (or window) they differ.
    changed = {"rope_scaling": {"rope_type": "default"}} if CASES[case][1].get("rope_scaling") else \
        {"memory": {"swa_layers": []}} if case == "mistral" else None
    if changed:
        assert relative_error(logits_pair(from_pretrained(str(tmp_path), **changed), theirs)[0], b) > 10 * TOL


def test_save_pretrained_loads_in_transformers_without_warnings(tmp_path):
    make_checkpoint("qwen3", str(tmp_path / "src"))
    ours = from_pretrained(str(tmp_path / "src"))
    with torch.no_grad():  # trained weights differ from the source's
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_pretrained(ours, str(tmp_path / "out"), max_shard_bytes=50_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "generation_config.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1  # sharded
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    a, b = logits_pair(ours, theirs.float().eval())
    assert relative_error(a, b) <= TOL
    with pytest.raises(ConfigError, match="not empty"):
        save_pretrained(ours, out)


def test_config_json_is_a_layer_under_the_yaml(tmp_path):
    make_checkpoint("llama-yarn", str(tmp_path))
    cfg = load_config(None, [f"model.init_from={tmp_path}", "model.rope_theta=20000",
                             "model.rope_scaling.factor=8"])
    m = cfg.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_hidden, m.vocab_size) == (64, 2, 4, 2, 96, 300)
    assert m.norm_eps == 1e-6 and not m.tie_embeddings and m.family == "llama"
    assert m.rope_theta == 20000 and m.rope_scaling.rope_type == "yarn" and m.rope_scaling.factor == 8
    assert m.rope_scaling.original_max_position_embeddings == ORIGINAL_CONTEXT
    assert cfg.data.tokenizer == "byte"  # the folder has no tokenizer


def test_older_rope_layout_and_mistral_window(tmp_path):
    """`rope_theta` + `rope_scaling` (as older checkpoints write it) read like `rope_parameters`."""
    make_checkpoint("mistral", str(tmp_path))
    path = tmp_path / "config.json"
    hf = json.loads(path.read_text())
    hf.pop("rope_parameters")
    hf.update(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 4.0})
    path.write_text(json.dumps(hf))
    m = config_layer(str(tmp_path))["model"]
    assert m["rope_theta"] == 1e6 and m["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert m["family"] == "mistral" and m["memory"] == {"window": 48, "swa_layers": [0, 1]}


def _edit(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        hf = json.load(f)
    for k, v in changes.items():
        if v is None:
            hf.pop(k, None)
        else:
            hf[k] = v
    with open(path, "w") as f:
        json.dump(hf, f)


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "architectures=\\['GPT2LMHeadModel'\\]"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rope_type='longrope'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(quantization_config={"bits": 4}), "quantization_config"),
])
def test_unsupported_config_json_names_the_key(tmp_path, change, message):
    make_checkpoint("llama-linear", str(tmp_path))
    _edit(str(tmp_path), **change)
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model.init_from={tmp_path}"])


def test_bad_folders_fail_and_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        load_config(None, [f"model.init_from={tmp_path}"])
    with pytest.raises(ConfigError, match="is not a folder"):
        load_config(None, [f"model.init_from={tmp_path / 'nope'}"])

    folder = str(tmp_path / "ckpt")
    make_checkpoint("qwen2", folder)
    from safetensors.torch import load_file, save_file

    weights = os.path.join(folder, "model.safetensors")
    good = load_file(weights)
    name = "model.layers.1.self_attn.k_proj.bias"
    save_file({k: v for k, v in good.items() if k != name}, weights)
    with pytest.raises(ConfigError, match=f"lacks tensor '{name}'"):
        from_pretrained(folder)
    save_file({**good, name: torch.zeros(7)}, weights)
    with pytest.raises(ConfigError, match=f"tensor '{name}' has shape \\[7\\]"):
        from_pretrained(folder)
    save_file({**good, "model.layers.9.mlp.gate_proj.weight": torch.zeros(1)}, weights)
    with pytest.raises(ConfigError, match="model.layers.9.mlp.gate_proj.weight"):
        from_pretrained(folder)


def test_tokenizer_defaults_to_the_folder_and_must_fit_the_embedding(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from longctx.trainer.loop import resolve_vocab_size
    from longctx.trainer.tokenizer import build_tokenizer

    folder = str(tmp_path)
    make_checkpoint("llama-linear", folder, vocab_size=40)

    def write_tokenizer(size: int):
        vocab = {f"w{i}": i for i in range(size - 2)}
        vocab.update({"<unk>": size - 2, "</s>": size - 1})
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(os.path.join(folder, "tokenizer.json"))

    write_tokenizer(32)
    cfg = load_config(None, [f"model.init_from={folder}"])
    assert cfg.data.tokenizer == folder
    assert resolve_vocab_size(cfg, build_tokenizer(cfg.data.tokenizer)) == 40
    write_tokenizer(64)
    cfg = load_config(None, [f"model.init_from={folder}"])
    with pytest.raises(ConfigError, match="smaller than the vocabulary"):
        resolve_vocab_size(cfg, build_tokenizer(cfg.data.tokenizer))


def test_extension_preset_dry_run(tmp_path, capsys):
    """configs/llama3-8b-extend-128k.yaml with a shape-only Llama-3-8B config.json."""
    from longctx.launch.cli import main

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    preset = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "llama3-8b-extend-128k.yaml")
    assert main(["train", preset, f"model.init_from={tmp_path}", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "8,030,261,248 total" in plan and "yarn x16 over 8192 positions" in plan, plan
    cfg = load_config(preset, [f"model.init_from={tmp_path}"])
    assert cfg.model.rope_theta == 500000.0 and cfg.model.rope_scaling.rope_type == "yarn"
    assert cfg.model.rope_scaling.original_max_position_embeddings == 8192 and cfg.data.seq_len == 131072


def test_train_with_a_broken_checkpoint_fails_before_anything_is_written(tmp_path, capsys):
    """`longctx train model.init_from=...` checks config.json, tensor names and shapes on the
    driver: exit 2, the tensor named, no run folder, no MLflow run."""
    from safetensors.torch import load_file, save_file

    from longctx.launch.cli import main

    folder = str(tmp_path / "ckpt")
    make_checkpoint("llama-linear", folder)
    weights = os.path.join(folder, "model.safetensors")
    good = load_file(weights)
    save_file({**good, "model.norm.weight": torch.ones(3)}, weights)
    runs = tmp_path / "runs"
    args = ["train", "launcher=local", f"model.init_from={folder}", f"run.output_dir={runs}", "run.name=x"]
    assert main(args) == 2
    assert "tensor 'model.norm.weight' has shape [3]" in capsys.readouterr().err
    assert not runs.exists()
    os.remove(os.path.join(folder, "config.json"))
    assert main(args) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert not runs.exists()
