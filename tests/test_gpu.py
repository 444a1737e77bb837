"""One command to check a machine with a GPU: `python -m pytest -m gpu -q -s` (sized for under 10
minutes on one H100-class GPU; not yet timed on one). Without CUDA every `gpu` test is skipped.

(a) Triton attention (`longctx.kernels.attention(..., backend="triton")`, bf16) against torch SDPA:
    accuracy at 4k tokens (causal, and causal inside long-tailed documents; GQA 16/4 heads,
    head dim 128): the max abs error of out, dq, dk, dv against an fp32 reference (the torch
    backend) must be at most 2 x SDPA bf16's own error + 8e-3 (the bf16 floor of
    test_kernels_triton_gpu.py, whose CUDA checks are `gpu` too); then TFLOP/s (visible pairs,
    fwd = 4*B*H*D*pairs, bwd 2.5x) of fwd, bwd and fwd+bwd at 8k, 16k and 32k tokens, causal and
    with documents, next to SDPA flash (causal only: it takes no document mask), through
    `longctx bench kernels`' own timing.
(b) Gated-memory ops on CUDA (chunk path, with the Triton chunk scan where the state fits)
    against their naive token loops: outputs and every gradient within relative RMSE 1e-4 (fp32,
    TF32 off), plus the scan kernel alone against the torch loop and the token recurrence.
(c) One training step of a ~1.0B-parameter Llama at 32k tokens on one GPU: the Trainer with
    DeepSpeed ZeRO-2 over NCCL (world 1), bf16, activation checkpointing, in a fresh process
    (`longctx bench train`'s probe); peak memory and MFU are reported.
(d) `longctx bench train` at small sizes on the GPU through the CLI (grid, skip reasons, a
    max-memory search), JSON and PNG.

Figures go to the JSON file named by $LONGCTX_GPU_REPORT (default: gpu_report.json in pytest's
base temporary folder), rewritten after every test, and are printed with `-s`. (c) and (d) need
omegaconf and (c) DeepSpeed: where an image lacks them they are skipped, naming the module.

The helpers (TFLOP/s figures, the accuracy comparison, the report writer, the 1B config) run on
CPU in the unmarked tests at the end, so the default `python -m pytest -q` exercises them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()


def gpu_test(fn):
    """A CUDA check: marked `gpu` (`python -m pytest -m gpu`), skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")(fn))


def need(*modules: str) -> None:
    """Skip, naming the module, where this image lacks one."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"needs the Python module '{name}', not installed here (pip install -e . installs it)")


# ---------------------------------------------------------------------------------------- report


class GpuReport:
    """Sections of figures, written as JSON to `path` after every addition."""

    def __init__(self, path: str):
        self.path = path
        self.data: dict = {"device": torch.cuda.get_device_name() if HAS_CUDA else "cpu",
                           "torch": torch.__version__, "sections": {}}

    def add(self, section: str, entry: dict) -> None:
        self.data["sections"].setdefault(section, []).append(entry)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=2, default=_jsonable)
        os.replace(self.path + ".tmp", self.path)
        print(f"\n[gpu report] {section}: " + ", ".join(f"{k}={_short(v)}" for k, v in entry.items()))


def _jsonable(value):
    return value if isinstance(value, (int, float, str)) else str(value)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = os.environ.get("LONGCTX_GPU_REPORT") or str(tmp_path_factory.getbasetemp() / "gpu_report.json")
    rep = GpuReport(path)
    yield rep
    if rep.data["sections"]:
        print(f"\n[gpu report] written to {path}")


@pytest.fixture
def exact_fp32():
    """fp32 matmuls in full precision (no TF32) for the references."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


# ---------------------------------------------------------------------------------------- (a) attention

BF16_FLOOR = 8e-3  # the bf16 floor of tests/test_kernels_triton_gpu.py


def attention_inputs(S: int, mask: str, *, H=16, H_kv=4, D=128, B=1, device="cuda", seed=0):
    """fp32 q, k, v, dout [B, S, H(, H_kv), D] and doc ids (lognormal lengths, median 512) or None."""
    from longctx.bench.kernels import long_tailed_doc_ids

    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(B, S, H, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, S, H_kv, D, generator=g) for _ in range(2))
    docs = torch.stack([long_tailed_doc_ids(S, seed=b, median=512.0) for b in range(B)]) if mask == "docs" else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(q), to(k), to(v), to(dout), to(docs)


