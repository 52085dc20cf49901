"""Collectives through shared memory for the ranks of one machine on gloo (the CPU).

gloo moves every byte between two ranks of one machine through loopback TCP: into the kernel and
out again, with its own threads beside. Two ranks on this 2-core machine, one thread each (all
per call, median of 10, ``docs/scaling.md``):

=====================================  =======  =============
collective                             gloo     shared memory
=====================================  =======  =============
all-gather, 11M bf16 elements (output)  10.2 ms  3.6 ms
reduce-scatter, 11M fp32 elements       48.2 ms  6.0 ms
(gloo's all-reduce of the same)         25.6 ms
=====================================  =======  =============

FSDP2 on gloo all-gathers every layer twice and reduce-scatters its gradients once per micro-batch,
so these were a third of a 32-layer FSDP step. Nothing in the libraries does it: gloo has no
shared-memory transport, torch's symmetric memory is CUDA's, and DeepSpeed's ``shm_comm`` op only
all-reduces, for inference. So this is ours: a :class:`SharedMemoryGroup` with ``all_gather`` and
``reduce_scatter``, plugged into FSDP2 through its public ``set_custom_all_gather`` /
``set_custom_reduce_scatter`` (:class:`FSDPAllGather`, :class:`FSDPReduceScatter`) and into DeepSpeed
through its comm backend's function attributes (:class:`DeepSpeedCollectives`). DDP keeps gloo's
all-reduce: gloo runs it in its own thread beside the backward, and a synchronous one through
shared memory was no faster (``engines.DDP``).

How it works. Each rank owns a region of ``/dev/shm`` that every rank of the group maps: two
buffers of ``piece_bytes``. A collective moves its data in pieces; for each piece a rank copies its
part into its own buffer, all ranks meet at a gloo barrier, and each reads what it needs from the
others' buffers. The pieces use the two buffers in turn, so one barrier per piece is enough: a rank
writes a buffer again two pieces later, after the barrier of the piece between, which every rank
reaches only once it has read the buffer. Every rank sums the same values in the same rank order,
so the results are those of gloo bit for bit on two ranks (tested; on more ranks gloo's ring adds
in another order, a rounding apart). The files are unlinked once every rank has mapped them, so
nothing is left in ``/dev/shm``, even after a SIGKILL.

When it is used: a group of several ranks on gloo whose ranks all map one another's files (one
machine; a rank on another machine cannot, and the whole group stays on gloo), with
``2 x piece_bytes`` free in ``/dev/shm`` on each (reserved with ``posix_fallocate``, so a full
``/dev/shm`` is a fallback, not a SIGBUS mid-step). ``TUNELAB_COLLECTIVES=gloo`` turns it off;
``TUNELAB_COLLECTIVES=shm`` makes its absence an error. ``env.json`` says which ran
(``distributed.collectives``).
"""

from __future__ import annotations

import math
import os
import uuid

import torch

from tunelab.errors import UserError

#: Each buffer's most: a piece of a collective. Every rank maps its group's 2 x world buffers
#: (64 MiB of shared pages on 2 ranks); 16 MiB pieces keep the barriers to a few hundred a 32-layer step.
PIECE_BYTES = 16 << 20
SHM_DIR = "/dev/shm"
CHOICE_ENV = "TUNELAB_COLLECTIVES"


