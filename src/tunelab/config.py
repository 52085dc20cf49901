"""The whole configuration schema, as typed pydantic models.

One YAML file describes a run. Rules:

* unknown keys are errors (with a "did you mean" hint), and so are wrong types and
  impossible combinations; every problem found is reported at once, one line each, naming
  the field path, the bad value and the fix;
* ``--set a.b=value`` overrides any field (the value is read as YAML, so ``--set
  train.lr=1e-4`` is a float and ``--set data.packing=true`` a bool);
* the resolved config is saved into the run directory together with where each value came
  from (``default``, the file, or ``--set``).

Field descriptions are the documentation: ``tunelab train --help`` prints them.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from tunelab.data.settings import MixSettings, PrepareSection
from tunelab.data.workbench import data_problems
from tunelab.errors import ConfigError, UserError
from tunelab.eval.config import EvalSection
from tunelab.fsutil import check_name
from tunelab.methods import METHODS, MethodConfig
from tunelab.methods import get as _method
from tunelab.objectives.rules import keep_problems
from tunelab.search.config import SweepSection, sweep_problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _safe_name(value: str) -> str:
    """A name that becomes a folder (run, continual stage) must be one safe path component.

    The error is a pydantic error of its own type (``unsafe_name``) so that :func:`_format_error`
    prints :func:`tunelab.fsutil.check_name`'s wording under the field's full path, on one line.
    """
    try:
        return check_name(value, "name")
    except UserError as err:
        reason = str(err).partition(": ")[2]
        raise PydanticCustomError("unsafe_name", "{reason}", {"reason": reason}) from None


#: A str field whose value becomes one folder name (``../x``, ``a/b``, ``''`` and ``.hidden`` are refused).
SafeName = Annotated[str, AfterValidator(_safe_name)]


class RunSection(_Strict):
    """Where the run directory goes."""

    name: SafeName = Field("run", description="Run name; the run directory is <output_dir>/<name> (one folder "
                           "name: letters, digits, '.', '_', '-', '+'; no '/', not starting with '.').")
    output_dir: str = Field("runs", description="Parent folder of run directories (relative to the working directory).")


class ModelSection(_Strict):
    """The base model."""

    path: str = Field(
        ...,
        description="An alias (smollm2-135m-instruct, tiny-random-llama), a local Hugging Face folder, "
        "a .gguf file, or a hub id already in the local cache.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the base weights as loaded. auto: bfloat16 when training runs in bf16 and the "
        "method freezes the base (LoRA: adapters stay float32; faster on CPU), else float32 master weights.",
    )


class DatasetSpec(_Strict):
    """One data file."""

    path: str = Field(..., description="A .json, .jsonl, .csv, .parquet or .txt file.")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text", "classification", "preference", "kto"] = Field(
        "auto", description="Row format; 'auto' detects it from the keys of the first row."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical field names to yours, e.g. {instruction: question, output: answer}.",
    )
    limit: int | None = Field(None, ge=1, description="Read at most this many rows (first rows).")
    name: str | None = Field(None, description="Dataset name (default: the file stem); per-dataset train losses use it.")
    ratio: float | None = Field(None, gt=0, description="Share of this dataset in the mix (data.mix.strategy: ratio).")
    weight: float = Field(1.0, ge=0, description="Loss weight multiplied into every row of this dataset.")
    task: str | None = Field(None, description="task: multitask: the name (a key of `tasks`) of the task this file belongs to.")




class DataSection(_Strict):
    """Training and evaluation data, chat template, masking and lengths."""

    train: list[DatasetSpec] = Field(..., min_length=1, description="Training files (records are concatenated).")
    eval: list[DatasetSpec] = Field(default_factory=list, description="Validation files for eval loss and early stopping.")
    eval_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="Hold out this share of the training records for validation (seeded)."
    )
    template: str = Field(
        "auto", description="Chat template: 'auto' (the tokenizer's own, chatml if it has none), chatml, llama3, alpaca."
    )
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant", description="Which tokens get a loss: every assistant turn, only the last one, or all tokens."
    )
    max_length: int = Field(1024, ge=8, description="Maximum tokens per sample (and per packed row).")
    truncation: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with a sample longer than max_length: cut it, drop it (reported), or stop."
    )
    group_by_length: bool = Field(
        False,
        description="Unpacked rows only: batch rows of similar length together (less padding), in a seeded order.",
    )
    cache: bool = Field(
        True,
        description="Cache tokenised data on disk, keyed by a fingerprint of the records, tokenizer, template "
        "and these settings; a second run skips tokenisation.",
    )
    packing: bool = Field(
        False,
        description="Pack several samples into each row of max_length tokens with no attention across samples "
        "(position ids restart per sample). Removes padding; same loss as unpacked.",
    )
    prepare: PrepareSection | None = Field(None, description="Data-workbench steps before tokenisation: clean, split, augment, weights.")
    mix: MixSettings = Field(default_factory=MixSettings, description="How several data.train files are mixed.")
    sampler: Literal["random", "stratified", "balanced"] = Field(
        "random", description="Data order: random; stratified (every batch keeps the label shares); balanced "
        "(class-balanced batches, drawn with replacement). Labels, else datasets, are the classes.")


# --------------------------------------------------------------------------- keeping what the model knew


class L2SPSettings(_Strict):
    """L2-SP: ``weight/2 * sum ||theta - theta0||^2`` over the trained weights (adapters: the weight delta)."""

    weight: float = Field(..., gt=0, description="lambda of the penalty.")


class EWCSettings(_Strict):
    """Elastic weight consolidation with a diagonal Fisher estimated on a reference set."""

    weight: float = Field(..., gt=0, description="lambda: the penalty is lambda/2 * sum F_i (theta_i - theta0_i)^2.")
    data: list[DatasetSpec] = Field(
        default_factory=list, description="Reference set the Fisher is estimated on (general data or the previous "
        "task); empty: the training data of this run (or of the previous stage in a continual run).")
    samples: int = Field(256, ge=1, description="Reference samples used to estimate the Fisher.")
    fisher: str | None = Field(None, description="A fisher.safetensors of an earlier run to reuse instead of estimating.")
    gamma: float = Field(1.0, ge=0, le=1, description="Online EWC across stages: F = gamma * F_old + F_new.")
    online: bool = Field(False, description="With fisher: estimate a new Fisher at this run's starting weights on "
                         "ewc.data and use gamma * F_old + F_new (online EWC across continual stages); false: reuse "
                         "fisher as it is.")


class DistillSettings(_Strict):
    """KL between the base model's and the tuned model's token distributions."""

    weight: float = Field(1.0, gt=0, description="Weight of the KL term (per labelled token, like the task loss).")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of teacher and student (KL scaled by T^2).")
    data: list[DatasetSpec] = Field(
        default_factory=list, description="Reference data for the KL; empty: the training batches themselves.")
    teacher: Literal["auto", "adapters_off", "copy", "cached"] = Field(
        "auto", description="auto: the same model with adapters disabled for adapter methods, a frozen copy for "
        "full/freeze. cached: top-k teacher logits computed once and kept on disk.")
    top_k: int = Field(64, ge=1, description="teacher: cached keeps this many logits per token.")


class ReplaySettings(_Strict):
    """Mix general or earlier-task data into every batch."""

    data: list[DatasetSpec] = Field(
        default_factory=list, description="Replay files; empty in a continual run: the buffer kept from earlier stages.")
    ratio: float = Field(0.2, gt=0, lt=1, description="Share of the rows of every optimiser step taken from replay data.")
    buffer: int = Field(200, ge=0, description="Continual runs: training samples kept from each finished stage for replay.")
    schedule: list[tuple[Annotated[int, Field(ge=0)], Annotated[float, Field(gt=0, lt=1)]]] = Field(
        default_factory=list, description="Piecewise-constant ratio: [[step, ratio], ...], each ratio in force from "
        "its optimiser step on (before the first entry: ratio). Replay rows per step = ratio x rows per step, rounded half up.")


class ObjectivesSection(_Strict):
    """Regularisers that keep what the base model knew; they compose with each other and every method."""

    l2sp: L2SPSettings | None = Field(None, description="L2-SP penalty towards the starting weights.")
    ewc: EWCSettings | None = Field(None, description="Elastic weight consolidation (diagonal Fisher).")
    distill: DistillSettings | None = Field(None, description="Distillation from the base model (KL).")
    replay: ReplaySettings | None = Field(None, description="Experience replay of general or earlier data.")


class FsdpSection(_Strict):
    """``train.fsdp``: PyTorch FSDP2 (``fully_shard``) when ``train.distributed: fsdp``."""

    reshard_after_forward: bool = Field(
        True, description="Free each wrapped module's gathered parameters after its forward and gather them again "
        "for the backward (ZeRO-3-like, least memory); false keeps them until the backward (ZeRO-2-like, less "
        "communication).")
    wrap: list[str] | None = Field(
        None, description="Class names of the modules sharded as units, e.g. [LlamaDecoderLayer] (default: the "
        "model's decoder layers, transformers' _no_split_modules). The rest (embeddings, final norm, head) form "
        "one more unit.")
    mixed_precision: bool = Field(
        True, description="Under bf16/fp16 precision, gather parameters and compute in that dtype, reduce "
        "gradients in fp32 (FSDP2's MixedPrecisionPolicy); the optimiser keeps fp32 masters. false: fp32 "
        "parameters under autocast, as DDP runs. No effect under fp32.")
    offload_params: bool = Field(
        False, description="Keep the sharded parameters, gradients and optimiser state in CPU memory between uses "
        "(FSDP2's CPUOffloadPolicy; the optimiser steps on the CPU). For GPUs; on a CPU run there is nothing to "
        "offload to.")


class DeepSpeedSection(_Strict):
    """``train.deepspeed``: DeepSpeed ZeRO when ``train.distributed: deepspeed``."""

    stage: Literal[1, 2, 3] | None = Field(
        None, description="ZeRO stage: 1 shards the optimiser state, 2 also the gradients, 3 also the parameters "
        "(default: the stage in train.deepspeed.config, else 2).")
    offload_optimizer: Literal["cpu", "none"] = Field(
        "none", description="cpu: the optimiser state and step live in CPU memory (ZeRO-Offload; stages 1-3).")
    offload_params: Literal["cpu", "none"] = Field(
        "none", description="cpu: parameters live in CPU memory between uses (ZeRO-Infinity; stage 3 only).")
    reshard_after_forward: bool | None = Field(
        None, description="Stage 3: free each layer's gathered parameters after its forward and gather them "
        "again for the backward (least memory, as train.fsdp.reshard_after_forward); false keeps every gathered "
        "parameter until the backward uses it (DeepSpeed's own default, stage3_max_reuse_distance 1e9: the whole "
        "model gathered at the turn of the step). Default: true, unless your JSON sets stage3_max_reuse_distance.")
    config: str | None = Field(
        None, description="Path to your own DeepSpeed JSON. tunelab reads it and sets the batch sizes, gradient "
        "accumulation, clipping and precision from this config; a value of yours that differs from those is "
        "an error naming both ('auto' is filled in).")


class UnfreezeSection(_Strict):
    """Gradual unfreezing (ULMFiT): train the top group first, then add one group below every ``every`` units."""

    every: int = Field(1, ge=1, description="Unfreeze one more group every this many units.")
    unit: Literal["epoch", "step"] = Field("epoch", description="What `every` counts: epochs or optimiser steps.")
    group_size: int = Field(1, ge=1, description="Decoder layers per group (the head and final norm join the top group).")
    start_groups: int = Field(1, ge=1, description="Groups training from the first step.")


class TrainSection(_Strict):
    """Optimiser, schedule, batching, precision, evaluation and checkpoints."""

    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw (torch.optim.AdamW) or sgd (with momentum).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not applied to biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    schedule: Literal["linear", "cosine", "constant", "stlr"] = Field(
        "cosine", description="LR decay after warm-up; stlr: slanted triangular (ULMFiT; no warm-up, see stlr_*)."
    )
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up length in optimiser steps.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warm-up as a share of all steps (instead of warmup_steps).")
    batch_size: int = Field(4, ge=1, description="Samples (or packed rows) per micro-batch per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    epochs: float | None = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables clipping.")
    seed: int = Field(42, description="Seeds data order, dropout and initialisation.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto: bf16 autocast on GPUs and CPUs that support it, fp16 with loss scaling on older GPUs, "
        "fp32 otherwise. The choice is recorded in the run.",
    )
    eval_every: int = Field(0, ge=0, description="Evaluate every N optimiser steps (0: only at the end).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N optimiser steps (0: only at the end).")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many step checkpoints (oldest pruned).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better eval loss."
    )
    log_every: int = Field(1, ge=1, description="Write metrics every N optimiser steps.")
    max_nonfinite_steps: int = Field(
        5, ge=1, description="Stop after this many consecutive steps with a non-finite loss or gradient."
    )
    tensorboard: bool = Field(False, description="Also log to TensorBoard (needs the tensorboard extra).")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per process (default: physical cores / processes with "
        "train.cpu_tuning, else torch's own default)."
    )
    cpu_tuning: bool = Field(
        True,
        description="Tune the training process for CPU speed (src/tunelab/train/cpu_tuning.py), recorded in the "
        "run's env.json: torch threads = physical cores / processes unless train.threads is set; glibc malloc "
        "keeps memory freed by one step for the next (no page faults re-fetching it; Linux/glibc, CPU only; "
        "stays set for the rest of the process; under fsdp / deepspeed it returns freed memory instead, so a "
        "rank's heap does not fragment); a shorter GIL switch interval while micro-batches run in "
        "threads. false: the process as Python, torch and glibc set it.",
    )
    processes: int = Field(
        1, ge=1,
        description="Data-parallel processes `tunelab train` starts on this machine (DDP: gloo on CPU, one GPU "
        "each). Each takes batch_size rows per micro-batch. On CPU, several one-thread processes can be faster "
        "than one multi-thread process, at one model copy per process. Under accelerate launch / torchrun the launcher decides.",
    )
    distributed: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="How several processes share the work: ddp (every rank holds the whole model), fsdp "
        "(PyTorch FSDP2: parameters, gradients and optimiser state sharded; train.fsdp) or deepspeed (ZeRO "
        "stage 1/2/3, optional CPU offload; train.deepspeed; pip install 'tunelab[deepspeed]'). One process "
        "with fsdp or deepspeed runs the same engine with one shard. See docs/scaling.md.")
    fsdp: FsdpSection | None = Field(None, description="FSDP2 settings (train.distributed: fsdp).")
    deepspeed: DeepSpeedSection | None = Field(None, description="DeepSpeed ZeRO settings (train.distributed: deepspeed).")
    micro_batch_threads: int | None = Field(
        None, ge=1,
        description="Run this many micro-batches of an optimiser step at once, each in its own thread with "
        "threads / N intra-op threads (CPU, one process). Gradients are "
        "summed in micro-batch order, whatever finishes first. Default: 2 on a CPU with 2+ threads for adapter "
        "runs (<= 5% of parameters trained, tunelab's kernels on, grad_accum >= 2, no dropout, distillation, "
        "gradient checkpointing or compile); else 1.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute layer activations in the backward pass: less memory, one more forward pass of compute per step."
    )
    compile: bool = Field(
        False, description="torch.compile the decoder (packed rows are padded to max_length for static shapes); "
        "tunelab's fused decoder layers and packed attention (train.fused_kernels) run eagerly inside it."
    )
    fused_kernels: bool = Field(
        True,
        description="Use tunelab's training kernels where they apply: segment-wise causal attention for packed "
        "rows on CPU, fused Llama/Mistral/Qwen2 decoder layers (frozen base, LoRA or none) and a fused LoRA linear "
        "forward/backward. They are used only with the transformers / PEFT versions they were tested with "
        "(tunelab.kernels.TESTED); on others training prints one line and runs the stock code. false: the stock "
        "transformers / PEFT code.",
    )
    # --- ULMFiT-style tools (train/schedule.py); they apply to full, freeze and LoRA-family runs
    stlr_cut_frac: float = Field(0.1, gt=0, lt=1, description="schedule stlr: share of the steps spent rising to the peak LR.")
    stlr_ratio: float = Field(32.0, ge=1, description="schedule stlr: how much smaller the lowest LR is than the peak.")
    layer_lr_decay: float | None = Field(
        None, gt=0, le=1,
        description="Discriminative LRs: the head and final norm train at train.lr, each decoder layer below at this "
        "factor times the one above, the input embeddings last (e.g. 0.9; ULMFiT uses 1/2.6).",
    )
    unfreeze: UnfreezeSection | None = Field(
        None, description="Gradual unfreezing: layer groups start training top-down, one more every N epochs or steps."
    )

    @property
    def sharded(self) -> bool:
        """Whether ``distributed`` shards the model over the ranks (fsdp and deepspeed do; ddp replicates it).
        The engines' own ``sharded`` says the same (tested): the config knows it so that a process that only
        reads the config, such as the launcher, need not import the engines (torch and the model stack)."""
        return self.distributed != "ddp"


class ClassificationSection(_Strict):
    """Options of the classification tasks (``task: classification`` and ``task: generative_classification``)."""

    labels: list[str] | None = Field(
        None,
        description="The label set, in class-id order. Default: every label of the training data, sorted "
        "(numerically when all labels are integers). Evaluation rows with another label are rejected.",
    )
    pooling: Literal["auto", "last", "mean", "cls"] = Field(
        "auto",
        description="Sequence representation fed to the head: the last non-pad token (decoders), the mean over "
        "non-pad tokens (sentence encoders), or the first token. auto: last for causal LMs, mean for encoders.",
    )
    class_weights: Literal["balanced"] | dict[str, float] | None = Field(
        None,
        description="Per-class loss weights: 'balanced' (n / (k * count), scikit-learn's rule) or {label: weight}; "
        "each example's cross-entropy is multiplied by its class weight, the mean is over examples.",
    )
    prompt: str = Field(
        "Classify the text into exactly one of these labels: {labels}.\n\nText: {text}\n\nAnswer with the label only.",
        description="generative_classification: the user turn built from each row; {labels} is the comma-separated "
        "label set and {text} the row's text. The assistant's answer is the label.",
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="generative_classification: tokens generated per answer at evaluation "
        "(default: the longest label's tokens + 4)."
    )


class TaskSpec(_Strict):
    """One task of a multi-task run (``task: multitask``): its type, labels, loss weight and head."""

    type: Literal["classification", "sft", "generative_classification"] = Field(
        ..., description="classification: its own head on the shared backbone; sft and generative_classification: "
        "the shared LM head (the label is the assistant's answer).")
    labels: list[str] | None = Field(None, description="Label set in class-id order (default: the training labels, sorted).")
    weight: float = Field(1.0, gt=0, description="Loss weight: this task's mean loss is multiplied by it in its steps "
                          "and in the combined eval loss.")
    class_weights: Literal["balanced"] | dict[str, float] | None = Field(
        None, description="classification: per-class loss weights ('balanced' or {label: weight}).")
    pooling: Literal["auto", "last", "mean", "cls"] = Field("auto", description="classification: pooling fed to the head.")
    head_layers: int = Field(0, ge=0, le=8, description="classification: hidden layers of this task's head (0: linear).")
    head_width: int | None = Field(None, ge=1, description="classification: units per hidden head layer (default: hidden size).")
    head_activation: Literal["gelu", "relu", "tanh", "silu"] = Field("gelu", description="classification: head activation.")
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="classification: dropout before each head layer.")
    prompt: str | None = Field(None, description="generative_classification: the user-turn template "
                               "(default: classification.prompt).")


class TaskSamplingSection(_Strict):
    """Which task each optimiser step trains on (``task: multitask``); every step holds one task's rows."""

    strategy: Literal["proportional", "temperature", "round_robin"] = Field(
        "proportional", description="proportional: steps per task in proportion to its training rows; temperature: "
        "to rows^(1/temperature); round_robin: the tasks in turn, in config order.")
    temperature: float = Field(2.0, gt=0, description="strategy temperature: T (1 = proportional; large = uniform).")


