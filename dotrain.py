"""Step 4: LoRA fine-tuning on the model-ready shards, one shard after another, resumable.

    models/<MODEL_NAME>/                        base model (import-model.py)
    model-ready/<MODEL_NAME>/<DATASET_NAME>/<INPUTS>/  input_ids, labels, length; held-out rows
                                (pretokenize.py, with the same MAX_SEQ_LENGTH, CHAT_TEMPLATE,
                                EVAL_ROWS and PART_SIZE: common.model_ready_location)
 -> checkpoints/<MODEL_NAME>/<DATASET_NAME>[/<RUN_NAME>]/
        _manifest.json          the plan: optimizer steps of each shard, epochs
        lease.json              the launch training the run now: one at a time (training/lease.py)
        checkpoint-<step>/      adapter, optimizer, scheduler, every process's RNG, trainer state;
                                _checkpoint.json, written last, says it is whole
        latest.json             the checkpoint to resume from, written once its upload finished
    done/<MODEL_NAME>/<DATASET_NAME>[/<RUN_NAME>]/
        lora_model/             the adapter and tokenizer (PeftModel.from_pretrained)
        fused/                  the adapter merged into the base's weights files, same names
                                and dtypes (AutoModelForCausalLM, vLLM)
        metrics.json, loss.png  training and evaluation loss; tensorboard/ with REPORT_TO
        _manifest.json          written last

NUM_EPOCHS passes over every shard, in manifest order, under one learning-rate schedule whose
length is known before training starts: each shard's optimizer steps are counted from its rows'
lengths alone (the packing of TRL that training uses, run on lengths). Optimizer and schedule
carry over from shard to shard through the checkpoint saved at the end of each shard; one is
also saved every SAVE_STEPS steps or SAVE_MINUTES minutes, whichever comes first. The
evaluation loss on the held-out rows is measured before the first step, at every checkpoint
and at the end. On one CUDA GPU the backend measured faster at the model's size trains
(bench/gpu_train.py; else unsloth when installed); elsewhere transformers + peft do; bf16
where the GPU computes it natively, fp16 with loss scaling on older GPUs, and
LOAD_IN_4BIT trains on a 4-bit base (QLoRA). Checkpoints upload in the background.

Under torchrun (several GPUs, several nodes) the processes train one model with DDP and
transformers + peft: each optimizer step takes BATCH_SIZE x GRAD_ACCUM sequences on every
process, each its own batches of each shard, every sequence once. Each node downloads and
prepares a shard once, one shard ahead, for all its processes; no work that grows with the
model or the data runs while processes wait for each other. Rank 0 writes the bucket.

The export merges the adapter into the base one weights file at a time (host memory: one file,
whatever the model's size), checks every merged weight as it is written and the fused model's
logits against base + adapter on held-out rows, and makes both outputs' generation config stop
at the chat's end of turn. Nothing is published unless every check passes.

This file is the training story: the settings, the run's identity, the backend, the model, the
trainer and its loop over the shards, the evaluation. Its machinery lives in training/: the
processes and ranks, the plan and the shards, the checkpoints, the export and merge, the report.
"""

import gc
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from common import (DATA_SETTINGS, DATASET_NAME_SETTING, MODEL_CACHE_SETTING, MODEL_NAME_SETTING,
                    NOT_TRAINED, Setting, UserError,
                    abort_stale_uploads, checkpoints_prefix, done_prefix, download_model, log,
                    manifest_fingerprint, model_fingerprint, model_prefix, model_ready_location,
                    open_bucket, parse_settings, read_manifest, read_parquet_batches,
                    require_complete, resume_or_start, run as run_step, same_inputs, with_rebuild,
                    write_manifest)
from training.attention import avoid_cudnn_attention, choose as choose_attention
from training.checkpoints import (Uploads, check_run_name, checkpoint_saved, fetch_checkpoint,
                                  pointer_at, replaced_by_force, resume_point, save_every)
from training.export import export
from training.fit import check_fits, model_config
from training.lease import take_lease
from training.merge import weights_files
from training.processes import Ranks, RankView, Work, rank_sampler, shared_exactly
from training.precision import precision_change, skipped_steps
from training.report import evaluation_summary, read_log, set_up_reporting
from training.shards import Plan, UnitRecord, make_plan, position, prepare, prepared_shards, units
from training.speed import (describe, length_multiple, measured_faster, read_config, real_tokens,
                            recorder)