class SharedMemoryGroup:
    """The collectives of ``group``'s ranks through their shared buffers (see the module's docstring). Made
    by :func:`shared_memory_group`; every rank must call the same collectives with the same sizes, in
    the same order (as for gloo's)."""

    def __init__(self, group, buffers: list[list[torch.Tensor]]):
        import torch.distributed as dist

        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.buffers = buffers  # [rank][0 or 1]: uint8 views of the mapped files
        self.piece_bytes = buffers[0][0].numel()
        self.pieces = 0  # pieces moved so far: which of the two buffers the next one uses

    def _next(self) -> list[torch.Tensor]:
        """The buffers of every rank for the next piece, once this rank may write its own."""
        which = self.pieces & 1
        self.pieces += 1
        return [own[which] for own in self.buffers]

    def _barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """``output`` (contiguous, ``size x input.numel()`` elements of input's dtype) gets every rank's
        ``input`` in rank order. ``input`` may be ``output``'s own chunk (FSDP2 gathers in place)."""
        n = input.numel() * input.element_size()
        mine = input.reshape(-1).view(torch.uint8)
        out = output.reshape(-1).view(torch.uint8).view(self.size, n)
        for start in range(0, n, self.piece_bytes):
            end = min(n, start + self.piece_bytes)
            buffers = self._next()
            buffers[self.rank][: end - start].copy_(mine[start:end])
            self._barrier()
            for q, buffer in enumerate(buffers):
                if q != self.rank:
                    out[q, start:end].copy_(buffer[: end - start])
        if out[self.rank].data_ptr() != mine.data_ptr():
            out[self.rank].copy_(mine)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, average: bool = False) -> None:
        """``output`` (``input.numel() / size`` elements) gets the sum over the ranks of this rank's chunk of
        ``input`` (or their mean: ``average``), summed in rank order."""
        rows = input.reshape(self.size, -1)
        out = output.reshape(-1)
        m = rows.shape[1]
        step = max(1, self.piece_bytes // (self.size * rows.element_size()))
        for start in range(0, m, step):
            end = min(m, start + step)
            buffers = [b.view(rows.dtype)[: self.size * (end - start)].view(self.size, end - start)
                       for b in self._next()]
            buffers[self.rank].copy_(rows[:, start:end])
            self._barrier()
            total = out[start:end]
            if self.size == 1:
                total.copy_(buffers[0][0])
            else:
                torch.add(buffers[0][self.rank], buffers[1][self.rank], out=total)
                for buffer in buffers[2:]:
                    total.add_(buffer[self.rank])
        if average:
            out.div_(self.size)


def piece_bytes(largest: float) -> int:
    """The buffers' size for collectives of at most ``largest`` bytes (a reduce-scatter's whole input): no
    bigger than they need, whole 4 KiB pages, at most ``PIECE_BYTES``."""
    return int(min(PIECE_BYTES, max(4096, -(-int(largest) // 4096) * 4096)))


def mapped_bytes(ranks: int, piece: int) -> int:
    """The shared memory each rank maps: two buffers of every rank's (``tunelab advise`` adds it)."""
    return 2 * ranks * piece


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB" if nbytes >= 2**20 else f"{nbytes:,} bytes"


def _choice() -> str:
    choice = os.environ.get(CHOICE_ENV, "")
    if choice not in ("", "shm", "gloo"):
        raise UserError(f"{CHOICE_ENV}={choice} is not a way tunelab knows to move a collective. Use shm or gloo, "
                        "or unset it")
    return choice


def shared_memory_group(group=None, piece_bytes: int = PIECE_BYTES) -> tuple[SharedMemoryGroup | None, str]:
    """The shared-memory collectives of ``group`` (default: every rank), or None and why not. Collective:
    every rank of the group calls it, and they all get the same answer."""
    import torch.distributed as dist

    choice = _choice()
    group = group or dist.group.WORLD
    if not dist.is_initialized() or dist.get_world_size(group) < 2:
        return None, "one process"
    if dist.get_backend(group) != "gloo":
        return None, f"the {dist.get_backend(group)} backend moves its own collectives"
    if choice == "gloo":
        return None, f"gloo ({CHOICE_ENV}=gloo)"
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
    paths = [os.path.join(SHM_DIR, f"tunelab-{token[0]}-{q}") for q in range(size)]
    nbytes = 2 * piece_bytes
    problem = None
    try:
        fd = os.open(paths[rank], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # the pages now, or ENOSPC now (not a SIGBUS at the first write)
        finally:
            os.close(fd)
    except OSError as err:
        problem = f"rank {dist.get_global_rank(group, rank)} cannot reserve {_size(nbytes)} in {SHM_DIR} ({err.strerror})"
    problems: list[str | None] = [None] * size
    dist.all_gather_object(problems, problem, group=group)
    buffers: list[list[torch.Tensor]] = []
    if not any(problems):
        for q, path in enumerate(paths):
            # from_file would create a missing file: a rank on another machine would map a private one
            if not os.path.isfile(path) or os.path.getsize(path) != nbytes:
                problem = (f"rank {dist.get_global_rank(group, rank)} does not see rank {dist.get_global_rank(group, q)}'s "
                           f"file in {SHM_DIR}: another machine")
                break
            storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
            whole = torch.empty(0, dtype=torch.uint8).set_(storage)
            buffers.append([whole[:piece_bytes], whole[piece_bytes:]])
        dist.all_gather_object(problems, problem, group=group)  # also: every rank has mapped every file
    if os.path.exists(paths[rank]):
        os.unlink(paths[rank])  # the mappings stay; the name goes
    dist.barrier(group=group)  # and on return no rank's name is left
    reason = next((p for p in problems if p), None)
    if reason is not None:
        if choice == "shm":
            raise UserError(f"{CHOICE_ENV}=shm, but {reason}. Unset {CHOICE_ENV} to fall back to gloo")
        return None, f"gloo ({reason})"
    return SharedMemoryGroup(group, buffers), f"shared memory ({SHM_DIR}, {size} ranks)"


class BufferPool:
    """FSDP2's all-gather outputs and reduce-scatter inputs, kept for the next unit of the same size.

    Fresh, each of these 20-190 MB buffers is page-faulted in again: TBB's allocator hands blocks that
    large back to the kernel, and a 2-rank FSDP step spent about a third of its time in page faults
    (``perf``: the kernel zeroing pages under the fp32 -> bf16 copy into the all-gather buffer). A kept
    buffer is handed out again (as a view) once nothing but the pool refers to its storage: FSDP2 drops
    an all-gather output after copying it out, and a reduce-scatter input at the next reduce-scatter.
    At most ``keep`` buffers a size; torch's storage use count is a private API, so without it (or off
    the CPU) every call allocates."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self.kept: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self.use_count = getattr(torch._C, "_storage_Use_Count", None)

    def get(self, size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(int(s) for s in size)
        if self.use_count is None or device.type != "cpu":
            return torch.empty(*size, dtype=dtype, device=device)
        kept = self.kept.setdefault((numel, dtype), [])
        for buffer in kept:
            # 2: the pool's tensor and the storage object this line makes; a view handed out adds one
            if self.use_count(buffer.untyped_storage()._cdata) <= 2:
                return buffer.view(*size)
        buffer = torch.empty(numel, dtype=dtype, device=device)
        if len(kept) < self.keep:
            kept.append(buffer)
        return buffer.view(*size)


class FSDPAllGather:
    """FSDP2's all-gather (its ``AllGather`` interface: ``allocate`` and the call) through shared memory."""

    def __init__(self, shm: SharedMemoryGroup, pool: BufferPool | None = None):
        self.shm, self.pool = shm, pool

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.pool is None:
            return torch.empty(*size, dtype=dtype, device=device)
        return self.pool.get(size, dtype, device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, async_op: bool = False):
        self.shm.all_gather(output_tensor, input_tensor)
        return None  # done: FSDP2 waits on nothing it is given back


class FSDPReduceScatter(FSDPAllGather):
    """FSDP2's gradient reduce-scatter (its ``ReduceScatter`` interface) through shared memory: SUM, or AVG
    (fp32 and bf16 gradients); FSDP2 asks for no other on gloo's CPU tensors."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        import torch.distributed as dist

        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            raise ValueError(f"shared-memory reduce-scatter: {op} is not SUM or AVG")
        self.shm.reduce_scatter(output_tensor, input_tensor, average=op == dist.ReduceOp.AVG)
        return None


class _Done:
    """What an ``async_op`` collective that already finished hands back: a work handle with nothing to wait on."""

    def wait(self, *_, **__) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class DeepSpeedCollectives:
    """DeepSpeed ZeRO's all-gathers (ZeRO-3's parameters, every module's forward and backward) and reduce-scatters
    (its gradient buckets) through shared memory. ``deepspeed.comm``'s ``TorchBackend`` makes every
    ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` through two attributes of its own,
    ``all_gather_function`` and ``reduce_scatter_function`` (torch's functions); :meth:`install` sets them to
    these, which call the ones they replaced for what they do not move: another group, a tensor that is not a
    contiguous CPU one, an op other than SUM / AVG. DeepSpeed's own ``shm_comm`` op only all-reduces, for
    inference."""

    def __init__(self, shm: SharedMemoryGroup):
        import torch.distributed as dist

        self.shm = shm
        self.ranks = dist.get_process_group_ranks(shm.group)
        self.groups: dict[int, bool] = {}  # id(group) -> whether it has this group's ranks
        self.all_gather_fallback = self.reduce_scatter_fallback = None

    def install(self, backend) -> str | None:
        """Plug into DeepSpeed's comm ``backend`` (``deepspeed.comm.comm.cdb``); None, or why it cannot."""
        if not (hasattr(backend, "all_gather_function") and hasattr(backend, "reduce_scatter_function")):
            return f"this DeepSpeed's {type(backend).__name__} has no all_gather_function / reduce_scatter_function"
        self.all_gather_fallback, self.reduce_scatter_fallback = backend.all_gather_function, backend.reduce_scatter_function
        backend.all_gather_function, backend.reduce_scatter_function = self.all_gather, self.reduce_scatter
        return None

    def _moves(self, group, *tensors: torch.Tensor) -> bool:
        import torch.distributed as dist

        group = group or dist.group.WORLD
        if id(group) not in self.groups:
            self.groups[id(group)] = dist.get_process_group_ranks(group) == self.ranks
        return self.groups[id(group)] and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)

    def all_gather(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group=None, async_op: bool = False):
        if not self._moves(group, output_tensor, input_tensor):
            return self.all_gather_fallback(output_tensor, input_tensor, group=group, async_op=async_op)
        self.shm.all_gather(output_tensor, input_tensor)
        return _Done() if async_op else None

    def reduce_scatter(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, op=None, group=None,
                       async_op: bool = False):
        import torch.distributed as dist

        op = dist.ReduceOp.SUM if op is None else op
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG) or not self._moves(group, output_tensor, input_tensor):
            return self.reduce_scatter_fallback(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        self.shm.reduce_scatter(output_tensor, input_tensor, average=op == dist.ReduceOp.AVG)
        return _Done() if async_op else None