class StageSpec(_Strict):
    """One stage of a continual run (``tunelab continual``): its own data and optional overrides.

    Each section given here is merged over the top-level one (mappings key by key, lists
    replace; a method with another name replaces the method); the result is validated as a
    whole config. See docs/forgetting.md.
    """

    name: SafeName = Field(..., description="Stage (task) name: the column of the accuracy matrix; its folder is "
                           "stages/<k>-<name> (letters, digits, '.', '_', '-', '+'; no '/', not starting with '.').")
    task: Literal["sft", "pretrain", "classification", "generative_classification"] | None = Field(
        None, description="The stage's task (default: the top-level task).")
    data: dict[str, Any] | None = Field(None, description="Overrides of the data section (train, eval, eval_ratio...).")
    method: dict[str, Any] | None = Field(None, description="Overrides of the method section.")
    train: dict[str, Any] | None = Field(None, description="Overrides of the train section.")
    objectives: dict[str, Any] | None = Field(None, description="Overrides of the objectives section (regularisers, replay).")
    classification: dict[str, Any] | None = Field(None, description="Overrides of the classification section.")
    eval: dict[str, Any] | None = Field(None, description="Overrides of the eval section.")


class PreferenceSection(_Strict):
    """Options of ``task: preference`` and ``task: reward`` (docs/preference.md has the formulas)."""

    loss: Literal["dpo", "ipo", "hinge", "orpo", "simpo", "kto"] = Field(
        "dpo", description="dpo: -log sigmoid(beta * margin of log-ratios); ipo: (length-normalised margin - "
        "1/(2 beta))^2; hinge: relu(1 - beta * margin); orpo: SFT on the chosen reply + beta * odds-ratio term, "
        "no reference; simpo: -log sigmoid(beta * length-normalised margin - gamma), no reference; kto: unpaired "
        "samples (data with a boolean label, or pairs split into desirable / undesirable).")
    beta: float = Field(0.1, gt=0, description="beta: the KL strength of dpo/ipo/hinge/kto, the scale of simpo, the "
                        "odds-ratio weight (lambda) of orpo.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo and simpo: the share of pairs assumed "
                                   "flipped (conservative DPO).")
    gamma: float = Field(0.5, ge=0.0, description="simpo: the target reward margin.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable samples' loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable samples' loss.")
    sft_weight: float = Field(0.0, ge=0.0, description="Adds sft_weight x the chosen reply's mean NLL per token to "
                              "each pair's loss (RPO). Pair losses only.")
    reference: Literal["auto", "adapters_off", "copy", "cached"] = Field(
        "auto", description="The reference model of dpo/ipo/hinge/kto: adapters_off (the same model with its "
        "adapters switched off: no second copy), copy (a frozen copy in memory), cached (its log-probabilities "
        "computed once before training and cached on disk by content). auto: adapters_off for adapter methods, "
        "cached for full / freeze.")
    max_prompt_length: int | None = Field(None, ge=1, description="Truncation keeps at most this many prompt tokens "
                                          "(its tail) when prompt + reply exceed data.max_length (default: half of it).")