SETTINGS = [
    MODEL_NAME_SETTING,
    DATASET_NAME_SETTING,
    Setting("RUN_NAME", None, "name of this training run: its checkpoints and results go under "
            "checkpoints/ and done/<MODEL_NAME>/<DATASET_NAME>/<RUN_NAME>/, beside other runs (a "
            "sweep); unset: directly under <MODEL_NAME>/<DATASET_NAME>/"),
    Setting("TRAIN_BACKEND", "auto", "unsloth (one CUDA GPU), peft (transformers + peft, any "
            "device) or auto: on one CUDA GPU the backend bench/results/gpu_train.json measured "
            "faster near the model's size, else unsloth when installed; peft elsewhere",
            choices=("auto", "unsloth", "peft")),
    Setting("TRAIN_DEVICE", "auto", "auto: the GPU when torch can use one, and an error, never a "
            "CPU run, when an NVIDIA GPU is there that torch cannot use; cpu: the CPU, even "
            "beside a GPU; cuda: an error without a usable GPU", choices=("auto", "cuda", "cpu")),
    Setting("LOAD_IN_4BIT", False, "train the LoRA on a 4-bit (NF4) copy of the base (QLoRA), so "
            "that a 7-8B model fits a 16-24 GB GPU; CUDA and bitsandbytes only; fused/ is still "
            "the adapter merged into the original 16-bit weights", bool),
    Setting("GRADIENT_CHECKPOINTING", "auto", "recompute each layer's activations in the backward "
            "pass instead of keeping them (less GPU memory, ~30% more compute): auto: on a GPU "
            "(unsloth checkpoints its own way), off on the CPU", choices=("auto", "1", "0")),
    Setting("MAX_SKIPPED_FRACTION", 0.05, "fp16 (T4, V100): the run fails once the loss scaler "
            "has skipped more than this share of the optimizer steps (their gradients overflowed "
            "float16), beyond the 16 it may skip to find its scale", float, minimum=0),
    Setting("LORA_R", 16, "LoRA rank", int, minimum=1),
    Setting("LORA_ALPHA", 16, "LoRA alpha (scale = alpha / r)", int, minimum=1),
    Setting("LORA_DROPOUT", 0.0, "dropout on the LoRA input", float, minimum=0),
    Setting("LORA_TARGETS", "all-linear", "modules that get adapters: all-linear (every linear "
            "projection of the model's blocks, as peft's all-linear), or names, e.g. "
            "q_proj,v_proj"),
    Setting("LEARNING_RATE", 2e-4, "peak learning rate", float, minimum=0),
    Setting("LR_SCHEDULER", "linear", "the learning rate after the warmup, as transformers names "
            "it: linear (down to 0), cosine, constant (no warmup), constant_with_warmup",
            choices=("linear", "cosine", "constant", "constant_with_warmup")),
    Setting("BATCH_SIZE", 2, "sequences per device batch", int, minimum=1),
    Setting("GRAD_ACCUM", 4, "batches per optimizer step", int, minimum=1),
    Setting("WARMUP_STEPS", 5, "optimizer steps of linear warmup", int, minimum=0),
    Setting("WEIGHT_DECAY", 0.01, "AdamW weight decay", float, minimum=0),
    Setting("NUM_EPOCHS", 1, "passes over the dataset, under one schedule; every sequence once "
            "per epoch, in an order shuffled per epoch with SEED", int, minimum=1),
    Setting("SEED", 3407, "seed of the LoRA initialisation and of the data order", int, minimum=0),
    *DATA_SETTINGS,  # pretokenize.py's: they name the data to train on
    Setting("PACKING", True, "pack rows into MAX_SEQ_LENGTH sequences, padding-free (0: one "
            "padded row per sequence)", bool),
    Setting("MAX_STEPS", None, "stop after this many optimizer steps (smoke runs; default: "
            "NUM_EPOCHS epochs)", int, minimum=1),
    Setting("SAVE_STEPS", 200, "optimizer steps between checkpoints (and one at each shard's end)",
            int, minimum=1),
    Setting("SAVE_MINUTES", 30.0, "minutes of training between checkpoints, whichever of "
            "SAVE_STEPS and this comes first: a preemption loses this much at most (0: steps only)",
            float, minimum=0),
    Setting("LEASE_SECONDS", 300, "a run's lease (one launch trains it at a time) not renewed for "
            "this long is a dead launch's, and another launch takes it over", int, minimum=30),
    Setting("CHECK_MEMORY", True, "refuse, before downloading the model, a run estimated not to "
            "fit the GPU's memory (0: try anyway)", bool),
    Setting("LOGGING_STEPS", 1, "optimizer steps between log lines", int, minimum=1),
    Setting("REPORT_TO", "none", "none; tensorboard: event files into done/.../tensorboard/ in the "
            "bucket; wandb: Weights & Biases (WANDB_API_KEY, a secret)",
            choices=("none", "tensorboard", "wandb")),
    Setting("WANDB_PROJECT", "finetune", "the Weights & Biases project of the runs (REPORT_TO=wandb)"),
    Setting("WANDB_API_KEY", help="Weights & Biases key, for REPORT_TO=wandb", secret=True),
    Setting("DIST_TIMEOUT", 1800, "seconds a training process waits for the others (several GPUs "
            "or nodes) before the run fails", int, minimum=60),
    Setting("WORK_DIR", os.path.join(tempfile.gettempdir(), "dotrain"),
            "local scratch directory (two shards per node, a checkpoint, the exported model)"),
    Setting("SAMPLE_PROMPT", "Give three tips for staying healthy.",
            "user message answered greedily by the fused model as a smoke test"),
    MODEL_CACHE_SETTING,
]
CODE_VERSION = "dotrain/3"  # bump when a change alters what training produces


