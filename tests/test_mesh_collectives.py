"""Metric and evaluation collectives go through `Mesh.all_reduce` / `Mesh.all_gather`, whose
tensors live on the mesh's compute device (NCCL rejects CPU tensors)."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from distributed_utils import run_distributed
from longctx.parallel import mesh as mesh_mod
from longctx.parallel.mesh import Mesh


class _Handed(Exception):
    """Raised by the fake collective once it has seen the tensor it was handed."""


@pytest.mark.parametrize("call", ["all_reduce", "all_gather"])
@pytest.mark.parametrize("group", ["world", "dp", "cp"])
def test_collective_tensors_live_on_the_mesh_device(call, group, monkeypatch):
    seen = []

    def fake(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, list) for t in a]
        seen.extend(t.device for t in tensors)
        raise _Handed

    monkeypatch.setattr(mesh_mod.dist, call, fake)
    device = torch.device("meta")  # any device but the default CPU one
    mesh = Mesh(world_size=4, rank=1, dp_size=2, cp_size=2, cp_group="cp", dp_group="dp", grad_group="world",
                device=device)
    with pytest.raises(_Handed):
        mesh.all_reduce([1.0, 2.0], group=group) if call == "all_reduce" else mesh.all_gather(1.0, group=group)
    assert seen and all(d == device for d in seen)


def test_one_rank_groups_issue_no_collective(monkeypatch):
    monkeypatch.setattr(mesh_mod.dist, "all_reduce", lambda *a, **k: pytest.fail("no collective for one rank"))
    mesh = Mesh(world_size=2, rank=0, dp_size=2, cp_size=1, device=torch.device("meta"))
    assert mesh.all_reduce([3.0], group="cp") == [3.0]
    with pytest.raises(ValueError, match="unknown mesh group 'tp'"):
        mesh.all_reduce([1.0], group="tp")


def _body(rank, world):
    from longctx.parallel import build_mesh

    mesh = build_mesh(2)  # dp 2 x cp 2
    return (mesh.all_reduce([rank, 1.0], group="cp"), mesh.all_reduce([rank], group="dp", op="max"),
            mesh.all_reduce([rank], group="world"), mesh.all_gather(10.0 * rank, group="cp"))


@pytest.mark.distributed
def test_mesh_collectives_over_gloo():
    out = run_distributed(_body, 4, timeout=120)
    for rank, (cp_sum, dp_max, world_sum, gathered) in enumerate(out):
        pair = [rank - rank % 2, rank - rank % 2 + 1]
        assert cp_sum == [float(sum(pair)), 2.0]
        assert dp_max == [float(2 + rank % 2)]
        assert world_sum == [6.0]
        assert gathered == [10.0 * r for r in pair]


def test_trainer_issues_collectives_only_through_the_mesh():
    """No module of the trainer calls a torch.distributed collective itself."""
    trainer = pathlib.Path(__file__).resolve().parents[1] / "longctx" / "trainer"
    pattern = re.compile(r"dist\.(all_reduce|all_gather|reduce|broadcast|gather|scatter)\(")
    offenders = [f"{p.name}:{i + 1}" for p in sorted(trainer.glob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not offenders, offenders