def _default_method():

    return METHODS["lora"].Config()


class TuneConfig(_Strict):
    """A fine-tuning run."""

    task: Literal["sft", "pretrain", "classification", "generative_classification", "multitask", "preference",
                  "reward"] = Field(
        "sft",
        description="sft: chat/instruction tuning (loss on assistant tokens). pretrain: continued pre-training on "
        "raw text (documents joined with eos, cut into max_length rows, every token a target). classification: "
        "a class head on the model (labels from the data). generative_classification: the label is the "
        "assistant's answer; evaluation parses it and reports accuracy and macro-F1. multitask: the tasks of "
        "`tasks` on one shared model (each data.train entry names its task). preference: DPO, IPO, hinge, ORPO, "
        "SimPO or KTO on chosen / rejected replies (see `preference`). reward: a scalar head trained on pairs "
        "(Bradley-Terry); evaluation reports pair accuracy.",
    )
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection
    data: DataSection
    method: MethodConfig = Field(default_factory=lambda: _default_method(), description="The tuning method.")  # type: ignore[assignment]
    train: TrainSection = Field(default_factory=TrainSection)
    classification: ClassificationSection = Field(
        default_factory=ClassificationSection, description="Options of the classification tasks."
    )
    preference: PreferenceSection = Field(
        default_factory=PreferenceSection, description="Options of task: preference and task: reward.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Evaluation after training, report, MLflow.")
    objectives: ObjectivesSection = Field(
        default_factory=ObjectivesSection, description="Keep what the model knew: L2-SP, EWC, distillation, replay."
    )
    tasks: dict[str, TaskSpec] = Field(
        default_factory=dict, description="task: multitask: task name -> its type, labels, loss weight and head.")
    task_sampling: TaskSamplingSection = Field(
        default_factory=TaskSamplingSection, description="task: multitask: which task each optimiser step trains on.")
    stages: list[StageSpec] | None = Field(
        None, description="Continual learning: tasks trained one after another (tunelab continual), each stage "
        "starting from the previous one's weights; every task is scored after every stage.")
    sweep: SweepSection | None = Field(None, description="Hyperparameter search (tunelab sweep; train ignores it).")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# --------------------------------------------------------------------------- loading


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}``; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE such as train.lr=1e-4")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def set_path(tree: dict, dotted: str, value: Any) -> None:
    node: Any = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = int(part)
            while len(node) <= idx:
                node.append({})
            node = node[idx]
            continue
        if part not in node or not isinstance(node[part], dict | list):
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        while len(node) <= idx:
            node.append({})
        node[idx] = value
    else:
        node[last] = value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: tree}


