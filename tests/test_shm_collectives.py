"""tunelab.train.shm_collectives: shared-memory collectives equal gloo's (bit for bit on 2 ranks), in pieces
and across piece boundaries; the fallbacks (another machine, a full /dev/shm, TUNELAB_COLLECTIVES=gloo) and
the one-line errors. Real gloo process groups of 2 and 3 spawned processes, a few seconds each."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import fork_ranks
from tunelab.errors import UserError
from tunelab.train import shm_collectives as sc
from tunelab.train.launch import free_port


def _spawn(fn, world: int, out: Path, *args) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    fork_ranks(fn, (world, free_port(), str(out), *args), world)
    return [json.loads((out / f"{r}.json").read_text()) for r in range(world)]


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _equal_to_gloo(rank: int, world: int, port: int, out: str, piece_bytes: int) -> None:
    _init(rank, world, port)
    os.environ.pop(sc.CHOICE_ENV, None)
    shm, said = sc.shared_memory_group(piece_bytes=piece_bytes)
    assert shm is not None, said
    g = torch.Generator().manual_seed(rank)
    report = {"said": said, "left": sorted(p for p in os.listdir(sc.SHM_DIR) if p.startswith("tunelab-"))}
    for n in (1, 7, 1000, 12_345):  # elements per rank: within one piece and across many (piece_bytes is small)
        for dtype in (torch.bfloat16, torch.float32):
            mine = torch.randn(n, generator=g).to(dtype)
            ours, ref = torch.empty(world * n, dtype=dtype), torch.empty(world * n, dtype=dtype)
            shm.all_gather(ours, mine)
            dist.all_gather_into_tensor(ref, mine)
            in_place = torch.empty(world * n, dtype=dtype)  # FSDP2's layout: the input is the output's own chunk
            in_place[rank * n:(rank + 1) * n] = mine
            shm.all_gather(in_place, in_place[rank * n:(rank + 1) * n])
            grads = torch.randn(world * n, generator=g).to(dtype)
            summed, ref_sum = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
            shm.reduce_scatter(summed, grads)
            dist.reduce_scatter_tensor(ref_sum, grads.clone())
            mean = torch.empty(n, dtype=dtype)
            shm.reduce_scatter(mean, grads, average=True)
            key = f"{n}-{str(dtype)[6:]}"
            report[key] = {
                "all_gather": torch.equal(ours, ref), "in_place": torch.equal(in_place, ref),
                "reduce_scatter": (summed.float() - ref_sum.float()).abs().max().item(),
                "average": (mean.float() - ref_sum.float() / world).abs().max().item(),
                "scale": ref_sum.float().abs().max().item()}
    Path(out, f"{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_collectives_equal_gloo(tmp_path, world):
    reports = _spawn(_equal_to_gloo, world, tmp_path, 256)  # 256-byte pieces: most calls move many
    for report in reports:
        assert report.pop("said") == f"shared memory (/dev/shm, {world} ranks)"
        assert report.pop("left") == []  # the files are unlinked once every rank has mapped them
        assert len(report) == 8
        for key, r in report.items():
            assert r["all_gather"] and r["in_place"], key
            if world == 2:  # a + b in either order: bit for bit
                assert r["reduce_scatter"] == r["average"] == 0, (key, r)
            else:  # gloo's ring adds in another order: a rounding apart
                tol = (0.05 if "bfloat16" in key else 1e-5) * max(1.0, r["scale"])
                assert max(r["reduce_scatter"], r["average"]) <= tol, (key, r)


def _fallback(rank: int, world: int, port: int, out: str, case: str) -> None:
    _init(rank, world, port)
    os.environ.pop(sc.CHOICE_ENV, None)
    piece = 1024
    if case == "machines":  # each rank a /dev/shm of its own, as on two machines
        sc.SHM_DIR = str(Path(out, f"shm-{rank}"))
        os.makedirs(sc.SHM_DIR)
    elif case == "full":  # more than /dev/shm holds
        stat = os.statvfs(sc.SHM_DIR)
        piece = stat.f_blocks * stat.f_frsize  # twice its size: refused at once, nothing allocated
    elif case in ("gloo", "required", "bad"):
        os.environ[sc.CHOICE_ENV] = {"gloo": "gloo", "required": "shm", "bad": "nccl"}[case]
        if case == "required":
            sc.SHM_DIR = str(Path(out, f"shm-{rank}"))
            os.makedirs(sc.SHM_DIR)
    try:
        shm, said = sc.shared_memory_group(piece_bytes=piece)
        result = {"shm": shm is not None, "said": said}
    except UserError as err:
        result = {"error": str(err)}
    result["left"] = sorted(p for p in os.listdir(sc.SHM_DIR) if p.startswith("tunelab-"))
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    # a rank that raised before any collective (the unknown choice) must not exit while the other still completes
    # gloo's connection to it ("Connection closed by peer" in connectFullMesh, seen once under load)
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_that_cannot_share_memory_fall_back_to_gloo_and_say_why(tmp_path):
    machines = _spawn(_fallback, 2, tmp_path / "m", "machines")
    assert [r["shm"] for r in machines] == [False, False]
    assert machines[0]["said"] == machines[1]["said"]  # every rank gets the same answer
    assert machines[0]["said"].startswith("gloo (rank 0 does not see rank 1's file in ")
    assert machines[0]["left"] == machines[1]["left"] == []

    full = _spawn(_fallback, 2, tmp_path / "f", "full")
    assert [r["shm"] for r in full] == [False, False]
    assert full[0]["said"].startswith("gloo (rank 0 cannot reserve ") and "in /dev/shm" in full[0]["said"]
    assert full[0]["left"] == []

    off = _spawn(_fallback, 2, tmp_path / "g", "gloo")
    assert off[0] == {"shm": False, "said": "gloo (TUNELAB_COLLECTIVES=gloo)", "left": []}


def test_required_shared_memory_and_unknown_choices_are_one_line_errors(tmp_path):
    required = _spawn(_fallback, 2, tmp_path / "r", "required")
    assert required[0]["error"].startswith("TUNELAB_COLLECTIVES=shm, but rank 0 does not see rank 1's file")
    assert required[0]["error"].endswith("Unset TUNELAB_COLLECTIVES to fall back to gloo")
    bad = _spawn(_fallback, 2, tmp_path / "b", "bad")
    assert bad[0]["error"] == ("TUNELAB_COLLECTIVES=nccl is not a way tunelab knows to move a collective. "
                               "Use shm or gloo, or unset it")
    assert all("\n" not in r["error"] for r in required + bad)


def test_one_process_needs_no_shared_memory():
    assert sc.shared_memory_group() == (None, "one process")


def test_the_buffer_pool_hands_a_buffer_out_again_only_once_nothing_else_holds_it():
    pool = sc.BufferPool(keep=2)
    cpu = torch.device("cpu")
    first = pool.get((1000,), torch.bfloat16, cpu)
    first_ptr = first.data_ptr()
    view_of_first = first[10:20]  # FSDP2 keeps views (the all-gather input, the copied-out splits)
    del first
    second = pool.get((1000,), torch.bfloat16, cpu)
    assert second.data_ptr() != first_ptr  # a view still refers to the first buffer's storage
    del view_of_first
    third = pool.get((1000,), torch.bfloat16, cpu)
    assert third.data_ptr() == first_ptr  # now only the pool does: reused, no fresh pages
    assert pool.get((1000,), torch.float32, cpu).data_ptr() not in (first_ptr, second.data_ptr())  # per dtype
    fourth = pool.get((1000,), torch.bfloat16, cpu)  # both kept buffers are held: a fresh one, not kept (keep=2)
    assert len(pool.kept[1000, torch.bfloat16]) == 2 and fourth.data_ptr() not in (first_ptr, second.data_ptr())
    assert pool.get((10, 100), torch.bfloat16, cpu).shape == (10, 100)


def _deepspeed_adapter(rank: int, world: int, port: int, out: str) -> None:
    """DeepSpeedCollectives on a stand-in for DeepSpeed's comm backend (its two function attributes): what it
    moves equals gloo's; another group, a non-contiguous tensor and MAX go to the functions it replaced."""
    _init(rank, world, port)
    shm, _ = sc.shared_memory_group(piece_bytes=256)
    calls = []

    class Backend:  # deepspeed.comm's TorchBackend calls these two attributes
        def all_gather_function(self, output_tensor, input_tensor, group=None, async_op=False):
            calls.append("all_gather")
            return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)

        def reduce_scatter_function(self, output_tensor, input_tensor, op=None, group=None, async_op=False):
            calls.append("reduce_scatter max" if op == dist.ReduceOp.MAX else "reduce_scatter")
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)

    backend = Backend()
    assert sc.DeepSpeedCollectives(shm).install(backend) is None
    assert sc.DeepSpeedCollectives(shm).install(object()).endswith("has no all_gather_function / reduce_scatter_function")
    g = torch.Generator().manual_seed(rank)
    mine, grads = torch.randn(1000, generator=g), torch.randn(world * 1000, generator=g)
    gathered, ref = torch.empty(world * 1000), torch.empty(world * 1000)
    handle = backend.all_gather_function(gathered, mine, group=None, async_op=True)  # ZeRO-3's parameters: async
    handle.wait()
    dist.all_gather_into_tensor(ref, mine)
    summed, ref_sum = torch.empty(1000), torch.empty(1000)
    backend.reduce_scatter_function(summed, grads.clone(), op=dist.ReduceOp.SUM, group=dist.group.WORLD)
    dist.reduce_scatter_tensor(ref_sum, grads.clone())
    moved = list(calls)
    dp = dist.new_group(list(range(world)))  # another group of the same ranks (ZeRO's data-parallel group): moved
    backend.all_gather_function(torch.empty(world * 1000), mine, group=dp)
    alone = dist.new_group([0])  # a group of other ranks: gloo's
    if rank == 0:
        backend.all_gather_function(torch.empty(1000), mine, group=alone)
    wide = torch.empty(1000, 2)[:, 0]  # not contiguous
    backend.reduce_scatter_function(wide, grads.clone(), op=dist.ReduceOp.SUM)
    biggest = torch.empty(1000)
    backend.reduce_scatter_function(biggest, grads.clone(), op=dist.ReduceOp.MAX)
    report = {"moved": moved, "fell_back": calls[len(moved):], "all_gather": torch.equal(gathered, ref),
              "reduce_scatter": torch.equal(summed, ref_sum), "wide": torch.equal(wide, ref_sum)}
    Path(out, f"{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_deepspeeds_collectives_move_through_shared_memory_and_fall_back_for_the_rest(tmp_path):
    for rank, report in enumerate(_spawn(_deepspeed_adapter, 2, tmp_path)):
        assert report["moved"] == []  # nothing reached the functions it replaced
        assert report["fell_back"] == ["all_gather"] * (rank == 0) + ["reduce_scatter", "reduce_scatter max"]
        assert report["all_gather"] and report["reduce_scatter"] and report["wide"], report
