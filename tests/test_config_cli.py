"""Strict configuration, the `longctx` CLI, dry-runs, and fail-fast launches.

Everything here runs in-process on CPU without Ray (except two subprocess checks of
the real exit code / --help), and in seconds.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from omegaconf import OmegaConf

from longctx.config import ConfigError, load_config, to_container
from longctx.launch.cli import main
from longctx.launch.preflight import MLFLOW_HTTP_DEFAULTS, preflight, resources_needed
from longctx.trainer.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def config_error(path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ------------------------------------------------------------------ 1. strict config


@pytest.mark.parametrize("override, bad, suggestion", [
    ("train.stpes=5", "train.stpes", "train.steps"),      # typo'd leaf
    ("trian.steps=1", "trian", "train"),                  # typo'd section
    ("lr=1", "lr", "optim.lr"),                           # leaf without its section
    ("model.n_haeds=8", "model.n_haeds", "model.n_heads"),
])
def test_unknown_key_names_it_and_the_closest_valid_one(override, bad, suggestion):
    msg = config_error(None, [override])
    assert f"'{bad}'" in msg
    assert "unknown" in msg
    assert f"did you mean '{suggestion}'" in msg
    assert "command line" in msg


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  steps: 3\n  stpes: 5\n")
    msg = config_error(str(path))
    assert "'train.stpes'" in msg and "'train.steps'" in msg
    assert str(path) in msg


def test_wrong_type_in_yaml_names_the_file_and_type(tmp_path):
    path = tmp_path / "typed.yaml"
    path.write_text("train:\n  steps: abc\n")
    msg = config_error(str(path))
    assert "'train.steps'" in msg and "int" in msg and str(path) in msg


@pytest.mark.parametrize("override, key, typename", [
    ("train.steps=abc", "train.steps", "int"),
    ("optim.lr=fast", "optim.lr", "float"),
    ("logging.mlflow=maybe", "logging.mlflow", "bool"),
    ("train.steps=1.5", "train.steps", "int"),
])
def test_wrong_type_names_key_and_expected_type(override, key, typename):
    msg = config_error(None, [override])
    assert f"'{key}'" in msg
    assert f"expected {typename}" in msg


def test_bad_choice_lists_valid_choices():
    msg = config_error(None, ["data.source=foo"])
    assert "data.source" in msg and "foo" in msg
    for choice in ("synthetic", "files", "hf"):
        assert choice in msg


def test_cp_must_divide_workers():
    msg = config_error(None, ["parallel.cp=3", "ray.num_workers=4"])
    assert "parallel.cp=3" in msg
    assert "does not divide" in msg
    assert "ray.num_workers=4" in msg


def test_default_warmup_fits_a_short_run_but_a_chosen_one_must():
    assert load_config(None, ["train.steps=2"]).optim.warmup_steps == 1  # the schema's 5, clamped
    assert load_config(None, []).optim.warmup_steps == 5
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=5 is longer than the run \(train.steps=2\)"):
        load_config(None, ["train.steps=2", "optim.warmup_steps=5"])


def test_missing_yaml_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = config_error(str(path))
    assert str(path) in msg and "does not exist" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "5\n", '"just some text"\n'], ids=["list", "int", "str"])
def test_non_mapping_yaml(tmp_path, text):
    path = tmp_path / "notamap.yaml"
    path.write_text(text)
    msg = config_error(str(path))
    assert str(path) in msg
    # (tmp_path holds the test's name, which contains "mapping": look outside the path)
    assert "mapping" in msg.replace(str(path), "")


def test_invalid_yaml_syntax(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [\n")
    msg = config_error(str(path))
    assert str(path) in msg and "YAML" in msg


def test_override_without_equals():
    msg = config_error(None, ["train.steps"])
    assert "'train.steps'" in msg and "key=value" in msg


def test_section_and_value_confusion():
    assert "is a section" in config_error(None, ["train=1"])
    assert "not a section" in config_error(None, ["train.steps.x=1"])


def test_free_form_sections_accepted(tmp_path):
    cfg = load_config(None, ["deepspeed.config.zero_optimization.overlap_comm=true",
                             "deepspeed.config.gradient_clipping=0.5",
                             "parallel.options.block_size=64",
                             "parallel.options.nested.inner=x"])
    assert cfg.deepspeed.config == {"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5}
    assert cfg.parallel.options == {"block_size": 64, "nested": {"inner": "x"}}
    path = tmp_path / "ff.yaml"
    path.write_text("deepspeed:\n  config:\n    anything_goes: {a: 1}\nparallel:\n  options:\n    foo: bar\n")
    cfg = load_config(str(path))
    assert cfg.deepspeed.config == {"anything_goes": {"a": 1}}
    assert cfg.parallel.options == {"foo": "bar"}
    # ...but they must still be mappings
    assert "mapping" in config_error(None, ["parallel.options=5"])


def test_list_override_parses():
    cfg = load_config(None, ["data.source=files", "data.paths=[/abs/a.jsonl,/abs/b.jsonl]"])
    assert cfg.data.paths == ["/abs/a.jsonl", "/abs/b.jsonl"]


def test_cli_config_error_exit_code_and_prefix(capsys):
    assert main(["config", "show", "train.stpes=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longctx: error:")
    assert "'train.stpes'" in err and "'train.steps'" in err
    assert "Traceback" not in err


def test_cli_subprocess_bad_key_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "longctx.launch.cli", "config", "show", "trian.steps=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "longctx: error:" in proc.stderr and "'train'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ 2. tiny.yaml == defaults


def test_tiny_yaml_is_exactly_the_schema_defaults():
    assert to_container(load_config(TINY)) == to_container(load_config(None))


# ------------------------------------------------------------------ 3. presets dry-run


def test_there_are_presets():
    names = {os.path.basename(p) for p in PRESETS}
    assert "tiny.yaml" in names and len(names) >= 2


def preset_overrides(preset: str, folder) -> list[str]:
    """For a preset that starts from a pretrained folder: a shape-only config.json stands in."""
    if "init_from:" not in open(preset).read():
        return []
    import json

    from hf_cases import LLAMA3_8B

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    return [f"model.init_from={folder}"]


@pytest.mark.parametrize("preset", PRESETS, ids=os.path.basename)
def test_preset_dry_run(preset, tmp_path, monkeypatch, capsys):
    overrides = preset_overrides(preset, tmp_path / "pretrained")
    tmp_path = tmp_path / "cwd"
    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["train", preset, *overrides, "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(preset, overrides)
    cp, workers = cfg.parallel.cp, cfg.ray.num_workers
    assert "parameters" in out
    assert "FLOPs/token" in out
    assert "memory/GPU" in out
    assert f"world        {workers} workers" in out or f"{workers} workers" in out
    assert f"dp {workers // cp}" in out and f"cp {cp}" in out
    assert cfg.parallel.strategy in out
    assert os.listdir(tmp_path) == [], "a dry run must create no files"


def test_default_dry_run_is_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dry-run"]) == 0
    default_out = capsys.readouterr().out
    assert main(["train", TINY, "--dry-run"]) == 0
    assert capsys.readouterr().out == default_out
    assert os.listdir(tmp_path) == []


def test_dry_run_with_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dry-run", TINY, "parallel.cp=1", "ray.num_workers=4"]) == 0
    out = capsys.readouterr().out
    assert "dp 4" in out and "cp 1" in out
    assert os.listdir(tmp_path) == []


def test_dry_run_accepts_overrides_after_the_flag(tmp_path, monkeypatch, capsys):
    # `longctx train CONFIG --dry-run key=value` is the natural way to type it.
    monkeypatch.chdir(tmp_path)
    assert main(["train", TINY, "--dry-run", "parallel.cp=1", "ray.num_workers=4"]) == 0
    out = capsys.readouterr().out
    assert "dp 4" in out and "cp 1" in out
    assert os.listdir(tmp_path) == []


def test_dry_run_bad_config_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", TINY, "data.tokenizer=/no/such/tokenizer", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "longctx: error:" in err and "/no/such/tokenizer" in err
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ 4. config show / help


def test_config_show_round_trips(capsys, tmp_path):
    assert main(["config", "show", TINY, "train.steps=7"]) == 0
    out = capsys.readouterr().out
    shown = OmegaConf.create(out)
    assert shown.train.steps == 7
    assert shown.parallel.cp == 2
    # the printed YAML is itself a valid config file resolving to the same thing
    path = tmp_path / "shown.yaml"
    path.write_text(out)
    assert to_container(load_config(str(path))) == to_container(load_config(TINY, ["train.steps=7"]))


@pytest.mark.parametrize("preset", PRESETS, ids=os.path.basename)
def test_config_show_every_preset_round_trips(preset, capsys, tmp_path):
    overrides = preset_overrides(preset, tmp_path / "pretrained")
    assert main(["config", "show", preset, *overrides]) == 0
    path = tmp_path / "shown.yaml"
    path.write_text(capsys.readouterr().out)
    assert to_container(load_config(str(path))) == to_container(load_config(preset, overrides))


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help(capsys):
    out = _help(["--help"], capsys)
    for word in ("train", "config", "eval", "context parallel"):
        assert word in out


def test_train_help(capsys):
    out = _help(["train", "--help"], capsys)
    for word in ("--dry-run", "CONFIG.yaml", "key=value", "config show", "ray job submit", "memory"):
        assert word in out


def test_eval_help(capsys):
    out = _help(["eval", "--help"], capsys)
    for word in ("RUN_OR_CHECKPOINT_OR_HF_DIR", "checkpoint", "held-out", "key=value", "niah", "ppl"):
        assert word in out


def test_help_subprocess():
    proc = subprocess.run([sys.executable, "-m", "longctx.launch.cli", "train", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" in proc.stdout and "key=value" in proc.stdout


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


# ------------------------------------------------------------------ 5. fail fast, touch nothing


def _snapshot(root) -> dict:
    """Every folder and file under root -> file hash (None for folders)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                snap[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return snap


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """tmp/runs/old (an earlier run with a checkpoint), tmp/data (inputs), cwd = tmp/cwd."""
    old = tmp_path / "runs" / "old"
    (old / "checkpoints" / "step_000001").mkdir(parents=True)
    (old / "config.yaml").write_text("run:\n  name: old\n")
    (old / "checkpoints" / "step_000001" / "meta.json").write_text(json.dumps({"step": 1}))
    (old / "checkpoints" / "step_000001" / "engine.bin").write_bytes(os.urandom(64))
    (old / "eval_results.json").write_text(json.dumps({"eval/loss": 1.0}))
    data = tmp_path / "data"
    data.mkdir()
    (data / "empty.jsonl").write_text("")
    (data / "notext.jsonl").write_text(json.dumps({"body": "hello"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key in MLFLOW_HTTP_DEFAULTS:  # the MLflow preflight sets these: undone after the test
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return tmp_path


BAD_INPUTS = {
    "unknown_key": (["train.stpes=5"], ["train.stpes", "train.steps"]),
    "wrong_type": (["train.steps=abc"], ["train.steps", "int"]),
    "missing_file": (["data.source=files", "data.paths=[{data}/missing.jsonl]"],
                     ["{data}/missing.jsonl", "does not exist"]),
    "empty_file": (["data.source=files", "data.paths=[{data}/empty.jsonl]"],
                   ["{data}/empty.jsonl", "is empty"]),
    "no_text_field": (["data.source=files", "data.paths=[{data}/notext.jsonl]"],
                      ["{data}/notext.jsonl", "text_field", "'text'", "body"]),
    "missing_tokenizer": (["data.tokenizer=/no/such/tokenizer"], ["data.tokenizer", "/no/such/tokenizer"]),
    "cp_not_dividing": (["parallel.cp=3", "ray.num_workers=4"], ["parallel.cp=3", "does not divide", "ray.num_workers=4"]),
    "missing_resume": (["checkpoint.resume=/no/such/ckpt"], ["checkpoint.resume", "/no/such/ckpt"]),
    "existing_run_resume_none": (["run.name=old", "checkpoint.resume=none"],
                                 ["already holds checkpoints", "checkpoint.resume=auto", "run.name",
                                  "nothing was changed"]),
    "negative_lr": (["optim.lr=-1"], ["optim.lr", "> 0"]),
    "beta2_one": (["optim.beta2=1.0"], ["optim.beta2", "[0, 1)"]),
    "warmup_longer_than_run": (["optim.warmup_steps=50", "train.steps=10"],
                               ["optim.warmup_steps=50", "train.steps=10", "optim.warmup_steps=1"]),
    "max_bad_steps_zero": (["train.max_bad_steps=0"], ["train.max_bad_steps", ">= 1"]),
    # {port}: a closed port on 127.0.0.1 (connection refused)
    "mlflow_server_down": (["logging.tracking_uri=http://127.0.0.1:{port}"],
                           ["http://127.0.0.1:{port}", "logging.tracking_uri", "does not answer",
                            "logging.mlflow=false"]),
    "embedded_ray_over_asked": (["launcher=ray", "ray.num_workers=64"],
                                ["ray.num_workers=64", "ray.cpus_per_worker=1", "64 CPUs", "ray.address"]),
    "ray_address_down": (["launcher=ray", "ray.address=127.0.0.1:{port}"],
                         ["127.0.0.1:{port}", "ray.address", "does not answer"]),
}
FAIL_FAST_S = 20.0  # what every bad input may cost, generously (most take well under 5 s)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_fast_and_touches_nothing(case, workspace, capsys):
    runs, data = workspace / "runs", workspace / "data"
    before_runs, before_data = _snapshot(runs), _snapshot(data)
    overrides, words = BAD_INPUTS[case]
    fill = {"data": data, "port": free_port()}
    overrides = [o.format(**fill) for o in overrides]
    start = time.monotonic()
    rc = main(["train", "launcher=local", f"run.output_dir={runs}", *overrides])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "longctx: error:" in err
    assert "Traceback" not in err
    assert seconds < FAIL_FAST_S, f"{case} took {seconds:.1f} s to fail"
    bare = err.replace(str(workspace), "<tmp>")  # so words are not found inside the test's own paths
    for word in words:
        if "{data}" in word:
            assert word.format(**fill) in err, (word, err)
        else:
            assert word.format(**fill) in bare, (word, err)
    if "ray" in sys.modules:  # Ray checks fail before an embedded Ray is started
        assert not sys.modules["ray"].is_initialized()
    assert _snapshot(runs) == before_runs, "the earlier run was modified or a new run folder appeared"
    assert sorted(os.listdir(runs)) == ["old"]
    assert _snapshot(data) == before_data
    assert os.listdir(workspace / "cwd") == []
    assert sorted(os.listdir(workspace)) == ["cwd", "data", "runs"]


def test_bad_input_creates_no_output_dir(workspace, capsys):
    fresh = workspace / "fresh"
    rc = main(["train", "launcher=local", f"run.output_dir={fresh}", "checkpoint.resume=/no/such/ckpt"])
    assert rc == 2
    assert "/no/such/ckpt" in capsys.readouterr().err
    assert not fresh.exists()


def test_cli_subprocess_mlflow_server_down(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *MLFLOW_HTTP_DEFAULTS)}
    env["MLFLOW_TRACKING_URI"] = uri
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "longctx.launch.cli", "train", "launcher=local",
                           f"run.output_dir={tmp_path / 'runs'}"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert "longctx: error:" in proc.stderr and uri in proc.stderr and "$MLFLOW_TRACKING_URI" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < FAIL_FAST_S, f"took {seconds:.1f} s to fail"
    assert os.listdir(tmp_path) == []


class _FakeMlflow(BaseHTTPRequestHandler):
    """/health 404 (a proxy that only forwards the API); the REST API answers unless `api` is False."""

    api = True

    def do_GET(self):
        code = 200 if self.api and self.path != "/health" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}" if code == 200 else b"not found")
        self.server.paths.append(self.path)

    def log_message(self, *args):
        pass


def _preflight_against_fake_mlflow(api: bool) -> tuple[str, list[str], list[str]]:
    """(the URI, preflight's notes or [the error], the paths the server was asked for)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_FakeMlflow,), {"api": api}))
    server.paths = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        notes = preflight(load_config(None, ["launcher=local", f"logging.tracking_uri={uri}"]))
    except ConfigError as err:
        notes = [str(err)]
    finally:
        server.shutdown()
        server.server_close()
    return uri, notes, server.paths


def test_mlflow_preflight_falls_back_to_the_api_behind_a_proxy(workspace):
    uri, notes, paths = _preflight_against_fake_mlflow(api=True)
    assert paths == ["/health", "/api/2.0/mlflow/experiments/search?max_results=1"]
    assert any(uri in n and "answers" in n for n in notes), notes
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == MLFLOW_HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_mlflow_preflight_rejects_a_server_without_the_api(workspace):
    uri, notes, paths = _preflight_against_fake_mlflow(api=False)
    assert len(paths) == 2
    assert uri in notes[0] and "not an MLflow tracking server" in notes[0] and "logging.mlflow=false" in notes[0]


def test_preflight_passes_the_local_defaults(workspace):
    """Local SQLite MLflow and an embedded Ray that fits: no network, no files."""
    cfg = load_config(None, ["ray.num_workers=1", "parallel.cp=1"])
    notes = preflight(cfg)
    assert any("embedded local Ray" in n for n in notes)
    assert os.listdir(workspace / "cwd") == []


def test_resources_needed():
    cfg = load_config(None, ["ray.num_workers=8", "ray.cpus_per_worker=2"])
    assert resources_needed(cfg) == {"CPU": 16.0, "GPU": 0}
    cfg = load_config(None, ["ray.num_workers=4", "ray.use_gpu=true"])
    assert resources_needed(cfg) == {"CPU": 4.0, "GPU": 4}