def _fields_at(loc: tuple) -> list[str]:
    """Field names valid at a location (for "did you mean" hints)."""
    model: Any = TuneConfig

    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        if part == "method":
            return sorted({f for m in METHODS.values() for f in m.Config.model_fields})
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        if inner:  # list[DatasetSpec] and friends
            ann = next((a for a in inner if hasattr(a, "model_fields")), ann)
        model = ann if hasattr(ann, "model_fields") else None
    return list(model.model_fields) if model is not None and hasattr(model, "model_fields") else []


# pydantic names the member of a union it tried in the error location (``literal['balanced']``,
# ``dict[str,float]``, ``function-after[...]``, ``int``): not a config key, so not part of the path.
_UNION_TAGS = {"dict", "list", "tuple", "str", "int", "float", "bool"}


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or part in _UNION_TAGS)


def _merge_union_errors(errors: list[dict]) -> list[dict]:
    """One problem per field: a value that fits no member of a union (``'balanced'`` or a mapping)
    gives pydantic one error per member; they become one error at the field's path, their
    messages joined with "or"."""
    merged: dict[tuple, dict] = {}
    for err in errors:
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        if loc in merged and loc != tuple(err["loc"]):
            first = merged[loc]
            first["msg"] = f"{first['msg']}, or {err['msg'][0].lower()}{err['msg'][1:]}"
            continue
        merged.setdefault(loc, {**err, "loc": loc})
    return list(merged.values())