def main():
    settings = parse_settings(__doc__, SETTINGS)
    check_run_name(settings.run_name)
    if settings.train_device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for GPUs
    avoid_cudnn_attention()  # in this process: training, and an export after unsloth's exec
    bucket = open_bucket(settings)
    model_manifest = require_complete(bucket, model_prefix(settings.model_name), "import-model.py")
    run = open_run(settings, bucket)
    if finished_before(run, run_inputs(settings, model_manifest, run.data)):
        log(f"{bucket.url(run.done)} is complete: nothing to do")
        return
    # One launch trains a run at a time; torchrun's first process holds the lease for all.
    lease = take_lease(bucket, run.checkpoints, settings) if os.environ.get("RANK", "0") == "0" else None
    check_gpu_memory(settings, bucket)
    # Every node fetches and verifies the model before the processes meet, so that no download
    # runs while other processes wait in a collective.
    model_dir = download_model(bucket, settings.model_name, settings.model_cache_dir)
    weights_files(model_dir)  # fused/ is merged from safetensors: refuse others now, not after training
    ranks = Ranks.start(settings.dist_timeout)
    # Rank 0 alone decides what to resume and replaces what other inputs made; the others take
    # its word (and its REBUILD mark).
    inputs, done, plan = ranks.from_rank_0(lambda: resume_outputs(run, model_manifest))
    if done["complete"]:
        return
    work = Work(settings, ranks)
    if not plan.complete:
        backend = choose_backend(settings, ranks, plan, model_dir)
        plan = train(run, backend, model_dir, plan, work, ranks)
        if ranks.rank != 0:
            return
        if backend.name == "unsloth":
            log("exporting in a fresh process: unsloth has patched transformers in this one")
            sys.stdout.flush()
            lease.release()  # (the fresh process takes it again)
            os.execv(sys.executable, [sys.executable, *sys.argv])
    export(run, model_dir, plan, inputs, work, held_out_rows(bucket, run.data_prefix, run.data))


# ---------------------------------------------------------------- the run


@dataclass
class Run:
    """What this run trains from and writes to: its settings, the bucket, the model-ready data
    (manifest and prefix) and its two output prefixes."""

    settings: object
    bucket: object
    data: dict  # the model-ready manifest
    data_prefix: str
    checkpoints: str
    done: str


def open_run(settings, bucket):
    data_prefix = model_ready_location(bucket, settings)
    names = [setting.env for setting in DATA_SETTINGS]
    data = require_complete(bucket, data_prefix, "pretokenize.py (with the same "
                            f"{', '.join(names[:-1])} and {names[-1]})")
    return Run(settings, bucket, data, data_prefix,
               checkpoints_prefix(settings.model_name, settings.dataset_name, settings.run_name),
               done_prefix(settings.model_name, settings.dataset_name, settings.run_name))


def run_inputs(settings, model_manifest, data):
    """What the result depends on; a change of any of these is refused over existing output."""
    hyperparameters = {name: getattr(settings, name) for name in (
        "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "learning_rate",
        "lr_scheduler", "batch_size", "grad_accum", "warmup_steps", "weight_decay", "num_epochs",
        "seed", "max_seq_length", "packing", "max_steps")}
    return with_rebuild({"step": CODE_VERSION, "model": model_fingerprint(model_manifest),
                         "model_ready": manifest_fingerprint(data), **hyperparameters},
                        settings, "dotrain")


def finished_before(run, inputs):
    done = read_manifest(run.bucket, run.done)
    return bool(done and done["complete"] and same_inputs(done["inputs"], inputs))


def resume_outputs(run, model_manifest):
    """The run's inputs, its done manifest and, unless done, the plan to resume (or a new one).

    Outputs made from other inputs are replaced when FORCE=1 (or REBUILD) consents; a plan
    with no checkpoint yet holds nothing of value and is replaced without asking."""
    settings, bucket = run.settings, run.bucket
    inputs = run_inputs(settings, model_manifest, run.data)
    mine = replaced_by_force(settings.run_name)
    for prefix in (run.checkpoints, run.done):  # a killed run's open uploads
        abort_stale_uploads(bucket, prefix, mine)
    done = resume_or_start(bucket, run.done, inputs, settings.force, mine=mine)
    if done["complete"]:
        return inputs, done, None
    plan = resume_or_start(bucket, run.checkpoints, inputs, settings.force, mine=mine,
                           replaceable=resume_point(bucket, run.checkpoints) is None)
    return inputs, done, Plan.from_manifest(plan)


