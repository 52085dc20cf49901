"""``train.distributed``: how the processes of a run share a training step (DDP, FSDP2, DeepSpeed ZeRO).

``ENGINES`` is the registry: name -> engine class. An engine does the few things that differ
between them, and the loop (:mod:`tunelab.train.loop`) calls only these:

* ``shard(loss_module)`` before the optimiser is built (FSDP2 replaces the parameters with
  sharded ``DTensor``\\ s, so the optimiser must be built on the new ones);
* ``prepare(loss_module, optimizer)`` -> (the module the loop calls, the optimiser);
* ``context(loss_model, last)`` around each micro-batch's forward and backward, ``backward``;
* ``update(...)``: clip, check, step, clear (:func:`tunelab.train.step.update` or the engine's);
* ``save_shards`` / ``load_shards`` (every rank writes and reads its own part of a checkpoint) and
  ``full_state_dict`` (the whole model gathered on rank 0, for ``final/`` and ``best/``).

The engines are the libraries': DDP through accelerate; FSDP2 is PyTorch's ``fully_shard`` with
``torch.distributed.checkpoint`` for the sharded checkpoints; ZeRO is DeepSpeed's engine
(``deepspeed.initialize``, ``save_checkpoint`` / ``load_checkpoint``). accelerate's FSDP and
DeepSpeed plugins are not used: accelerate 1.15 switches both off on CPU (``Accelerator(cpu=True)``
runs plain multi-CPU DDP), and its DeepSpeed ``backward`` steps the engine inside the backward of
the last micro-batch, before the loop has all-reduced the step's loss; one code path for CPU and
GPU calls the engines directly. Our code only wires them: which modules are sharding units, the
DeepSpeed JSON merged with the run's batch and precision settings, and the per-step calls.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from tunelab import tasks
from tunelab.config import zero3_refusal
from tunelab.errors import UserError, require
from tunelab.train import step as step_fn
from tunelab.train.launch import free_port
from tunelab.train.shm_collectives import (
    BufferPool,
    DeepSpeedCollectives,
    FSDPAllGather,
    FSDPReduceScatter,
    piece_bytes,
    shared_memory_group,
)


def ensure_process_group(device: torch.device) -> None:
    """A sharded engine needs a process group even in one process (a group of one: same code, one shard);
    with several processes accelerate has made it already."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)


class DDP:
    """Every rank holds the whole model; gradients all-reduced by DDP (accelerate's ``prepare``)."""

    name = "ddp"
    sharded = False
    # torch's fused AdamW (build.build_optimizer) steps plain tensors, FSDP2's DTensors and ZeRO's flat fp32
    # partitions alike (equal to the loop within 1e-7 on 2 ranks; ZeRO-1/2/3, with and without offload: test_scale)
    fused_optimizer = True

    def __init__(self, cfg, accelerator, precision: str):
        self.cfg, self.accelerator, self.precision = cfg, accelerator, precision

    def describe(self) -> dict[str, Any]:
        # DDP keeps gloo's all-reduce, which its own thread runs beside the backward: through shared memory
        # (synchronous, as a comm hook) it was no faster (8 layers, 2 ranks: 3.7-4.7 vs 3.8-4.4 s a step)
        return {"engine": self.name}

    def shard(self, loss_module: torch.nn.Module) -> None:
        return None

    def prepare(self, loss_module, optimizer):
        return self.accelerator.prepare(loss_module, optimizer)

    def context(self, loss_model, last: bool):
        return nullcontext() if last else self.accelerator.no_sync(loss_model)

    def backward(self, objective: torch.Tensor) -> None:
        self.accelerator.backward(objective)

    def update(self, optimizer, trainable, *, loss: float, max_grad_norm: float | None) -> tuple[float, bool]:
        return step_fn.update(optimizer, trainable, loss=loss, max_grad_norm=max_grad_norm,
                              clip=self.accelerator.clip_grad_norm_)

    def save_shards(self, folder: Path, loss_model, optimizer) -> None:
        return None

    def load_shards(self, folder: Path, loss_model, optimizer) -> None:
        return None

    def full_state_dict(self, loss_model, model) -> dict[str, torch.Tensor] | None:
        return None

    def generation(self, loss_model):
        """Around ``model.generate`` at an evaluation (the model inside ``loss_model``): every rank holds the
        whole model, nothing to gather."""
        return nullcontext()