def _format_error(err: dict, method_names: list[str]) -> str:
    loc = tuple(p for p in err["loc"] if p not in method_names or err["loc"][0] != "method")
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        raw_loc = err["loc"]
        if raw_loc[0] == "method" and len(raw_loc) > 2 and raw_loc[1] in method_names:

            options = [f for f in METHODS[raw_loc[1]].Config.model_fields if f != "name"]
            guess = difflib.get_close_matches(str(loc[-1]), options, n=1)
            hint = f"did you mean '{guess[0]}'?" if guess else f"its keys are: {', '.join(options) or '(none)'}"
            return f"{path}: unknown key for method '{raw_loc[1]}'. Remove it; {hint}"
        parent = loc[:-1]
        options = _fields_at(parent)
        guess = difflib.get_close_matches(str(loc[-1]), options, n=1)
        hint = f"did you mean '{guess[0]}'?" if guess else f"valid keys here: {', '.join(options)}"
        return f"{path}: unknown key. Remove it; {hint}"
    if kind == "unsafe_name":  # check_name's wording already holds the value and the fix
        return f"{path}: {err['msg']}"
    if kind == "missing":
        return f"{path}: required field is missing. Add it to the config or pass --set {path}=..."
    if kind == "union_tag_not_found":
        return f"{path}.name: missing. Choose one of: {', '.join(method_names)}"
    if kind == "union_tag_invalid":
        return f"{path}.name: unknown method (got {value.get('name') if isinstance(value, dict) else value!r}). Choose one of: {', '.join(method_names)}"
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{path}: {err['msg']} (got {shown}). Fix the value in the config or with --set {path}=..."