# ---------------------------------------------------------------- backend


@dataclass
class Backend:
    name: str  # unsloth | peft
    device: str  # cuda | cpu
    dtype: str  # bfloat16 | float16 | float32: what the model computes in
    optim: str
    load_in_4bit: bool = False
    trainer_class: type = None
    attention: str = "sdpa"  # what keeps packed rows apart (training.attention)
    gradient_checkpointing: bool = None  # None: on a GPU, off on the CPU

    def __post_init__(self):
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = self.device == "cuda"

    @property
    def bf16(self):
        return self.dtype == "bfloat16" and self.device == "cuda"

    @property
    def fp16(self):
        return self.dtype == "float16"


def decide(train_backend, capability, has_unsloth, has_bitsandbytes, world, load_in_4bit, faster=None):
    """(backend, dtype, optimizer) for a GPU of this compute capability ((major, minor), None
    without CUDA): unsloth on one GPU when installed, unless TRAIN_BACKEND=auto and the GPU
    benchmark measured peft `faster` at this model's size, else transformers + peft; bf16 only where
    the GPU computes it natively (compute capability 8.0: A10G, L4, L40S, A100, H100), fp16 with
    loss scaling on older GPUs (T4, V100), fp32 on the CPU; 8-bit AdamW with bitsandbytes."""
    cuda = capability is not None
    if train_backend == "unsloth" and world > 1:
        raise UserError(f"TRAIN_BACKEND=unsloth trains in one process and this run has {world} "
                        "(torchrun): use TRAIN_BACKEND=peft (or auto) on several GPUs")
    if train_backend == "unsloth" and not cuda:
        raise UserError("TRAIN_BACKEND=unsloth needs a CUDA GPU and this machine has none: "
                        "use TRAIN_BACKEND=peft (or auto) here")
    if train_backend == "unsloth" and not has_unsloth:
        raise UserError("TRAIN_BACKEND=unsloth but unsloth is not installed: pip install "
                        "unsloth==2026.10.9 (see requirements.txt), or use TRAIN_BACKEND=peft")
    if load_in_4bit and not (cuda and has_bitsandbytes):
        raise UserError("LOAD_IN_4BIT=1 needs a CUDA GPU and bitsandbytes"
                        + (" (pip install bitsandbytes)" if cuda else ", and this machine has no GPU")
                        + ": set LOAD_IN_4BIT=0 here")
    name = "unsloth" if cuda and has_unsloth and world == 1 and (
        train_backend == "unsloth" or train_backend == "auto" and faster != "peft") else "peft"
    dtype = "float32" if not cuda else "bfloat16" if capability >= (8, 0) else "float16"
    return name, dtype, "adamw_8bit" if cuda and has_bitsandbytes else "adamw_torch"


def backend_choice(settings, capability, world, config):
    """decide() on this machine: the packages installed, and with TRAIN_BACKEND=auto on one GPU
    the backend the GPU benchmark measured faster at the size of the model (its config.json).
    (backend, dtype, optimizer, why): why says what the measurements decided, None where they
    were not consulted."""
    faster = why = None
    if capability is not None and world == 1 and settings.train_backend == "auto":
        faster, why = measured_faster(config, settings.load_in_4bit, settings.packing, capability)
        why += "" if faster else ": unsloth when it is installed"
    name, dtype, optim = decide(
        settings.train_backend, capability, importlib.util.find_spec("unsloth") is not None,
        importlib.util.find_spec("bitsandbytes") is not None, world, settings.load_in_4bit, faster)
    return name, dtype, optim, why


def check_gpu_memory(settings, bucket):
    """Refuse, before the model is downloaded, a run estimated not to fit this process's GPU
    (training/fit.py: from the model's config.json alone); without a GPU, nothing to check."""
    import torch

    if not (settings.check_memory and torch.cuda.is_available()):
        return
    gpu, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    config = model_config(bucket, settings.model_name)
    name, _, optim, _ = backend_choice(settings, torch.cuda.get_device_capability(gpu), world, config)
    properties = torch.cuda.get_device_properties(gpu)
    # On CUDA the loss never holds the full logits (unsloth's fused loss, TRL's fused LM head).
    check_fits(config, settings, name, optim, properties.name, properties.total_memory, fused_loss=True)