def _sdpa(q, k, v, docs):
    """torch SDPA in q's dtype: is_causal (flash) without documents, a dense mask with them."""
    import torch.nn.functional as F

    G = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)))
    if docs is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    else:
        S = q.shape[1]
        mask = (docs[:, :, None] == docs[:, None, :]) & torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None])
    return out.transpose(1, 2)


def attention_errors(S: int, mask: str, *, backend="triton", dtype=torch.bfloat16, device="cuda", **shape) -> dict:
    """Max abs errors of out, dq, dk, dv against the fp32 torch reference: ours (`backend` in
    `dtype`) and SDPA's (in `dtype`)."""
    from longctx.kernels import attention

    q, k, v, dout, docs = attention_inputs(S, mask, device=device, **shape)

    def run(fn, dt):
        leaves = [t.detach().to(dt, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout.to(dt))
        return [out.detach().float()] + [t.grad.float() for t in leaves]

    ref = run(lambda a, b, c: attention(a, b, c, q_doc=docs, k_doc=docs, backend="torch"), torch.float32)
    ours = run(lambda a, b, c: attention(a, b, c, q_doc=docs, k_doc=docs, backend=backend), dtype)
    sdpa = run(lambda a, b, c: _sdpa(a, b, c, docs), dtype)
    names = ("out", "dq", "dk", "dv")
    err = lambda xs: {n: (x - r).abs().max().item() for n, x, r in zip(names, xs, ref)}  # noqa: E731
    finite = all(bool(torch.isfinite(x).all()) for x in ours)
    return {"ours": err(ours), "sdpa": err(sdpa), "finite": finite}


def tolerance_failures(errors: dict, floor: float = BF16_FLOOR) -> list[str]:
    """What breaks `ours <= 2 * sdpa + floor` (empty = within tolerance)."""
    bad = [] if errors["finite"] else ["non-finite output or gradient"]
    for name, e in errors["ours"].items():
        bound = 2 * errors["sdpa"][name] + floor
        if not e <= bound:
            bad.append(f"{name}: {e:.3g} > 2 x SDPA {errors['sdpa'][name]:.3g} + {floor:g}")
    return bad


def attention_figures(seq_lens, masks, impls, *, device="cuda", dtype="bf16", heads=16, kv_heads=None,
                      head_dim=128, reps=5) -> list[dict]:
    """Rows {impl, mask, seq, mode, ms, tflops, note} from `longctx bench kernels`' own timing."""
    from longctx.bench import kernels

    ns = argparse.Namespace(seq_lens=",".join(map(str, seq_lens)), batch=1, heads=heads, kv_heads=kv_heads,
                            head_dim=head_dim, dtype=dtype, impls=",".join(impls), masks=",".join(masks),
                            modes="fwd,bwd,fwd+bwd", reps=reps, sdpa_mask_max=16384, device=device,
                            window=None)
    return kernels.run(ns)["tables"][0]["rows"]


@gpu_test
@pytest.mark.parametrize("mask", ["causal", "docs"])
def test_triton_attention_bf16_accuracy_vs_sdpa(monkeypatch, exact_fp32, report, mask):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    errors = attention_errors(4096, mask)
    report.add("attention_accuracy", {"seq": 4096, "mask": mask, "heads": "16/4", "head_dim": 128,
                                      **{f"triton_{k}": v for k, v in errors["ours"].items()},
                                      **{f"sdpa_{k}": v for k, v in errors["sdpa"].items()}})
    assert not tolerance_failures(errors), tolerance_failures(errors)


@gpu_test
def test_triton_attention_tflops_8k_to_32k(monkeypatch, report):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = attention_figures([8192, 16384, 32768], ["causal", "docs"], ["triton", "sdpa-flash"])
    for r in rows:
        report.add("attention_tflops", {k: r[k] for k in ("impl", "mask", "seq", "mode", "ms", "tflops", "note")})
    ours = [r for r in rows if r["impl"] == "triton"]
    assert len(ours) == 3 * 2 * 3
    slow = [r for r in ours if not r["tflops"] > 1.0]  # a compiled kernel, not an interpreter or a fallback
    assert not slow, slow


# ---------------------------------------------------------------------------------------- (b) memory ops

@gpu_test
@pytest.mark.parametrize("case", ["titans-linear", "titans-mlp", "gsa", "fifo"])
def test_memory_ops_on_cuda_match_naive(monkeypatch, exact_fp32, report, case):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from test_memory import CASES, assert_close_all, packed_docs

    from longctx.models.memory import build_memory

    name, opts, chunk = CASES[case]
    torch.manual_seed(0)
    m = build_memory(name, 64, 4, chunk_size=4 * chunk, **opts).cuda()
    x = torch.randn(2, 256, 64, device="cuda", requires_grad=True)
    doc = packed_docs(2, 256, [[40, 100, 3, 113], [256]]).cuda()
    errs = assert_close_all(m, x, doc)  # relative RMSE of the output and every gradient < 1e-4
    report.add("memory_ops", {"module": case, "tokens": 256, "max_rel_rmse": max(errs.values())})


@gpu_test
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "diagonal"])
def test_chunk_scan_kernel_on_cuda(monkeypatch, dense):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from test_recurrence_triton import REL, _inputs, rel

    from longctx.kernels.memory import affine_scan, naive_recurrence, scan_torch, select_backend

    x0, b, t = (z.cuda() for z in _inputs(3, 9, 48, 40, dense))
    assert select_backend("auto", x0, (48, 40, dense)) == "triton"
    kw = (lambda tt: {"t": tt}) if dense else (lambda tt: {"gamma": tt})
    a = [z.clone().requires_grad_() for z in (x0, b, t)]
    c = [z.clone().requires_grad_() for z in (x0, b, t)]
    s1, f1 = affine_scan(a[0], a[1], **kw(a[2]), backend="triton")
    s2, f2 = scan_torch(c[0], c[1], **kw(c[2]))
    T = t if dense else torch.diag_embed(t)
    f3 = torch.stack([naive_recurrence(x0[g], [(T[g, i], b[g, i]) for i in range(9)]) for g in range(3)])
    assert rel(f1, f3) < REL and rel(s1, s2) < REL and rel(f1, f2) < REL
    ws, wf = torch.randn_like(s2), torch.randn_like(f2)
    for g1, g2 in zip(torch.autograd.grad((s1 * ws).sum() + (f1 * wf).sum(), a),
                      torch.autograd.grad((s2 * ws).sum() + (f2 * wf).sum(), c)):
        assert rel(g1, g2) < REL


