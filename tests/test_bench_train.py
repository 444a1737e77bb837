"""`longctx bench train` through the CLI: a small grid with JSON and PNG, a max-memory search
under a small limit, and bad input failing with a message that names it (about 25 s on 2 cores)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from longctx.launch.cli import main

LIMIT = 0.08  # GiB over the pre-model baseline: a 2-layer model fits ~2.5k tokens at cp=1


@pytest.mark.distributed
def test_bench_train_grid_json_png_and_search(tmp_path):
    out_json, out_png = tmp_path / "t.json", tmp_path / "t.png"
    cmd = [sys.executable, "-m", "longctx.launch.cli", "bench", "train", "model.n_layers=2",
           "--seq-lens", "256,254", "--cps", "1,2", "--strategies", "ring,zigzag", "--steps", "1", "--warmup", "1",
           "--engine", "ddp", "--max-mem-gib", str(LIMIT), "--mem-basis", "over-baseline", "--search-cps", "1",
           "--search-block", "256", "--search-max", "8192", "--json", str(out_json), "--plot", str(out_png)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "longctx bench train on" in done.stdout and "skipped configurations" in done.stdout
    result = json.loads(out_json.read_text())
    assert out_png.stat().st_size > 10_000

    # one row per grid point: measured or skipped with a reason
    grid = {(s, c, st) for s in (256, 254) for c in (1, 2) for st in ("ring", "zigzag")}
    rows = {(r["seq_len"], r["cp"], r["strategy"]): r for r in result["configs"]}
    skipped = {(r["seq_len"], r["cp"], r["strategy"]): r["reason"] for r in result["skipped"]}
    assert not set(rows) & set(skipped) and set(rows) | set(skipped) == grid
    assert set(rows) == {(256, 1, "ring"), (256, 2, "ring"), (256, 2, "zigzag"), (254, 1, "ring")}
    assert "not divisible by 2*cp = 4" in skipped[(254, 2, "ring")]
    assert "cp=1" in skipped[(256, 1, "zigzag")]
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and math.isfinite(r["loss"])
        assert len(r["peak_gib_per_rank"]) == r["cp"] and min(r["peak_gib_per_rank"]) > 0
        assert r["peak_gib"] == max(r["peak_gib_per_rank"])
        assert 0 < r["over_baseline_gib"] < r["peak_gib"]
        assert math.isnan(r["mfu"])  # no known peak FLOP/s on a CPU
    assert result["tables"][0]["rows"] == result["configs"]

    # the search: longest multiple of the granularity whose peak fits; the next one does not
    (s,) = result["search"]
    assert (s["cp"], s["strategy"], s["granularity"], s["basis"]) == (1, "ring", 512, "over-baseline")
    assert s["max_seq_len"] is not None, s
    assert s["max_seq_len"] % 512 == 0 and s["its_gib"] <= LIMIT
    probes = {p["seq_len"]: p for p in s["probes"]}
    assert all(p["fits"] == (p["status"] == "ok" and p["gib"] <= LIMIT) for p in probes.values())
    assert probes[s["max_seq_len"]]["fits"]
    if s["first_not_fitting"] is not None:
        assert not probes[s["first_not_fitting"]]["fits"]
        assert 0 < s["first_not_fitting"] - s["max_seq_len"] <= 512
    assert s["probes_run"] >= 1


def test_bench_train_bad_input_is_named(capsys):
    with pytest.raises(SystemExit, match="unknown CP strategy 'ringg'"):
        main(["bench", "train", "--strategies", "ring,ringg"])
    with pytest.raises(SystemExit, match="--cps expects comma-separated positive integers"):
        main(["bench", "train", "--cps", "0"])
    with pytest.raises(SystemExit, match="unknown engine 'fsdp'"):
        main(["bench", "train", "--engine", "fsdp"])
    assert main(["bench", "train", "model.dimm=64"]) == 2  # the config's own strict checks
    assert "unknown config key 'model.dimm'" in capsys.readouterr().err