def choose_backend(settings, ranks, plan, model_dir):
    """The backend this machine trains with (TRAIN_BACKEND=auto on one GPU: the one the GPU
    benchmark measured faster at this model's size, if it measured both) and its attention;
    unsloth is imported here, before transformers, trl and peft, which it patches. A GPU that
    torch cannot use is an error, not a CPU run."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and settings.train_device != "cpu":
        unusable_gpu(torch)
    if not cuda and settings.train_device == "cuda":
        raise UserError("TRAIN_DEVICE=cuda and this machine has no GPU: use TRAIN_DEVICE=auto here")
    capability = torch.cuda.get_device_capability() if cuda else None
    name, dtype, optim, why = backend_choice(settings, capability, ranks.world,
                                             read_config(model_dir) if cuda else None)
    if why:
        log(f"TRAIN_BACKEND=auto: {why}")
    if plan.optim not in (None, optim):
        raise UserError(f"the checkpoints of this run hold {plan.optim} optimizer state and this "
                        f"machine trains with {optim}: resume on the same kind of machine, or "
                        "rerun with REBUILD=dotrain to start over")
    changed = precision_change(plan.dtype, dtype)
    if changed:
        log(changed)
    if plan.world_size not in (None, ranks.world):
        raise UserError(f"the checkpoints of this run were planned for {plan.world_size} "
                        f"training processes and this run has {ranks.world}: relaunch with as many "
                        "nodes and GPUs, or rerun with REBUILD=dotrain to start over")
    if name == "unsloth":
        import unsloth  # noqa: F401
    elif cuda and settings.train_backend == "auto" and ranks.world > 1:
        log(f"{ranks.world} processes: training with transformers + peft under DDP")
    elif cuda and settings.train_backend == "auto" and importlib.util.find_spec("unsloth") is None:
        log("unsloth is not installed: training with transformers + peft")
    # Packed, padding-free batches are exact with SDPA and FlexAttention too, as long as no KV
    # cache is built (compute_loss passes use_cache=False; the tests check it): TRL's warning
    # does not apply.
    logging.getLogger("trl.trainer.sft_trainer").addFilter(
        lambda record: "Flash Attention variant" not in record.getMessage())
    backend = Backend(name, "cuda" if cuda else "cpu", dtype, optim, settings.load_in_4bit,
                      gradient_checkpointing={"1": True, "0": False}.get(settings.gradient_checkpointing))
    backend.trainer_class = shard_trainer_class(backend, ranks)
    backend.attention = choose_attention(name, capability, settings.packing)
    gpu = f" ({torch.cuda.get_device_name()})" if cuda else ""
    log(f"backend: {name} on {backend.device}{gpu}, {dtype}"
        f"{', 4-bit base' if settings.load_in_4bit else ''}, {optim}, attention: {backend.attention}"
        f"{', gradient checkpointing' if backend.gradient_checkpointing else ''}")
    return backend


def unusable_gpu(torch):
    """Refuse to train on the CPU beside an NVIDIA GPU that this torch build cannot use."""
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return
    gpus = [line.split(",") for line in found.stdout.splitlines() if line.strip()]
    if found.returncode != 0 or not gpus:
        return
    name, driver = (part.strip() for part in gpus[0][:2])
    built_for = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
    raise UserError(f"this machine has an NVIDIA GPU ({name}, driver {driver}) and torch "
                    f"{torch.__version__}, built for {built_for}, cannot use it: install the torch "
                    "build for this driver (allatonce.yaml's setup picks it: see torch-for-driver.sh), "
                    "or set TRAIN_DEVICE=cpu to train on the CPU")


# ---------------------------------------------------------------- training


def train(run, backend, model_dir, plan, work, ranks):
    """Plan the steps (once), then train from the latest checkpoint to the plan's last step, unit
    after unit (a shard in an epoch), measuring the evaluation loss at the start, at every
    checkpoint and at the end. The plan, complete."""
    settings, bucket = run.settings, run.bucket
    if plan.total_steps is None:
        plan = ranks.from_rank_0(lambda: make_plan(settings, bucket, run.data_prefix, run.data,
                                                   plan.inputs, ranks.world))
        plan.optim, plan.dtype = backend.optim, backend.dtype
        if ranks.rank == 0:
            write_manifest(bucket, run.checkpoints, plan.manifest())
    set_up_reporting(settings, bucket.url(run.checkpoints), plan.inputs, work.trainer)
    held_out = held_out_rows(bucket, run.data_prefix, run.data)
    model, tokenizer = load_for_training(settings, backend, model_dir, ranks)
    held_out_batches = evaluation_batches(held_out, settings, tokenizer, ranks)
    how = describe(model.config.to_dict(), backend, ranks.world, plan)
    pointer = ranks.from_rank_0(lambda: resume_point(bucket, run.checkpoints))
    step, total = pointer["step"] if pointer else 0, plan.total_steps
    records = {number: UnitRecord(**record) for number, record in (pointer or {}).get("shards_io", {}).items()}
    if step < total:
        first, into = position(plan, step)
        epoch, index, _, steps = units(plan)[first]
        log(f"resuming at step {step}: shard {index} of epoch {epoch}, after {into} of its {steps} steps"
            if pointer else f"training {total} steps over {len(plan.shards)} shards, "
            f"{plan.epochs} epoch(s)")
        checkpoint = os.path.join(work.trainer, pointer["checkpoint"]) if pointer else None
        with ranks.first(ranks.local_rank == 0):  # a node's processes resume from its one copy
            if pointer and ranks.local_rank == 0:
                fetch_checkpoint(bucket, run.checkpoints, pointer, work.trainer)
        began, seconds_before = time.time(), pointer["seconds"] if pointer else 0.0

        def seconds():  # training time of the whole run so far, this process's and the checkpoints'
            return seconds_before + time.time() - began

        uploads = Uploads(bucket, run.checkpoints, run.done, work, pointer) if ranks.rank == 0 else None
        timed_saves = save_every(settings.save_minutes, ranks)
        for number, prepared, waited in prepared_shards(settings, run.data_prefix, run.data, plan,
                                                        first, work, ranks):
            epoch, index, start, steps = units(plan)[number]
            end = min(start + steps, total)
            if end == step:  # a shard with nothing left to train on
                continue
            record = records.setdefault(str(number), UnitRecord())
            record.waited(waited)
            # The trainer's own order is sequential: this fixed shuffle of the prepared shard,
            # another in each epoch, is what a resumed run skips into.
            order = prepared.shuffle(seed=settings.seed + number, keep_in_memory=True)
            done = (step - start) * settings.batch_size * settings.grad_accum * ranks.world
            sequences = order.select(range(done, len(order)), keep_in_memory=True)
            view = RankView(sequences) if ranks.world > 1 else sequences
            pointer_of = lambda at: pointer_at(plan, at, seconds(), backend, records)  # noqa: E731
            callbacks = [unit_end(ranks, end, end == start + steps, record, view, done),
                         checkpoint_saved(bucket, run.checkpoints, ranks, uploads, pointer_of, record),
                         timed_saves, evaluation(held_out_batches, len(held_out), ranks, backend),
                         recorder(how)]  # (the evaluation runs at every save)
            if backend.fp16:
                callbacks.append(skipped_steps(records, record, settings.max_skipped_fraction))
            trainer = make_trainer(settings, backend, model, tokenizer, sequences, work, total, callbacks)
            trainer.train_dataset, trainer.shard, trainer.seconds = view, index, seconds
            log(f"epoch {epoch}, shard {index} ({plan.shards[index]['path']}): steps {step + 1}..{end}")
            trainer.train(resume_from_checkpoint=checkpoint)
            if trainer.state.global_step != end:
                raise RuntimeError(f"shard {index} ended at step {trainer.state.global_step}, "
                                   f"not at the planned {end}")
            ranks.barrier()  # each node's checkpoint is saved before any of its ranks loads it
            step, checkpoint = end, os.path.join(work.trainer, f"checkpoint-{end}")
            del trainer, order, sequences, view, prepared
            release_memory()
            if step >= total:
                break
        if uploads:
            record.waited(uploads.finish())
        evaluations = read_log(checkpoint)[1]
        if len(evaluations) > 1:
            log(evaluation_summary(evaluations, len(held_out)))
    peaks = ranks.gather(work.peak_bytes if ranks.local_rank == 0 else None)
    plan.complete = True
    plan.shards_io = {number: record.as_json() for number, record in records.items()}
    plan.work_dir_peak_bytes = {f"node {ranks.node_of(rank)}": peak
                                for rank, peak in enumerate(peaks) if peak is not None}
    if ranks.rank == 0:
        write_manifest(bucket, run.checkpoints, plan.manifest())
    skipped = sum(len(record.skipped_steps or []) for record in records.values())
    log(f"training complete: {total} steps"
        + (f", {skipped} of them skipped by the fp16 loss scaler" if backend.fp16 else ""))
    del model
    release_memory()
    return plan


def release_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the model


def load_for_training(settings, backend, model_dir, ranks):
    """The base model, loaded straight onto its device (4-bit with LOAD_IN_4BIT), with fresh
    LoRA adapters on LORA_TARGETS, and its tokenizer."""
    import torch
    from transformers import AutoTokenizer, set_seed

    set_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = getattr(torch, backend.dtype)
    lora = dict(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                bias="none")
    if backend.name == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            model_name=model_dir, max_seq_length=settings.max_seq_length, dtype=dtype,
            load_in_4bit=backend.load_in_4bit, load_in_16bit=not backend.load_in_4bit,
            use_exact_model_name=True)
        return FastLanguageModel.get_peft_model(
            model, **lora, target_modules=lora_targets(model, settings.lora_targets),
            use_gradient_checkpointing="unsloth" if backend.gradient_checkpointing else False,
            random_state=settings.seed), tokenizer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    where = {"device_map": {"": torch.device("cuda", ranks.local_rank)}} if backend.device == "cuda" else {}
    if backend.load_in_4bit:
        where["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation=backend.attention, **where)
    # Not peft's prepare_model_for_kbit_training: it casts every 16-bit weight (embeddings, output
    # layer, norms) to float32, ~2 GB more for an 8B model. get_peft_model freezes the base, and
    # the trainer makes the embeddings' output require grad for checkpointed layers.
    targets = lora_targets(model, settings.lora_targets)
    return get_peft_model(model, LoraConfig(**lora, target_modules=targets, task_type="CAUSAL_LM")), tokenizer


def lora_targets(model, setting):
    """The names of the modules to adapt: every linear projection of the model's blocks (all
    but the output layer, as peft's all-linear), or the names given."""
    import torch

    if setting != "all-linear":
        return [name.strip() for name in setting.split(",") if name.strip()]
    output = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not output})