# ---------------------------------------------------------------------------------------- (c) 1B at 32k

def one_gpu_1b_config(seq_len: int = 32768):
    """~1.0B Llama (`longctx bench train`'s GPU shape), one rank, DeepSpeed ZeRO-2, bf16,
    activation checkpointing, one synthetic document per row (so MFU's causal count holds)."""
    from longctx.bench.train import GPU_OVERRIDES
    from longctx.config import load_config

    return load_config(None, GPU_OVERRIDES + [
        "train.engine=deepspeed", "deepspeed.zero_stage=2", "parallel.cp=1", "ray.num_workers=1",
        "parallel.strategy=ring", f"data.seq_len={seq_len}", f"data.min_doc_len={4 * seq_len}",
        f"data.max_doc_len={4 * seq_len}", "train.steps=4", "optim.warmup_steps=3", "logging.mlflow=false",
        "checkpoint.every=0", "train.eval_every=0"])


@gpu_test
def test_one_training_step_1b_32k_deepspeed_nccl(report):
    need("omegaconf", "yaml", "tqdm", "deepspeed")
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total < 40:
        pytest.skip(f"a 1B model at 32k tokens needs about 40 GiB; this GPU has {total:.0f} GiB")
    from longctx.bench.train import measure
    from longctx.models.estimate import count_params

    cfg = one_gpu_1b_config(32768)
    res = measure({"device": "cuda", "threads": 1, "timeout": 900.0}, cfg, warmup=1, steps=2)
    assert res["status"] == "ok", res
    params = count_params(cfg.model, cfg.model.vocab_size)
    report.add("train_1b_32k", {"params": params, "seq_len": 32768, "tokens_per_s": res["tokens_per_s"],
                                "step_s": res["step_s"], "mfu": res["mfu"], "peak_gib": res["peak_gib"],
                                "gpu_gib": total, "loss": res["loss"]})
    assert math.isfinite(res["loss"]) and 0 < res["peak_gib"] < total
    assert math.isnan(res["mfu"]) or 0.05 < res["mfu"] < 1.0  # NaN: a GPU without a known peak