def _distributed_problems(cfg: TuneConfig) -> list[str]:
    """``train.distributed`` with its sections, the method and the task (docs/scaling.md)."""
    t, p = cfg.train, []
    engine = t.distributed
    for key, needs in (("fsdp", "fsdp"), ("deepspeed", "deepspeed")):
        if getattr(t, key) is not None and engine != needs:
            p.append(f"train.{key} is set, but train.distributed is {engine}: its settings (offload among them) "
                     f"apply only to that engine. Set train.distributed: {needs}, or remove train.{key}")
    ds = t.deepspeed
    if engine == "deepspeed" and ds is not None and ds.offload_params == "cpu" and ds.stage in (1, 2):
        p.append(f"train.deepspeed.offload_params: cpu needs ZeRO stage 3 (got train.deepspeed.stage: {ds.stage}): "
                 "only stage 3 shards the parameters. Set train.deepspeed.stage: 3, or offload_params: none")
    if not t.sharded:
        return p
    what = "FSDP" if engine == "fsdp" else "DeepSpeed ZeRO"
    if not getattr(_method(cfg.method.name), "SHARDS", False):
        p.append(f"method.name={cfg.method.name} with train.distributed: {engine} is not supported: {what} is tested "
                 "with the full, freeze and lora methods. Use one of them, or train.distributed: ddp")
    elif getattr(cfg.method, "dora", False) and engine == "deepspeed" and ds is not None and ds.stage == 3:
        p.append("method.dora: true with train.deepspeed.stage: 3 is not supported: DoRA reads the whole base "
                 "weight outside the layer's forward, where ZeRO-3 has not gathered it. Use stage 1 or 2, "
                 "train.distributed: fsdp, or method.dora: false")
    objectives = [k for k in ("l2sp", "ewc", "distill", "replay") if getattr(cfg.objectives, k) is not None]
    if objectives:
        p.append(f"objectives.{objectives[0]} with train.distributed: {engine} is not supported: it needs a second, "
                 f"whole view of the weights (an anchor, the Fisher, a teacher with the adapters off) that {what} "
                 "shards away. Use train.distributed: ddp, or remove the objective")
    if t.micro_batch_threads is not None and t.micro_batch_threads > 1:
        p.append(f"train.micro_batch_threads: {t.micro_batch_threads} with train.distributed: {engine}: the engine "
                 "reduces gradients in its own hooks, one micro-batch at a time. Set train.micro_batch_threads: 1")
    if t.unfreeze is not None:
        p.append(f"train.unfreeze with train.distributed: {engine} is not supported: the engine fixes which "
                 "parameters it shards and steps when it starts. Use train.distributed: ddp, or remove train.unfreeze")
    if t.compile:
        p.append(f"train.compile with train.distributed: {engine} is not supported yet. Set train.compile: false")
    return p