# ---------------------------------------------------------------- the trainer


def shard_trainer_class(backend, ranks=Ranks()):
    """TRL's SFTTrainer (unsloth's when unsloth is imported) that counts only the real tokens of
    its padded batches and also logs, at each logging step, the shard, the tokens per second
    since the last log, the training time so far, the time left at the run's pace so far and the
    batch shapes this process met. Under DDP each rank takes its own batches of the shard
    (training.processes.rank_sampler)."""
    import torch
    import transformers
    from trl import SFTTrainer

    class ShardTrainer(SFTTrainer):
        shard = None  # the index of the shard being trained
        seconds = None  # () -> training seconds of the whole run so far
        last_log = None  # (time, tokens seen) at the previous log of this process
        shapes = set()  # the batch shapes this process met (every shard's trainer adds to it)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if backend.device == "cuda":  # TRL's fused LM head (unsloth's loss): no full logits
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # trl 1.15's own loss calls a Triton kernel that CPU torch lacks; transformers' gives
            # the same numbers.
            return transformers.Trainer.compute_loss(self, model, {**inputs, "use_cache": False},
                                                     return_outputs, num_items_in_batch)

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None or ranks.world == 1 or backend.device != "cpu":
                return super()._load_optimizer_and_scheduler(checkpoint)
            # transformers maps a DDP run's optimizer state to args.device, which is "cpu:0" on
            # CPUs, a location torch.load does not know.
            import torch

            for name, part in (("optimizer.pt", self.optimizer), ("scheduler.pt", self.lr_scheduler)):
                part.load_state_dict(torch.load(os.path.join(checkpoint, name), map_location="cpu",
                                                weights_only=True))

        def _get_train_sampler(self, train_dataset=None):
            if ranks.world == 1:
                return super()._get_train_sampler(train_dataset)
            return rank_sampler(len(self.train_dataset), self.args.per_device_train_batch_size, ranks)

        def _track_num_input_tokens(self, inputs):
            self.shapes.add(tuple(inputs["input_ids"].shape))
            tokens = real_tokens(inputs).to(self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum())

        def log(self, logs, start_time=None):
            if "loss" in logs and start_time is not None:
                now, seen, step = time.time(), self.state.num_input_tokens_seen, self.state.global_step
                since, seen_then = self.last_log or (start_time, self._initial_num_input_tokens_seen)
                seconds = self.seconds()
                logs.update(shard=self.shard, seconds=round(seconds, 3),
                            tokens_per_second=round((seen - seen_then) / max(now - since, 1e-6), 1),
                            seconds_left=round(seconds / max(step, 1) * (self.state.max_steps - step)),
                            shapes=len(self.shapes))
                if self.accelerator.scaler is not None:  # fp16
                    logs["loss_scale"] = self.accelerator.scaler.get_scale()
                self.last_log = (now, seen)
                # transformers empties its loss sum by subtracting it from itself: after an
                # overflowed (inf) loss that leaves NaN, and every later loss would read NaN.
                self._tr_loss.zero_()
            super().log(logs, start_time)

    return ShardTrainer