# ---------------------------------------------------------------------------------------- (d) bench train

SMALL = ["model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=1024",
         "model.vocab_size=0"]


@gpu_test
def test_bench_train_small_on_gpu(tmp_path, report):
    need("omegaconf", "yaml", "tqdm")
    out_json, out_png = tmp_path / "bench_train.json", tmp_path / "bench_train.png"
    cmd = [sys.executable, "-m", "longctx.launch.cli", "bench", "train", *SMALL, "--seq-lens", "4096,8192",
           "--cps", "1,2", "--strategies", "ring", "--steps", "2", "--engine", "ddp", "--max-mem-gib", "1.0",
           "--search-cps", "1", "--search-max", "131072", "--json", str(out_json)]
    if importlib.util.find_spec("matplotlib"):
        cmd += ["--plot", str(out_png)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    print(done.stdout)
    result = json.loads(out_json.read_text())
    rows = [r for r in result["configs"] if r["status"] == "ok"]
    assert {(r["seq_len"], r["cp"]) for r in rows} >= {(4096, 1), (8192, 1)}
    for r in rows:
        report.add("bench_train", {k: r[k] for k in ("seq_len", "cp", "strategy", "tokens_per_s", "step_s", "mfu",
                                                     "peak_gib")})
        assert r["tokens_per_s"] > 0 and r["peak_gib"] > 0
    if torch.cuda.device_count() < 2:
        assert any("GPUs" in s["reason"] for s in result["skipped"] if s["cp"] == 2)
    (s,) = result["search"]
    report.add("bench_train_search", {k: s[k] for k in ("cp", "limit_gib", "max_seq_len", "its_gib",
                                                        "first_not_fitting", "probes_run")})
    assert s["max_seq_len"] is None or s["its_gib"] <= 1.0


# ---------------------------------------------------------------------------------------- helpers, on CPU

def test_report_writer_and_figures_on_cpu(tmp_path):
    """The report file and the TFLOP/s figures (the kernels bench's formula) without a GPU."""
    from longctx.kernels import visible_pairs

    rep = GpuReport(str(tmp_path / "sub" / "r.json"))
    rows = attention_figures([256], ["causal", "docs"], ["torch"], device="cpu", dtype="fp32", heads=2,
                             head_dim=32, reps=1)
    assert {(r["mask"], r["mode"]) for r in rows} == {(m, o) for m in ("causal", "docs")
                                                      for o in ("fwd", "bwd", "fwd+bwd")}
    pairs = visible_pairs(torch.arange(256), torch.arange(256), causal=True)
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0
        rep.add("attention_tflops", r)
        if r["mask"] == "causal":
            factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[r["mode"]]
            assert r["tflops"] == pytest.approx(4 * 2 * 32 * pairs * factor / (r["ms"] * 1e-3) / 1e12)
    data = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert len(data["sections"]["attention_tflops"]) == 6 and data["device"] == "cpu"


def test_accuracy_comparison_on_cpu():
    """The accuracy check's code path on CPU: torch backend in fp32 (ours = the reference) vs CPU SDPA."""
    for mask in ("causal", "docs"):
        errors = attention_errors(192, mask, backend="torch", dtype=torch.float32, device="cpu", H=4, H_kv=2, D=32)
        assert errors["finite"] and max(errors["ours"].values()) == 0.0
        assert max(errors["sdpa"].values()) < 1e-4
        assert not tolerance_failures(errors, floor=0.0)
    bad = {"ours": {"out": 1.0}, "sdpa": {"out": 0.1}, "finite": True}
    assert tolerance_failures(bad) == ["out: 1 > 2 x SDPA 0.1 + 0.008"]


def test_one_gpu_1b_config_on_cpu():
    from longctx.models.estimate import count_params

    cfg = one_gpu_1b_config(32768)
    assert 0.9e9 < count_params(cfg.model, cfg.model.vocab_size) < 1.2e9
    assert (cfg.train.dtype, cfg.train.activation_checkpointing, cfg.train.engine, cfg.parallel.cp) == \
        ("bf16", True, "deepspeed", 1)