def zero3_refusal(task: str) -> str:
    """The one line for a task that trains under FSDP and ZeRO-1/2 but not ZeRO-3 (the task's ``zero3`` fact)."""
    return (f"task: {task} with train.deepspeed stage 3 is not supported: its loss reads the output head's weight "
            "in the backward, where ZeRO-3 has freed it. Use train.distributed: fsdp, or train.deepspeed.stage: 2")


def _cross_field_problems(cfg: TuneConfig, *, task_rules: bool = True) -> list[str]:
    """Rules that involve several fields; worded with the field paths. ``task_rules``: also the task's own
    rules, which load the model stack (see :func:`load_config`)."""
    p: list[str] = []
    t, d = cfg.train, cfg.data
    if t.warmup_steps is not None and t.warmup_ratio is not None:
        p.append("train.warmup_steps and train.warmup_ratio are both set. Choose one.")
    if t.max_steps is None and t.epochs is None:
        p.append("train.epochs and train.max_steps are both empty. Set one of them.")
    has_eval = bool(d.eval) or d.eval_ratio > 0
    if t.early_stopping_patience is not None and not has_eval:
        p.append("train.early_stopping_patience needs validation data: set data.eval or data.eval_ratio.")
    if d.packing and d.group_by_length:
        p.append("data.packing and data.group_by_length are both set: packed rows have no padding to save. Choose one.")
    if t.compile and not d.packing:
        p.append("train.compile needs data.packing: true (fixed-width rows give the static shapes it compiles for).")
    if t.schedule == "stlr" and (t.warmup_steps or t.warmup_ratio):
        p.append("train.schedule stlr has its own rise (train.stlr_cut_frac): remove train.warmup_steps / warmup_ratio.")

    if d.packing and getattr(_method(cfg.method.name), "VIRTUAL_TOKENS", False):
        p.append(f"data.packing is not supported with method {cfg.method.name}: its virtual tokens must precede every "
                 "sample. Set data.packing: false")
    if t.gradient_checkpointing and not getattr(_method(cfg.method.name), "GRADIENT_CHECKPOINTING", True):
        p.append(f"train.gradient_checkpointing is not supported with method {cfg.method.name} (its prefix lives in "
                 "the attention cache, which recomputation replays). Set train.gradient_checkpointing: false")
    if d.eval and d.eval_ratio > 0:
        p.append("data.eval and data.eval_ratio are both set. Choose one source of validation data.")

    p += data_problems(d)
    p += _distributed_problems(cfg)

    p += keep_problems(cfg)
    if cfg.sweep is not None:

        p += sweep_problems(cfg.sweep, flatten(cfg.model_dump(mode="json", exclude={"sweep"})),
                            {n: set(m.Config.model_fields) for n, m in METHODS.items()})
    if cfg.stages:
        p.append("stages: this config describes a continual run (task after task). Run it with: tunelab continual CONFIG")
    if not task_rules:
        return p
    # the task's own rules; the task modules build models (torch), so they load when a config is checked
    from tunelab import tasks  # noqa: PLC0415

    p += tasks.problems(cfg)
    if cfg.train.sharded and not tasks.get(cfg.task).shards:
        p.append(f"task: {cfg.task} with train.distributed: {cfg.train.distributed} is not supported (its loss "
                 "needs a second view of the model, or several heads). Use train.distributed: ddp")
    elif (cfg.train.distributed == "deepspeed" and cfg.train.deepspeed is not None and cfg.train.deepspeed.stage == 3
          and not tasks.get(cfg.task).zero3):
        p.append(zero3_refusal(cfg.task))
    return p


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None, *,
                task_rules: bool = True) -> tuple[TuneConfig, dict[str, str]]:
    """Read, override and validate a config. Returns the config and each field's source.

    Raises :class:`ConfigError` listing every problem found. ``task_rules=False`` leaves out the task's own
    rules, whose modules import torch, transformers and peft (about 6 s on a 2-core machine): for a process
    that only reads the config and starts others that check it whole (``tunelab train``'s launcher).
    """
    raw: dict[str, Any] = dict(base or {})
    source_name = "config"
    if path is not None:
        path = Path(path)
        source_name = str(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found. Check the path, or start from one in examples/")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise UserError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)}). Fix the syntax") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a UTF-8 text file. Save the config as UTF-8 YAML") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections (got {type(loaded).__name__}). See examples/")
        raw.update(loaded)
    from_file = set(flatten(raw))
    over = parse_overrides(overrides or [])
    for key, value in over.items():
        try:
            set_path(raw, key, value)
        except (ValueError, TypeError, IndexError):
            raise UserError(f"--set {key}={value!r}: that path does not fit the config's structure") from None


    if isinstance(raw.get("method"), dict) and "name" not in raw["method"]:
        raw["method"] = {"name": "lora", **raw["method"]}  # the default method
    try:
        cfg = TuneConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_format_error(e, list(METHODS)) for e in _merge_union_errors(exc.errors())]
        raise ConfigError(list(dict.fromkeys(problems)), source_name) from None
    problems = _cross_field_problems(cfg, task_rules=task_rules)
    if problems:
        raise ConfigError(problems, source_name)

    sources: dict[str, str] = {}
    for key in flatten(cfg.model_dump(mode="json")):
        if any(key == o or key.startswith(o + ".") for o in over):
            sources[key] = "--set"
        elif key in from_file:
            sources[key] = source_name
        else:
            sources[key] = "default"
    return cfg, sources


def dump_config(cfg: TuneConfig, sources: dict[str, str] | None = None) -> str:
    """The resolved config as YAML; with ``sources``, each leaf is annotated ``# from <source>``."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    if not sources:
        return text
    return text + "\n# where each value came from:\n" + "".join(
        f"#   {k} = {v}\n" for k, v in sorted(sources.items()) if v != "default"
    )


def describe_schema(model: type[BaseModel] = TuneConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(path, type, default, description) for every field: the source of ``--help``."""

    rows: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        if name == "method" and model is TuneConfig:
            for mname, module in METHODS.items():
                rows.append((f"method.name={mname}", "", "", (module.Config.__doc__ or "").strip()))
                rows.extend(describe_schema(module.Config, f"method[{mname}]."))
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_schema(ann, path + "."))
            continue
        inner = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:
            rows.append((path, "list", "[]" if not field.is_required() else "required", field.description or ""))
            rows.extend(describe_schema(inner[0], path + "[]."))
            continue
        if name == "name" and prefix.startswith("method["):
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        rows.append((path, type_name, default, field.description or ""))
    return rows