def make_trainer(settings, backend, model, tokenizer, dataset, work, max_steps, callbacks=()):
    """The trainer of one shard's prepared sequences (prepare_shard made them: TRL's own
    preparation is skipped) up to global step `max_steps`, under the run's one schedule."""
    from trl import SFTConfig

    config = SFTConfig(
        output_dir=work.trainer, seed=settings.seed,
        report_to=[] if settings.report_to == "none" else [settings.report_to],
        use_cpu=backend.device == "cpu",  # (without it, processes on CPUs would not form a DDP group)
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler, warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay, optim=backend.optim, bf16=backend.bf16, fp16=backend.fp16,
        gradient_checkpointing=backend.name == "peft" and backend.gradient_checkpointing,  # (unsloth's own)
        # every LoRA weight takes part in every step (transformers would search for unused
        # ones after each backward of a model that is not a PreTrainedModel, as a PeftModel)
        ddp_find_unused_parameters=False,
        max_length=settings.max_seq_length, packing=settings.packing, packing_strategy="bfd",
        pad_to_multiple_of=length_multiple(settings),  # a few batch shapes (training.speed)
        dataset_kwargs={"skip_prepare_dataset": True},
        max_steps=max_steps, ignore_data_skip=True, train_sampling_strategy="sequential",
        save_strategy="steps", save_steps=settings.save_steps, save_total_limit=1,
        save_on_each_node=True,  # (several nodes: every node resumes each shard from its own copy)
        logging_steps=settings.logging_steps,
        logging_nan_inf_filter=False,  # an overflowed step logs its loss (inf), not the average
        include_num_input_tokens_seen="non_padding",  # (ShardTrainer counts them)
        disable_tqdm=True)
    callbacks = [*callbacks, KeepScheduleOnStep()] if backend.fp16 else list(callbacks)
    trainer = backend.trainer_class(model=model, args=config, train_dataset=dataset,
                                    processing_class=tokenizer, callbacks=callbacks)
    if backend.load_in_4bit:
        # TRL casts a 4-bit model's adapters to bfloat16, which fp16's loss scaler cannot unscale
        # (T4, V100); float32 adapters, as unsloth keeps them, train on every GPU.
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    return trainer