def _sharding_units(module: torch.nn.Module, names: list[str] | None) -> list[torch.nn.Module]:
    """The modules sharded as units: the classes named in ``train.fsdp.wrap``, or the model's decoder layers
    (transformers' ``_no_split_modules``)."""
    if names is None:
        names = _decoder_layer_names(module)
    units = [m for m in module.modules() if type(m).__name__ in set(names)]
    if not units:
        raise UserError(f"train.fsdp.wrap: no module of class {', '.join(names) or '(none given)'} in this model. "
                        "Name its decoder layer class, e.g. [LlamaDecoderLayer]")
    return units


def _decoder_layer_names(module: torch.nn.Module) -> list[str]:
    """The decoder layer classes transformers' models name (``_no_split_modules``)."""
    return [n for m in module.modules() for n in (getattr(m, "_no_split_modules", None) or [])]


class AllReduceScatter:
    """FSDP2's gradient reduce-scatter done as an all-reduce of FSDP's flat gradient buffer (in place) and a
    copy of this rank's chunk, for gloo: its ``reduce_scatter`` is the slower of the two (2 ranks, fp32:
    43 vs 27 ms for 10M elements, 185 vs 101 ms for 47M; ``docs/scaling.md``). The same sum of the same
    values, so the same gradients. FSDP2 takes it through ``FSDPModule.set_custom_reduce_scatter`` (the
    ``ReduceScatter`` interface: ``allocate`` and the call)."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        import torch.distributed as dist

        dist.all_reduce(input_tensor, op=op, group=group)  # FSDP lays the buffer out as one chunk per rank
        output_tensor.copy_(input_tensor.view(group.size(), -1)[group.rank()])
        return None  # done: FSDP2 waits on nothing it is given back


class FSDP(DDP):
    """PyTorch FSDP2: ``fully_shard`` on each decoder layer, then on the whole loss module (the embeddings, final
    norm and head form the root unit). Gradients are reduce-scattered (averaged) after every micro-batch's
    backward, so no rank ever holds the whole gradient."""

    name = "fsdp"
    sharded = True

    collectives = "one process"  # set by shard
    shm = None  # the shared-memory collectives (shm_collectives.SharedMemoryGroup) on one machine's gloo ranks
    pool = None  # FSDP's gathered and scattered buffers kept for the next unit (shm_collectives.BufferPool)
    reduce_scatter = "reduce_scatter"  # or "all_reduce" (AllReduceScatter) or "shared memory", set by shard

    def describe(self) -> dict[str, Any]:
        f = self.cfg.train.fsdp
        return {"engine": self.name, **(f.model_dump(mode="json") if f is not None else {}),
                "collectives": self.collectives, "reduce_scatter": self.reduce_scatter, "buffer_pool": self.pool is not None}

    def shard(self, loss_module: torch.nn.Module) -> None:
        import torch.distributed as dist
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        settings = self.cfg.train.fsdp
        ensure_process_group(self.accelerator.device)
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        mixed = settings.mixed_precision if settings is not None else True
        kwargs = {
            "reshard_after_forward": settings.reshard_after_forward if settings is not None else True,
            "mp_policy": (MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low and mixed
                          else MixedPrecisionPolicy()),
            "offload_policy": CPUOffloadPolicy() if settings is not None and settings.offload_params else OffloadPolicy(),
        }
        units = _sharding_units(loss_module, settings.wrap if settings is not None else None)
        for unit in units:
            fully_shard(unit, **kwargs)
        fully_shard(loss_module, **kwargs)
        if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            # one machine: both collectives through /dev/shm; across machines, gloo's all-reduce for its reduce-scatter
            # the largest reduce-scatter: a unit's whole gradient in fp32 (the root's own: the embeddings, the head)
            own = [sum(p.numel() for p in unit.parameters()) for unit in units]
            largest = 4 * max(*own, sum(p.numel() for p in loss_module.parameters()) - sum(own))
            self.shm, self.collectives = shared_memory_group(piece_bytes=piece_bytes(largest))
            # 32 layers, 2 ranks: +8-12% tokens/s after the first step for +9% peak (docs/scaling.md)
            self.pool = pool = BufferPool(keep=2) if self.shm is not None else None
            for module in [*units, loss_module]:
                if self.shm is not None:
                    module.set_custom_all_gather(FSDPAllGather(self.shm, pool))
                    module.set_custom_reduce_scatter(FSDPReduceScatter(self.shm, pool))
                else:
                    module.set_custom_reduce_scatter(AllReduceScatter())
            self.reduce_scatter = "shared memory" if self.shm is not None else "all_reduce"
        elif dist.get_world_size() > 1:
            self.collectives = f"{dist.get_backend()}'s own"

    def prepare(self, loss_module, optimizer):
        return loss_module, optimizer

    def context(self, loss_model, last: bool):
        return self.accelerator.autocast()

    def backward(self, objective: torch.Tensor) -> None:
        objective.backward()

    def update(self, optimizer, trainable, *, loss: float, max_grad_norm: float | None) -> tuple[float, bool]:
        def clip(params, max_norm):  # the norm of sharded gradients is a DTensor: its full value
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

        return step_fn.update(optimizer, trainable, loss=loss, max_grad_norm=max_grad_norm, clip=clip)

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, **kw)

    def save_shards(self, folder: Path, loss_model, optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(loss_model, optimizer, options=self._options())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))

    def load_shards(self, folder: Path, loss_model, optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(loss_model, optimizer, options=self._options())
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(folder))
        # strict=False: the state holds the trained parameters only (the frozen ones come from the base model);
        # dcp.load has already failed if any of them was missing from the checkpoint
        set_state_dict(loss_model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self._options(strict=False))

    def full_state_dict(self, loss_model, model) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(loss_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _under(full, loss_model, model) if self.accelerator.is_main_process else None

    @contextmanager
    def generation(self, loss_model):
        """The decoder layers gather themselves in their own forward hooks as ``generate`` runs them, but the
        root unit (embeddings, final norm, head) is gathered by ``loss_model``'s forward, which ``generate``
        bypasses: it is gathered here for the duration, and sharded again after."""
        loss_model.unshard()
        try:
            yield
        finally:
            loss_model.reshard()


def _under(state: dict[str, torch.Tensor], root: torch.nn.Module, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``root``'s state dict that belong to its submodule ``model``, named as in ``model``."""
    prefix = next((n + "." for n, m in root.named_modules() if m is model), "")
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# the DeepSpeed settings tunelab decides (the run's batch, accumulation, clipping, precision): a user's JSON
# may leave them out or say "auto"; another value is an error naming both
def deepspeed_config(cfg, world: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config of this run: the user's JSON (``train.deepspeed.config``) merged with ours."""
    t, ds = cfg.train, cfg.train.deepspeed
    user: dict[str, Any] = {}
    if ds is not None and ds.config:
        path = Path(ds.config)
        try:
            user = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"train.deepspeed.config: {path} not found. Check the path") from None
        except (OSError, ValueError) as err:
            raise UserError(f"train.deepspeed.config: {path} is not a readable JSON file ({err}). Fix it") from None
        if not isinstance(user, dict):
            raise UserError(f"train.deepspeed.config: {path} must hold a JSON object. Fix it")
    zero = dict(user.get("zero_optimization") or {})
    stage = ds.stage if ds is not None and ds.stage is not None else zero.get("stage", 2)
    ours = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
        "zero_optimization.stage": stage,
    }
    where = {"train_micro_batch_size_per_gpu": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
             "train_batch_size": "train.batch_size x grad_accum x processes", "gradient_clipping": "train.max_grad_norm",
             "bf16.enabled": "train.precision", "fp16.enabled": "train.precision",
             "zero_optimization.stage": "train.deepspeed.stage"}
    merged = json.loads(json.dumps(user))
    for key, value in ours.items():
        head, _, leaf = key.rpartition(".")
        section = merged.setdefault(head, {}) if head else merged
        theirs = section.get(leaf, "auto")
        if theirs != "auto" and theirs != value and not (isinstance(value, bool) and theirs == value):
            raise UserError(f"train.deepspeed.config: {key} is {theirs!r} in {ds.config}, but {where[key]} gives "
                            f"{value!r}. Remove it from the JSON (or write \"auto\"), or change {where[key]}")
        section[leaf] = value
    offload = {"optimizer": ds.offload_optimizer if ds else "none", "param": ds.offload_params if ds else "none"}
    zsec = merged["zero_optimization"]
    for part, device in offload.items():
        if device == "cpu":
            zsec[f"offload_{part}"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3:
        reuse_distance(zsec, ds, ds.config if ds else None)
    elif ds is not None and ds.reshard_after_forward is not None:
        raise UserError(f"train.deepspeed.reshard_after_forward applies to ZeRO stage 3 (got stage {stage}: every "
                        "rank holds the whole model). Remove it, or set train.deepspeed.stage: 3")
    if stage == 3 and not tasks.get(cfg.task).zero3:  # stage 3 from the user's JSON (the config check saw none)
        raise UserError(zero3_refusal(cfg.task) + f" (zero_optimization.stage is 3 in {ds.config})")
    if stage not in (1, 2, 3):
        raise UserError(f"train.deepspeed.config: zero_optimization.stage is {stage!r} in {ds.config}; ZeRO has "
                        "stages 1, 2 and 3. Fix the JSON or set train.deepspeed.stage")
    if "offload_param" in zsec and zsec["offload_param"].get("device", "none") != "none" and stage != 3:
        raise UserError(f"train.deepspeed: parameter offload (offload_param) needs ZeRO stage 3 (got stage "
                        f"{stage}). Set train.deepspeed.stage: 3, or remove the parameter offload")
    # our optimiser (AdamW / SGD, its parameter groups) stays the one that steps, offloaded or not
    merged.setdefault("zero_allow_untested_optimizer", True)
    merged.setdefault("zero_force_ds_cpu_optimizer", False)
    merged.setdefault("steps_per_print", 2**31 - 1)
    return merged


def reuse_distance(zsec: dict[str, Any], ds, path: str | None) -> None:
    """ZeRO-3's ``stage3_max_reuse_distance`` from ``train.deepspeed.reshard_after_forward``. DeepSpeed keeps a
    gathered parameter when it is used again within that many parameters (default 1e9); every layer's forward
    and backward are within 1e9 of each other for models up to a billion or so parameters, so under it every
    layer stays gathered from its forward to its backward: the whole model at the turn of the step (32 layers,
    2 ranks, fp32: 1,178 MiB a rank more, and slower; docs/scaling.md). 0 frees each layer after its forward, as FSDP's
    ``reshard_after_forward`` does."""
    asked = ds.reshard_after_forward if ds is not None else None
    theirs = zsec.get("stage3_max_reuse_distance", "auto")
    if theirs != "auto" and asked is not None:
        raise UserError(f"train.deepspeed: reshard_after_forward is {str(asked).lower()}, and "
                        f"zero_optimization.stage3_max_reuse_distance is {theirs!r} in {path}. Keep one of the two")
    if theirs == "auto":
        zsec["stage3_max_reuse_distance"] = 0 if asked is not False else 10**9


class DeepSpeed(DDP):
    """DeepSpeed ZeRO (stage 1, 2 or 3, optional CPU offload) on our optimiser, scheduler and loop: our loop
    marks the accumulation boundary, runs ``engine.backward`` unscaled (it already divides by the step's
    labelled tokens) and calls ``engine.step`` (clipping, the update, or the skip of a non-finite step)."""

    name = "deepspeed"
    sharded = True

    def __init__(self, cfg, accelerator, precision: str):
        super().__init__(cfg, accelerator, precision)
        if accelerator.device.type == "cpu":  # said, not detected: DeepSpeed warns when it falls back to the CPU
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import_deepspeed()
        quiet_deepspeed()
        _without_inference_shm_op()
        self.config = deepspeed_config(cfg, accelerator.num_processes, precision)
        self.stage = self.config["zero_optimization"]["stage"]
        self.engine = None
        self.shm = None  # ZeRO's all-gathers and reduce-scatters through shared memory (one machine's gloo ranks)
        self.collectives = "one process"
        self.leaf_modules: list[str] = []  # ZeRO-3 gathers each of these whole, as FSDP gathers a unit
        self.master_weights = "fp32 copy"  # ZeRO-3: "shared" where prepare's _share_master_weights could (fp32)

    def describe(self) -> dict[str, Any]:
        z = self.config["zero_optimization"]
        return {"engine": self.name, "stage": self.stage,
                "offload_optimizer": (z.get("offload_optimizer") or {}).get("device", "none"),
                "offload_params": (z.get("offload_param") or {}).get("device", "none"), "collectives": self.collectives,
                **({"leaf_modules": self.leaf_modules, "master_weights": self.master_weights,
                    "max_reuse_distance": z.get("stage3_max_reuse_distance")} if self.stage == 3 else {})}

    def prepare(self, loss_module, optimizer):
        import deepspeed

        ensure_process_group(self.accelerator.device)
        bucket_sizes(self.config, loss_module)
        # DeepSpeed insists on a launcher's LOCAL_RANK, which one process started without one lacks
        alone = "LOCAL_RANK" not in os.environ
        if alone:
            os.environ["LOCAL_RANK"] = "0"
        try:
            engine, ds_optimizer, _, _ = deepspeed.initialize(model=loss_module, optimizer=optimizer,
                                                              config=self.config, dist_init_required=False)
        finally:
            if alone:  # a later run in this Python process must not look launched (launch.launched)
                os.environ.pop("LOCAL_RANK", None)
        if self.stage == 3:
            self.master_weights = "shared" if _share_master_weights(ds_optimizer) else "fp32 copy"
            # the loss reads the head's weight directly (the chunked cross-entropy), outside the head's forward
            # where ZeRO-3 would gather it: gather it with the loss module's forward instead
            head = _output_weight(loss_module)
            if head is not None:
                deepspeed.zero.register_external_parameter(loss_module, head)
        self.engine = engine
        return engine, ds_optimizer

    def _leaf_modules(self, loss_module) -> None:
        """ZeRO-3 gathers each decoder layer whole, in one all-gather when the layer starts (DeepSpeed's
        ``set_z3_leaf_modules``), instead of each of its linear layers and norms in their own hooks: 32 layers,
        2 ranks, 102.1 -> 131.4 tokens/s after the first step, the same losses and peak (docs/scaling.md).

        DeepSpeed reduces a leaf module's gradients in a full backward hook on it, which torch runs once the
        gradients of the module's inputs are computed; when no input needs one, it runs as soon as the output's
        gradient arrives, before the layer's own weights have theirs. That is the first layer under LoRA (frozen
        embeddings below it) and the lowest trained layer under ``freeze``: the hook reduced and released the
        layer's weights before its backward used them (both failed there; ``freeze``: "The size of tensor a (0)
        must match the size of tensor b (128)"). So a trained layer's hidden states are made to
        need a gradient where they do not (``_inputs_need_grad``): one more input gradient per step, for one layer."""
        from deepspeed.utils import set_z3_leaf_modules

        names = set(_decoder_layer_names(loss_module))
        classes = list({type(m) for m in loss_module.modules() if type(m).__name__ in names})
        if not classes:
            return
        set_z3_leaf_modules(loss_module, classes)
        self.leaf_modules = sorted(c.__name__ for c in classes)
        for layer in loss_module.modules():
            if isinstance(layer, tuple(classes)) and any(p.requires_grad for p in layer.parameters()):
                layer.register_forward_pre_hook(_inputs_need_grad, with_kwargs=True)

    def shard(self, loss_module) -> None:
        """``deepspeed.initialize`` (``prepare``) partitions the model; here, on one machine's gloo ranks, ZeRO's
        all-gathers and reduce-scatters are set to go through shared memory."""
        import torch.distributed as dist
        from deepspeed.comm import comm as ds_comm

        if self.stage == 3:
            self._leaf_modules(loss_module)
        ensure_process_group(self.accelerator.device)
        if dist.get_world_size() < 2:
            return
        ds_comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)  # its comm backend
        if dist.get_backend() != "gloo":
            self.collectives = f"{dist.get_backend()}'s own"
            return
        # ZeRO-3 gathers a module's parameters at once (bf16 or fp32): pieces up to the whole model's, at most 16 MiB
        self.shm, self.collectives = shared_memory_group(
            piece_bytes=piece_bytes(4 * sum(p.numel() for p in loss_module.parameters())))
        if self.shm is not None:
            why_not = DeepSpeedCollectives(self.shm).install(ds_comm.cdb)
            if why_not is not None:
                self.shm, self.collectives = None, f"gloo ({why_not})"

    def context(self, loss_model, last: bool):
        loss_model.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, objective: torch.Tensor) -> None:
        self.engine.backward(objective, scale_wrt_gas=False)

    def update(self, optimizer, trainable, *, loss: float, max_grad_norm: float | None) -> tuple[float, bool]:
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        applied = self.engine.skipped_steps == skipped_before
        return norm, applied and math.isfinite(loss) and (math.isfinite(norm) or max_grad_norm is None)

    def save_shards(self, folder: Path, loss_model, optimizer) -> None:
        self.engine.save_checkpoint(str(folder), tag="zero", save_latest=False, exclude_frozen_parameters=True)

    def load_shards(self, folder: Path, loss_model, optimizer) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="zero", load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=False)
        if path is None:
            raise UserError(f"{folder}: the DeepSpeed shards could not be read. Move this checkpoint away and run "
                            "with --resume again to continue from the previous one")

    def full_state_dict(self, loss_model, model) -> dict[str, torch.Tensor] | None:
        if self.stage != 3:  # ZeRO-1/2 keep the whole model on every rank
            return None
        import deepspeed

        main = self.accelerator.is_main_process
        out: dict[str, torch.Tensor] = {}
        # an evaluation's forward leaves the next layers' prefetched all-gathers in flight (DeepSpeed waits for them
        # at the next forward); GatheredParameters could not partition those again: wait for them and free them
        loss_model.empty_partition_cache()
        params = list(loss_model.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if main:
                out = {k: v.detach().cpu().clone() for k, v in loss_model.module.state_dict().items()}
        return _under(out, loss_model.module, model) if main else None


def import_deepspeed():
    """``import deepspeed`` (a one-line error naming the extra when it is not installed), without the mlflow import
    of DeepSpeed's autotuner (``deepspeed.autotuning.autotuner``; tunelab never runs it), which runs whenever
    mlflow is installed (the [track] extra): measured here, mlflow and the pyarrow under it were 1.7 of the 2.2 s
    that ``import deepspeed`` took in every rank, and pyarrow started a jemalloc thread in each. While DeepSpeed
    imports, ``import mlflow`` raises ImportError (the autotuner then sets ``has_mlflow = False``); afterwards
    mlflow imports as usual (tunelab's mlflow tracker). Where mlflow or DeepSpeed is imported already, nothing is
    hidden."""
    hide = "mlflow" not in sys.modules and "deepspeed" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # the import system's "not importable"
    try:
        return require("deepspeed", extra="deepspeed", verb="train.distributed: deepspeed")
    finally:
        if hide:
            sys.modules.pop("mlflow", None)


def _without_inference_shm_op() -> None:
    """Keep DeepSpeed from loading its shared-memory op ("deepspeed_shm_comm"), which serves only its inference
    all-reduce (``inference_all_reduce``, tensor-parallel inference); ZeRO's all-gathers and reduce-scatters go
    through the process group, where ours replace them (``shard``). Loading it compiled it on a machine's first
    DeepSpeed run (~90 s, cached in ~/.cache/torch_extensions), printed "DeepSpeed deepspeed.ops.comm.
    deepspeed_shm_comm_op built successfully" on every rank, and mapped its own shared memory per rank."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # read by comm.torch.build_shm_op


def _share_master_weights(optimizer) -> bool:
    """ZeRO-3 in fp32 (and without optimiser offload): the optimiser steps this rank's partition of the model
    itself, instead of a copy of it. DeepSpeed means to skip the copy when the partition is already fp32 on the
    optimiser's device ("we don't need another copy of the weights", ``stage3._create_fp32_partitions``), but
    compares the partition's ``torch.device`` with a device name (``'cpu'``, ``'cuda:0'``), which is never
    equal, and clones it: one more fp32 copy of the partition, 4 bytes a parameter / ranks (32 layers, 2 ranks:
    690 MiB a rank). Here the copy's tensor, the one the optimiser and its state know, is pointed at the
    partition, and the copy is freed. True when at least one group was shared."""
    lows = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if lows is None or masters is None or getattr(optimizer, "offload_optimizer", False):
        return False
    shared = False
    for low, master in zip(lows, masters, strict=True):
        if (low is None or master.numel() == 0 or master.dtype != low.dtype or master.device != low.device
                or master.shape != low.shape or master.data_ptr() == low.data_ptr()):
            continue
        if not torch.equal(master, low):  # not a plain copy (DeepSpeed changed): leave it
            continue
        master.data = low
        shared = True
    return shared


def _inputs_need_grad(module: torch.nn.Module, args: tuple, kwargs: dict):
    """A forward pre-hook: the layer's hidden states (its first tensor argument) as a tensor that needs a gradient,
    when gradients are on and they do not (a detached copy: nothing below the layer is trained)."""
    if not torch.is_grad_enabled():
        return None
    if args and isinstance(args[0], torch.Tensor):
        x = args[0]
        if x.is_floating_point() and not x.requires_grad:
            return (x.detach().requires_grad_(), *args[1:]), kwargs
    elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
        x = kwargs["hidden_states"]
        if x.is_floating_point() and not x.requires_grad:
            return args, {**kwargs, "hidden_states": x.detach().requires_grad_()}
    return None


def bucket_sizes(config: dict[str, Any], module: torch.nn.Module) -> None:
    """Fill ZeRO's bucket sizes the config leaves out (or sets to "auto") from the model's hidden size, as
    transformers' Trainer does (``HfTrainerDeepSpeedConfig``): DeepSpeed's own defaults are sized for
    billions of parameters (a 5e8-element reduce bucket, touched up to the model's size on every micro-step;
    ZeRO-2 on a 362M Llama: 7.3 GiB a rank with them, docs/scaling.md)."""
    hidden = next((m.config.hidden_size for m in module.modules()
                   if isinstance(getattr(getattr(m, "config", None), "hidden_size", None), int)), None)
    if hidden is None:
        return
    zero = config["zero_optimization"]
    sizes = {"reduce_bucket_size": hidden * hidden}
    if zero["stage"] == 3:
        sizes |= {"stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                  "stage3_param_persistence_threshold": 10 * hidden}
    for key, value in sizes.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value


def quiet_deepspeed() -> None:
    """DeepSpeed logs its config and every step at INFO, and torch warns about the collectives it calls.
    ZeRO-3 also warns, at the first forward, that it cannot see the tensors inside our loss module's output
    (``LossSum``) to hook the backward of the loss module itself. The loss module owns no parameters (the head's
    weight it reads is gathered by its forward, as an external parameter), and 2 ZeRO-3 ranks equal 1 process
    (``tests/test_scale.py``), so that warning is dropped too."""
    if not os.environ.get("TUNELAB_VERBOSE"):
        ds_logger = logging.getLogger("DeepSpeed")
        ds_logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _LossSumWarning) for f in ds_logger.filters):
            ds_logger.addFilter(_LossSumWarning())
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")


class _LossSumWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "unknown inputs or outputs type" not in record.getMessage() or "LossSum" not in record.getMessage()


def _output_weight(loss_module: torch.nn.Module) -> torch.nn.Parameter | None:
    model = getattr(loss_module, "model", None)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return getattr(head, "weight", None)


ENGINES: dict[str, type[DDP]] = {"ddp": DDP, "fsdp": FSDP, "deepspeed": DeepSpeed}


def make_engine(cfg, accelerator, precision: str) -> DDP:
    """The engine ``train.distributed`` names (the registry above)."""
    return ENGINES[cfg.train.distributed](cfg, accelerator, precision)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