def KeepScheduleOnStep():  # noqa: N802 - a TrainerCallback made on first use (transformers is heavy)
    """Under fp16 the loss scaler skips the optimizer step of a batch whose gradients overflow,
    and transformers then skips the schedule's step too while counting the global step: the
    learning rate would lag the step count for the rest of the run. This keeps it on the step."""
    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
            while lr_scheduler is not None and lr_scheduler.last_epoch < state.global_step:
                lr_scheduler.step()

    return Keep()


def unit_end(ranks, end, whole, record, sequences, done):
    """Stops (and saves) at the unit's last step, after checking (when the unit is `whole`,
    not cut by MAX_STEPS) that the ranks trained on each of its sequences once."""
    from transformers import TrainerCallback

    class UnitEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < end:
                return
            control.should_save = control.should_training_stop = True
            if ranks.world > 1 and whole:
                record.sequences_by_rank = shared_exactly(ranks, sequences, kwargs["model"])
                record.sequences_before_resume = done

    return UnitEnd()


# ---------------------------------------------------------------- evaluation


def evaluation(batches, rows, ranks, backend):
    """The evaluation loss on the `rows` held-out rows (this process's share of them batched in
    `batches`), into the trainer's log history (and so into every checkpoint): before the first
    step, and at every checkpoint the trainer saves."""
    from transformers import TrainerCallback

    class Evaluation(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self.evaluate(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save:
                self.evaluate(state, model)

        def evaluate(self, state, model):
            if rows:
                fused = backend.name == "peft" and backend.device == "cuda"
                loss = evaluation_loss(model, batches, ranks, fused)
                state.log_history.append({"step": state.global_step, "eval_loss": round(loss, 6)})
                log(f"step {state.global_step}: evaluation loss {loss:.4f} ({rows} held-out rows)")

    return Evaluation()


def evaluation_batches(rows, settings, tokenizer, ranks):
    """This process's share of the held-out rows (the processes share them), packed and batched
    as training's: TRL's packing (training.shards.prepare), BATCH_SIZE sequences a batch, TRL's
    collator padding to the same multiple of a length."""
    import datasets
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    mine = rows[ranks.rank::ranks.world]
    if not mine:
        return []
    datasets.disable_progress_bars()
    sequences = prepare(datasets.Dataset.from_list(mine), settings.packing, settings.max_seq_length)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id  # as TRL's
    collate = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=settings.packing,
                                              pad_to_multiple_of=length_multiple(settings))
    return [collate([sequences[i] for i in range(start, min(start + settings.batch_size, len(sequences)))])
            for start in range(0, len(sequences), settings.batch_size)]


def evaluation_loss(model, batches, ranks, fused=False):
    """Mean loss per trained token of the held-out rows, in the batches training would make of
    them (no row sees another); the processes add up their sums: the same number whatever their
    count. `fused`: through TRL's fused LM head, without the full logits (peft on CUDA)."""
    import torch

    device = next(model.parameters()).device
    loss_sum = tokens = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            trained = int((batch["labels"][:, 1:] != NOT_TRAINED).sum())
            if trained:
                out = model(**{key: value.to(device) for key, value in batch.items()}, use_cache=False,
                            **({"fused_lm_head": True} if fused else {}))
                loss_sum, tokens = loss_sum + out.loss.float().item() * trained, tokens + trained
    model.train(was_training)
    sums = ranks.gather((loss_sum, tokens))
    return sum(s for s, _ in sums) / max(sum(t for _, t in sums), 1)


def held_out_rows(bucket, prefix, data):
    """The rows pretokenize.py held out of training (EVAL_ROWS): input_ids and labels."""
    rows = []
    for entry in data.get("eval", []):
        for batch in read_parquet_batches(bucket, f"{prefix}/{entry['path']}", 1_000):
            rows += [{"input_ids": ids, "labels": labels} for ids, labels in
                     zip(batch.column("input_ids").to_pylist(), batch.column("labels").to_pylist())]
    return rows


if __name__ == "__main__":
    run_step(main)
