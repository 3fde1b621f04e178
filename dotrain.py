"""Step 4: LoRA fine-tuning on the model-ready shards, one shard after another, resumable.

    models/<MODEL_NAME>/                        base model (import-model.py)
    model-ready/<MODEL_NAME>/<DATASET_NAME>/    input_ids, labels, length; held-out rows (pretokenize.py)
 -> checkpoints/<MODEL_NAME>/<DATASET_NAME>[/<RUN_NAME>]/
        _manifest.json          the plan: optimizer steps of each shard, epochs
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
carry over from shard to shard through the checkpoint saved at the end of each shard. The
evaluation loss on the held-out rows is measured before the first step, at every checkpoint
and at the end. On one CUDA GPU with unsloth installed, unsloth trains; elsewhere transformers
+ peft do; bf16 where the GPU computes it natively, fp16 with loss scaling on older GPUs, and
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
"""

import contextlib
import ctypes
import gc
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from common import (CHATML_TEMPLATE, MODEL_CACHE_SETTING, Bucket, Setting, UserError,
                    abort_stale_uploads, checkpoints_prefix, done_prefix, download_model,
                    fingerprint, log, manifest_fingerprint, model_fingerprint, model_prefix,
                    model_ready_prefix, open_bucket, parse_settings, read_manifest,
                    read_parquet_batches, require_complete, resume_or_start, run, same_inputs, short,
                    with_rebuild, write_manifest)

SETTINGS = [
    Setting("MODEL_NAME", help="name of the model in bucket paths, e.g. Qwen/Qwen2.5-0.5B",
            required=True),
    Setting("DATASET_NAME", help="name of the dataset in bucket paths, e.g. mlabonne/FineTome-100k",
            required=True),
    Setting("RUN_NAME", None, "name of this training run: its checkpoints and results go under "
            "checkpoints/ and done/<MODEL_NAME>/<DATASET_NAME>/<RUN_NAME>/, beside other runs (a "
            "sweep); unset: directly under <MODEL_NAME>/<DATASET_NAME>/"),
    Setting("TRAIN_BACKEND", "auto", "unsloth (one CUDA GPU), peft (transformers + peft, any "
            "device) or auto: unsloth when one CUDA GPU and unsloth are there",
            choices=("auto", "unsloth", "peft")),
    Setting("TRAIN_DEVICE", "auto", "auto: the GPU when torch can use one, and an error, never a "
            "CPU run, when an NVIDIA GPU is there that torch cannot use; cpu: the CPU, even "
            "beside a GPU; cuda: an error without a usable GPU", choices=("auto", "cuda", "cpu")),
    Setting("LOAD_IN_4BIT", False, "train the LoRA on a 4-bit (NF4) copy of the base (QLoRA), so "
            "that a 7-8B model fits a 16-24 GB GPU; CUDA and bitsandbytes only; fused/ is still "
            "the adapter merged into the original 16-bit weights", bool),
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
    Setting("MAX_SEQ_LENGTH", 4096, "tokens per training sequence; at least the MAX_SEQ_LENGTH "
            "that pretokenize.py cut rows to", int, minimum=8),
    Setting("PACKING", True, "pack rows into MAX_SEQ_LENGTH sequences, padding-free (0: one "
            "padded row per sequence)", bool),
    Setting("MAX_STEPS", None, "stop after this many optimizer steps (smoke runs; default: "
            "NUM_EPOCHS epochs)", int, minimum=1),
    Setting("SAVE_STEPS", 200, "optimizer steps between checkpoints (and one at each shard's end)",
            int, minimum=1),
    Setting("LOGGING_STEPS", 1, "optimizer steps between log lines", int, minimum=1),
    Setting("REPORT_TO", "none", "none; tensorboard: event files into done/.../tensorboard/ in the "
            "bucket; wandb: Weights & Biases (WANDB_API_KEY, a secret)",
            choices=("none", "tensorboard", "wandb")),
    Setting("WANDB_API_KEY", help="Weights & Biases key, for REPORT_TO=wandb", secret=True),
    Setting("DIST_TIMEOUT", 1800, "seconds a training process waits for the others (several GPUs "
            "or nodes) before the run fails", int, minimum=60),
    Setting("WORK_DIR", os.path.join(tempfile.gettempdir(), "dotrain"),
            "local scratch directory (two shards per node, a checkpoint, the exported model)"),
    Setting("SAMPLE_PROMPT", "Give three tips for staying healthy.",
            "user message answered greedily by the fused model as a smoke test"),
    MODEL_CACHE_SETTING,
]
CODE_VERSION = "dotrain/2"  # bump when a change alters what training produces
POINTER = "latest.json"
WHOLE = "_checkpoint.json"  # in a checkpoint's folder, uploaded last
PACK_ROWS = 1_000  # rows packed together (the batches of TRL's packing map)
EXPORTED_FILES = ["adapter_model.safetensors", "adapter_config.json", "trainer_state.json"]
# LoRA features a merge of scale * B @ A into the base's weights would not honour
UNMERGED_FEATURES = ("use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                     "modules_to_save", "trainable_token_indices", "layer_replication",
                     "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora",
                     "velora_config", "monteclora_config", "megatron_config")
CHECK_ROWS, CHECK_TOKENS = 3, 128  # held-out rows whose logits are compared, and tokens of each
NOT_TRAINED = -100  # the label of a token training does not learn
# The logits check (check_logits) compares root mean squares over the trained positions and
# the vocabulary. The adapter must move the logits by more than EFFECT_FLOOR of their size:
# bf16 keeps 8 significant bits, so a logit is only known to 2^-9..2^-8 of itself, and an
# adapter of zeros (or one that did not load) moves them by exactly 0.
EFFECT_FLOOR = 2 ** -8
# fused/ must be within LOGITS_TOLERANCE of that move from base + adapter. Two things keep a
# correct 16-bit merge from it. Rounding: a merged weight moves by at most 2^-8 of its size
# (half an ulp), 2^-9.2 RMS, independently of its neighbours, so each adapted projection's
# output moves by ~2^-9.2 of its size; the unmerged reference rounds its two partial outputs in
# bf16 too: ~2^-8.4 together. Those independent errors add incoherently over the 7 projections
# of L layers (as sqrt(7 L)) while a trained low-rank update adds coherently (as 7 L): for an
# adapter that changes each output by a fraction rho, distance / effect ~ 2^-8.4 / (rho
# sqrt(7 L)), 0.003 / (14 rho) on a 28-layer 7B-class model. Random adapters on the 2-layer
# tiny models in bf16 on CPU, whose updates do not add coherently (0.003 / rho by the same
# count), measure 1.3-2.8 times that count; with that margin a 7B-class adapter passes once
# rho is above ~0.3%, which a few dozen optimizer steps should reach. That is an estimate: no
# 7B model was measured here. Lost update: where the update of a weight is under half its ulp,
# W + update rounds back to W, so a weak adapter's update is partly lost in 16 bits, coherently,
# and fused/ is not what was trained; the check fails it on purpose. Measured on the tiny model
# with random adapters: a merge that changed 59% of the adapted weights lost 37% of the effect
# (0.9 of it away), one that changed 95% lost 2% (0.2 away); the adapters the tests train sit
# at 0.004-0.006. A merge that lost the adapter, scaled it by alpha / sqrt(r) instead of
# alpha / r or put it into another layer is 0.75 of the effect away or more.
LOGITS_TOLERANCE = 0.25
SAMPLE_TOKENS = 64


def main():
    settings = parse_settings(__doc__, SETTINGS)
    if settings.train_device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for GPUs
    bucket = open_bucket(settings)
    model_manifest = require_complete(bucket, model_prefix(settings.model_name), "import-model.py")
    data = require_complete(bucket, model_ready_prefix(settings.model_name, settings.dataset_name),
                            "pretokenize.py")
    if finished_before(bucket, settings, run_inputs(settings, model_manifest, data)):
        log(f"{bucket.url(done_of(settings))} is complete: nothing to do")
        return
    # Every node fetches and verifies the model before the processes meet, so that no download
    # runs while other processes wait in a collective.
    model_dir = download_model(bucket, settings.model_name, settings.model_cache_dir)
    weights_files(model_dir)  # fused/ is merged from safetensors: refuse others now, not after training
    ranks = Ranks.start(settings.dist_timeout)
    # Rank 0 alone decides what to resume and replaces what other inputs made; the others take
    # its word (and its REBUILD mark).
    inputs, done, plan = ranks.from_rank_0(lambda: resume_outputs(settings, bucket, model_manifest, data))
    if done["complete"]:
        return
    work = Work(settings, ranks)
    if not plan["complete"]:
        backend = choose_backend(settings, ranks, plan)
        train(settings, bucket, backend, model_dir, data, plan, work, ranks)
        if ranks.rank != 0:
            return
        if backend.name == "unsloth":
            log("exporting in a fresh process: unsloth has patched transformers in this one")
            sys.stdout.flush()
            os.execv(sys.executable, [sys.executable, *sys.argv])
    export(settings, bucket, model_dir, plan, data, inputs, work)


def run_inputs(settings, model_manifest, data):
    """What the result depends on; a change of any of these is refused over existing output."""
    hyperparameters = {name: getattr(settings, name) for name in (
        "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "learning_rate",
        "lr_scheduler", "batch_size", "grad_accum", "warmup_steps", "weight_decay", "num_epochs",
        "seed", "max_seq_length", "packing", "max_steps")}
    return with_rebuild({"step": CODE_VERSION, "model": model_fingerprint(model_manifest),
                         "model_ready": manifest_fingerprint(data), **hyperparameters},
                        settings, "dotrain")


def finished_before(bucket, settings, inputs):
    done = read_manifest(bucket, done_of(settings))
    return bool(done and done["complete"] and same_inputs(done["inputs"], inputs))


def resume_outputs(settings, bucket, model_manifest, data):
    """The run's inputs, its done manifest and, unless done, the plan to resume (or a new one).

    Outputs made from other inputs are replaced when FORCE=1 (or REBUILD) consents; a plan
    with no checkpoint yet holds nothing of value and is replaced without asking."""
    if settings.run_name and (owned_by_unnamed_run(settings.run_name)
                              or not re.fullmatch(r"[A-Za-z0-9._-]+", settings.run_name)):
        raise UserError(f"RUN_NAME={settings.run_name!r}: use letters, digits, '.', '_' and '-', "
                        f"and none of {', '.join(UNNAMED_RUN_FILES)} or checkpoint-*")
    inputs = run_inputs(settings, model_manifest, data)
    mine = None if settings.run_name else owned_by_unnamed_run
    for prefix in (checkpoints_of(settings), done_of(settings)):  # a killed run's open uploads
        abort_stale_uploads(bucket, prefix, mine)
    done = resume_or_start(bucket, done_of(settings), inputs, settings.force, mine=mine)
    if done["complete"]:
        return inputs, done, None
    plan = resume_or_start(bucket, checkpoints_of(settings), inputs, settings.force, mine=mine,
                           replaceable=resume_point(bucket, checkpoints_of(settings)) is None)
    return inputs, done, plan


def checkpoints_of(settings):
    return checkpoints_prefix(settings.model_name, settings.dataset_name, settings.run_name)


def done_of(settings):
    return done_prefix(settings.model_name, settings.dataset_name, settings.run_name)


# What a run without RUN_NAME writes under its prefixes; named runs' folders sit beside them.
UNNAMED_RUN_FILES = ("_manifest.json", POINTER, "lora_model", "fused", "metrics.json", "loss.png",
                     "tensorboard")


def owned_by_unnamed_run(name):
    return name.split("/")[0] in UNNAMED_RUN_FILES or name.startswith("checkpoint-")


# ---------------------------------------------------------------- processes and local disk


class Ranks:
    """This process's place among the training processes: one, or torchrun's (WORLD_SIZE > 1)."""

    def __init__(self, rank=0, local_rank=0, world=1, local_world=1):
        self.rank, self.local_rank, self.world, self.local_world = rank, local_rank, world, local_world
        self.node = self.node_of(rank)

    def node_of(self, rank):
        return rank // self.local_world  # torchrun numbers the processes node by node

    @classmethod
    def start(cls, timeout):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(seconds=timeout))
        return cls(dist.get_rank(), local_rank, world, int(os.environ["LOCAL_WORLD_SIZE"]))

    @contextlib.contextmanager
    def first(self, leader):
        """The leader runs the block, then the others do."""
        if not leader:
            self.barrier()
        yield
        if leader:
            self.barrier()

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def from_rank_0(self, make):
        """What make() returns on rank 0, on every rank (make runs on rank 0 only)."""
        if self.world == 1:
            return make()
        import torch.distributed as dist

        box = [None]
        if self.rank == 0:
            try:
                box = [("done", make())]
            except BaseException as e:
                dist.broadcast_object_list([("failed", str(e))], src=0)  # not left waiting
                raise
        dist.broadcast_object_list(box, src=0)
        if box[0][0] == "failed":
            raise UserError(f"rank 0 failed: {box[0][1]}")
        return box[0][1]

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered


class Work:
    """The local scratch directories of a run, shared by a node's processes: prepared shards,
    the trainer's checkpoints, staged uploads, held-out rows, the export. The node's first
    process clears what a killed run left, and measures the most bytes they ever held."""

    def __init__(self, settings, ranks):
        self.root = os.path.join(os.path.expanduser(settings.work_dir), settings.model_name,
                                 settings.dataset_name, settings.run_name or "")
        self.shards = os.path.join(self.root, "shards")
        self.trainer = os.path.join(self.root, "trainer")
        self.uploads = os.path.join(self.root, "uploads")
        self.export = os.path.join(self.root, "export")
        self.peak_bytes = 0
        with ranks.first(ranks.local_rank == 0):
            if ranks.local_rank == 0:
                for path in (self.shards, self.trainer, self.uploads, self.export):
                    shutil.rmtree(path, ignore_errors=True)
                    os.makedirs(path)
                threading.Thread(target=self.measure, daemon=True).start()

    def measure(self, every=0.5):
        while True:
            self.sample()
            time.sleep(every)

    def sample(self):
        """Bytes under the run's scratch directory now; keeps the peak."""
        total = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
        self.peak_bytes = max(self.peak_bytes, total)
        return total


# ---------------------------------------------------------------- backend and model


@dataclass
class Backend:
    name: str  # unsloth | peft
    device: str  # cuda | cpu
    dtype: str  # bfloat16 | float16 | float32: what the model computes in
    optim: str
    load_in_4bit: bool = False
    trainer_class: type = None

    @property
    def bf16(self):
        return self.dtype == "bfloat16" and self.device == "cuda"

    @property
    def fp16(self):
        return self.dtype == "float16"


def decide(train_backend, capability, has_unsloth, has_bitsandbytes, world, load_in_4bit):
    """(backend, dtype, optimizer) for a GPU of this compute capability ((major, minor), None
    without CUDA): unsloth on one GPU when installed, else transformers + peft; bf16 only where
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
    name = "unsloth" if cuda and has_unsloth and world == 1 and train_backend != "peft" else "peft"
    dtype = "float32" if not cuda else "bfloat16" if capability >= (8, 0) else "float16"
    return name, dtype, "adamw_8bit" if cuda and has_bitsandbytes else "adamw_torch"


def choose_backend(settings, ranks, plan):
    """The backend this machine trains with; unsloth is imported here, before transformers, trl
    and peft, which it patches. A GPU that torch cannot use is an error, not a CPU run."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and settings.train_device != "cpu":
        unusable_gpu(torch)
    if not cuda and settings.train_device == "cuda":
        raise UserError("TRAIN_DEVICE=cuda and this machine has no GPU: use TRAIN_DEVICE=auto here")
    name, dtype, optim = decide(
        settings.train_backend, torch.cuda.get_device_capability() if cuda else None,
        importlib.util.find_spec("unsloth") is not None,
        importlib.util.find_spec("bitsandbytes") is not None, ranks.world, settings.load_in_4bit)
    if plan.get("optim", optim) != optim:
        raise UserError(f"the checkpoints of this run hold {plan['optim']} optimizer state and this "
                        f"machine trains with {optim}: resume on the same kind of machine, or "
                        "rerun with REBUILD=dotrain to start over")
    if plan.get("world_size", ranks.world) != ranks.world:
        raise UserError(f"the checkpoints of this run were planned for {plan['world_size']} "
                        f"training processes and this run has {ranks.world}: relaunch with as many "
                        "nodes and GPUs, or rerun with REBUILD=dotrain to start over")
    if name == "unsloth":
        import unsloth  # noqa: F401
    elif cuda and settings.train_backend == "auto":
        log("unsloth is not installed: training with transformers + peft" if ranks.world == 1 else
            f"{ranks.world} processes: training with transformers + peft under DDP")
    # Packed, padding-free batches are exact with SDPA too, as long as no KV cache is built
    # (compute_loss passes use_cache=False; the tests check it): TRL's warning does not apply.
    logging.getLogger("trl.trainer.sft_trainer").addFilter(
        lambda record: "Flash Attention variant" not in record.getMessage())
    backend = Backend(name, "cuda" if cuda else "cpu", dtype, optim, settings.load_in_4bit)
    backend.trainer_class = shard_trainer_class(backend, ranks)
    gpu = f" ({torch.cuda.get_device_name()})" if cuda else ""
    log(f"backend: {name} on {backend.device}{gpu}, {dtype}"
        f"{', 4-bit base' if settings.load_in_4bit else ''}, {optim}")
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
            use_gradient_checkpointing="unsloth", random_state=settings.seed), tokenizer
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    where = {"device_map": {"": torch.device("cuda", ranks.local_rank)}} if backend.device == "cuda" else {}
    if backend.load_in_4bit:
        where["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa",
                                                 **where)
    if backend.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
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


def shard_trainer_class(backend, ranks=Ranks()):
    """TRL's SFTTrainer (unsloth's when unsloth is imported) that also logs, at each logging
    step, the shard, the tokens per second since the last log and the training time so far.
    Under DDP each rank takes its own batches of the shard (RankBatches)."""
    import transformers
    from transformers.trainer_pt_utils import BatchRebalanceSampler
    from trl import SFTTrainer

    class RankBatches(BatchRebalanceSampler):
        """rank_batches() as a BatchRebalanceSampler: the Trainer takes it as rank-aware and
        does not let accelerate split it again."""

        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return iter(self.batches)

        def __len__(self):
            return len(self.batches)

    class ShardTrainer(SFTTrainer):
        shard = None  # the index of the shard being trained
        seconds = None  # () -> training seconds of the whole run so far
        last_log = None  # (time, tokens seen) at the previous log of this process

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if backend.name == "unsloth":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # trl 1.15's own loss calls a kernel that CPU torch lacks; transformers' gives the
            # same numbers.
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
            return RankBatches(rank_batches(len(self.train_dataset),
                                            self.args.per_device_train_batch_size, ranks))

        def log(self, logs, start_time=None):
            if "loss" in logs and start_time is not None:
                now, seen = time.time(), self.state.num_input_tokens_seen
                since, seen_then = self.last_log or (start_time, self._initial_num_input_tokens_seen)
                logs.update(shard=self.shard, seconds=round(self.seconds(), 3),
                            tokens_per_second=round((seen - seen_then) / max(now - since, 1e-6), 1))
                self.last_log = (now, seen)
            super().log(logs, start_time)

    return ShardTrainer


def rank_batches(sequences, batch_size, ranks):
    """This rank's batches of a shard's `sequences`: batch k goes to rank k % world. A rank short
    of a batch gets [sequences], a batch with nothing to learn from (RankView), so that every
    rank makes the same steps."""
    batches = [list(range(start, min(start + batch_size, sequences)))
               for start in range(0, sequences, batch_size)]
    mine = batches[ranks.rank::ranks.world]
    return mine + [[sequences]] * (math.ceil(len(batches) / ranks.world) - len(mine))


class RankView:
    """A shard's prepared sequences as one rank reads them: index len(sequences) is a one-token
    sequence with no label (it adds nothing to the loss or its token count), and the positions
    it served are kept to check that the ranks shared the shard exactly."""

    def __init__(self, sequences):
        self.sequences, self.served = sequences, []

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index):
        if index < len(self.sequences):
            self.served.append(index)
            return self.sequences[index]
        row = self.sequences[0]
        empty = {name: value[:1] for name, value in row.items() if isinstance(value, list)}
        empty["labels"] = [-100]
        if "seq_lengths" in row:
            empty["seq_lengths"] = [1]
        return empty


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
        # unsloth checkpoints gradients itself; on CPU the models are small and time matters more
        gradient_checkpointing=backend.name == "peft" and backend.device == "cuda",
        max_length=settings.max_seq_length, packing=settings.packing, packing_strategy="bfd",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_steps=max_steps, ignore_data_skip=True, train_sampling_strategy="sequential",
        save_strategy="steps", save_steps=settings.save_steps, save_total_limit=1,
        save_on_each_node=True,  # (several nodes: every node resumes each shard from its own copy)
        logging_steps=settings.logging_steps,
        include_num_input_tokens_seen="all" if settings.packing else "non_padding",
        disable_tqdm=True)
    callbacks = [*callbacks, KeepScheduleOnStep()] if backend.fp16 else list(callbacks)
    return backend.trainer_class(model=model, args=config, train_dataset=dataset,
                                 processing_class=tokenizer, callbacks=callbacks)


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


def release_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- shards and the plan


def make_plan(settings, bucket, data, plan, ranks):
    """The optimizer steps of every shard, from its rows' lengths alone (the `length` column:
    no shard is downloaded to plan), and of the run: NUM_EPOCHS passes, capped by MAX_STEPS.
    Saved before training starts."""
    if settings.max_seq_length < data["max_seq_length"]:
        raise UserError(f"MAX_SEQ_LENGTH={settings.max_seq_length} is below the "
                        f"{data['max_seq_length']} that pretokenize.py cut rows to: raise it, or "
                        "rerun pretokenize.py with this MAX_SEQ_LENGTH (FORCE=1)")
    data_prefix = model_ready_prefix(settings.model_name, settings.dataset_name)
    for entry in data["shards"]:
        lengths = shard_lengths(bucket, data_prefix, entry)
        sequences = packed_sequences(lengths, settings.max_seq_length) if settings.packing else len(lengths)
        plan["shards"].append({"path": entry["path"], "rows": entry["rows"], "sequences": sequences,
                               "steps": optimizer_steps(sequences, settings, ranks.world),
                               "tokens": int(sum(lengths)), "trained_tokens": entry.get("trained_tokens")})
        plan["rows"] += entry["rows"]
    epoch_steps = sum(shard["steps"] for shard in plan["shards"])
    if not epoch_steps:
        raise UserError(f"{bucket.url(data_prefix)} has no row to train on: check pretokenize.py's "
                        "output")
    all_steps = epoch_steps * settings.num_epochs
    plan.update(epochs=settings.num_epochs, total_steps=min(all_steps, settings.max_steps or all_steps),
                world_size=ranks.world)
    log(f"plan: {plan['total_steps']} optimizer steps, {settings.num_epochs} epoch(s) over "
        f"{len(plan['shards'])} shards ({', '.join(str(shard['steps']) for shard in plan['shards'])} "
        f"steps each)" + (f", capped by MAX_STEPS from {all_steps}" if plan["total_steps"] < all_steps else ""))
    return plan


def shard_lengths(bucket, prefix, entry):
    """The token count of every row of a shard, read from its parts' `length` column only."""
    import numpy as np
    import pyarrow.parquet as pq

    lengths = []
    for part in entry["parts"]:
        with bucket.fs.open(bucket.path(f"{prefix}/{part['path']}"), "rb", block_size=2**20) as f:
            lengths.append(pq.read_table(f, columns=["length"]).column("length").to_numpy())
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)


def packed_sequences(lengths, max_length):
    """How many sequences TRL's best-fit-decreasing packing makes of rows of these lengths: the
    same packing that prepare_shard runs on the rows, run here on stand-in rows of the same
    lengths, PACK_ROWS rows at a time as it packs them."""
    import numpy as np
    import pyarrow as pa
    import datasets
    from datasets import Dataset
    from datasets.table import InMemoryTable

    datasets.disable_progress_bars()
    count = 0
    for start in range(0, len(lengths), 50 * PACK_ROWS):  # 50 packing batches per stand-in table
        chunk = lengths[start:start + 50 * PACK_ROWS]
        offsets = np.zeros(len(chunk) + 1, dtype=np.int64)
        np.cumsum(chunk, out=offsets[1:])
        rows = pa.LargeListArray.from_arrays(offsets, pa.array(np.zeros(offsets[-1], dtype=np.int8)))
        count += len(prepare(Dataset(InMemoryTable(pa.table({"input_ids": rows}))), True, max_length))
    return count


def optimizer_steps(sequences, settings, world):
    """Optimizer steps of one pass over `sequences` by `world` processes, as transformers.Trainer
    counts them: each rank takes every world-th batch; the last batch and the last accumulation
    may be short, and each still makes a step."""
    batches = math.ceil(sequences / settings.batch_size)
    return math.ceil(math.ceil(batches / world) / settings.grad_accum)


def units(plan):
    """The plan's stretches of training in order: (epoch, shard index, first global step, steps)."""
    found, step = [], 0
    for epoch in range(plan.get("epochs", 1)):
        for index, shard in enumerate(plan["shards"]):
            found.append((epoch, index, step, shard["steps"]))
            step += shard["steps"]
    return found


def position(plan, step):
    """(unit number, its optimizer steps already done) after `step` steps of the run."""
    for number, (_, _, start, steps) in enumerate(units(plan)):
        if step < start + steps:
            return number, step - start
    return len(units(plan)), 0


def prepared_shards(settings, bucket, plan, data, first, work, ranks):
    """(unit number, prepared sequences, seconds waited) for the plan's units from `first` on.

    Each node's first process downloads a shard's parts and prepares them once, one unit ahead,
    in a process of its own (prepare_shard: the work grows with the shard and must not slow
    training); all the node's processes read the prepared sequences from its disk. A shard's
    files go once no later unit needs them next; the disk holds two shards at most."""
    from datasets import Dataset, concatenate_datasets

    todo = [(number, unit) for number, unit in enumerate(units(plan)) if number >= first]
    prefix = model_ready_prefix(settings.model_name, settings.dataset_name)
    leader = ranks.local_rank == 0

    def folder(unit):
        return os.path.join(work.shards, str(unit[1]))

    def start(unit):
        if not leader or os.path.exists(os.path.join(folder(unit), "ready.json")):
            return None
        return pool.submit(prepare_shard, settings, prefix,
                           data["shards"][unit[1]], folder(unit), settings.packing,
                           settings.max_seq_length)

    import multiprocessing

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=die_with_parent) as pool:
        pending = start(todo[0][1]) if todo else None
        for k, (number, unit) in enumerate(todo):
            began = time.time()
            if pending is not None:
                pending.result()
            ready = os.path.join(folder(unit), "ready.json")
            while not os.path.exists(ready):  # the node's first process prepares it (no collective)
                time.sleep(0.5)
            waited = time.time() - began
            upcoming = todo[k + 1][1] if k + 1 < len(todo) else None
            pending = start(upcoming) if upcoming and upcoming[1] != unit[1] else None
            with open(ready) as f:
                files = json.load(f)["files"]
            sequences = concatenate_datasets([Dataset.from_file(os.path.join(folder(unit), name))
                                              for name in files])
            sequences = sequences.select_columns([name for name in ("input_ids", "labels", "seq_lengths")
                                                  if name in sequences.column_names])
            yield number, sequences, waited
            del sequences
            ranks.barrier()  # every process of the node is done with the shard's files
            if leader and (upcoming is None or upcoming[1] != unit[1]):
                work.sample()
                shutil.rmtree(folder(unit), ignore_errors=True)


def prepare(rows, packing, max_length):
    """Rows as the trainer takes them (its own preparation is skipped): packed by TRL's best-fit
    decreasing packing, PACK_ROWS rows at a time, or as they are."""
    from trl.data_utils import pack_dataset

    return pack_dataset(rows, max_length, "bfd", {"batch_size": PACK_ROWS}) if packing else rows


def die_with_parent():
    """A worker process is killed with the training process that started it (Linux), never
    left writing into a scratch directory that a rerun is clearing."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def prepare_shard(settings, prefix, entry, folder, packing, max_length):
    """Download a shard's parts and prepare them for training as the trainer would (TRL's
    best-fit-decreasing packing, PACK_ROWS rows at a time), into Arrow files in `folder`
    listed by ready.json, written last. Runs in a process of its own."""
    import datasets

    datasets.disable_progress_bars()
    bucket = Bucket(settings)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(folder, "parts"))
    paths = []
    for part in entry["parts"]:
        if part["rows"]:  # (datasets cannot read a Parquet file without rows)
            paths.append(os.path.join(folder, "parts", os.path.basename(part["path"])))
            bucket.download(f"{prefix}/{part['path']}", paths[-1])
    rows = datasets.Dataset.from_parquet(paths, cache_dir=os.path.join(folder, "cache"))
    if len(rows) != entry["rows"]:
        raise UserError(f"{prefix}/{entry['path']} has {len(rows)} rows but its manifest says "
                        f"{entry['rows']}: rerun with REBUILD=pretokenize")
    shutil.rmtree(os.path.join(folder, "parts"))
    rows = prepare(rows.select_columns(["input_ids", "labels"]), packing, max_length)
    files = []
    for k, cache in enumerate(rows.cache_files):
        files.append(f"prepared-{k}.arrow")
        os.replace(cache["filename"], os.path.join(folder, files[-1]))
    shutil.rmtree(os.path.join(folder, "cache"))
    with open(os.path.join(folder, "ready.json.tmp"), "w") as f:
        json.dump({"files": files, "sequences": len(rows)}, f)
    os.replace(os.path.join(folder, "ready.json.tmp"), os.path.join(folder, "ready.json"))
    log(f"prepared {entry['path']}: {len(rows)} sequences, for this node's processes")


# ---------------------------------------------------------------- training


def train(settings, bucket, backend, model_dir, data, plan, work, ranks):
    """Plan the steps (once), then train from the latest checkpoint to the plan's last step,
    measuring the evaluation loss at the start, at every checkpoint and at the end."""
    prefix = checkpoints_of(settings)
    if plan.get("total_steps") is None:
        plan = ranks.from_rank_0(lambda: make_plan(settings, bucket, data, plan, ranks))
        plan["optim"] = backend.optim
        if ranks.rank == 0:
            write_manifest(bucket, prefix, plan)
    report(settings, bucket, plan, work)
    held_out = held_out_rows(bucket, settings, data)
    model, tokenizer = load_for_training(settings, backend, model_dir, ranks)
    pointer = ranks.from_rank_0(lambda: resume_point(bucket, prefix))
    step, total = pointer["step"] if pointer else 0, plan["total_steps"]
    io = (pointer or {}).get("shards_io", {})
    if step < total:
        first, into = position(plan, step)
        epoch, index, _, steps = units(plan)[first]
        log(f"resuming at step {step}: shard {index} of epoch {epoch}, after {into} of its {steps} steps"
            if pointer else f"training {total} steps over {len(plan['shards'])} shards, "
            f"{plan['epochs']} epoch(s)")
        checkpoint = os.path.join(work.trainer, pointer["checkpoint"]) if pointer else None
        with ranks.first(ranks.local_rank == 0):  # a node's processes resume from its one copy
            if pointer and ranks.local_rank == 0:
                fetch_checkpoint(bucket, prefix, pointer, work.trainer)
        began, seconds_before = time.time(), pointer["seconds"] if pointer else 0.0
        uploads = Uploads(bucket, prefix, done_of(settings), work, pointer) if ranks.rank == 0 else None
        train_units(settings, bucket, backend, model, tokenizer, plan, data, work, ranks, step,
                    checkpoint, lambda: seconds_before + time.time() - began, uploads, io, held_out)
    peaks = ranks.gather(work.peak_bytes if ranks.local_rank == 0 else None)
    plan.update(complete=True, shards_io=io,
                work_dir_peak_bytes={f"node {ranks.node_of(rank)}": peak
                                     for rank, peak in enumerate(peaks) if peak is not None})
    if ranks.rank == 0:
        write_manifest(bucket, prefix, plan)
    log(f"training complete: {total} steps")
    del model
    release_memory()


def train_units(settings, bucket, backend, model, tokenizer, plan, data, work, ranks, step,
                checkpoint, seconds, uploads, io, held_out):
    """Train unit after unit (a shard in an epoch) from `step` (and its checkpoint) on;
    `seconds()` is the training time of the run so far, this process's and that of the
    checkpoints before. `io` collects, by unit, the seconds training waited on storage and the
    sequences each rank trained on."""
    all_units, total = units(plan), plan["total_steps"]
    first, _ = position(plan, step)
    for number, prepared, waited in prepared_shards(settings, bucket, plan, data, first, work, ranks):
        epoch, index, start, steps = all_units[number]
        end = min(start + steps, total)
        if end == step:  # a shard with nothing left to train on
            continue
        record = io.setdefault(str(number), {"storage_wait_s": 0.0})
        record["storage_wait_s"] = round(record["storage_wait_s"] + waited, 3)
        # The trainer's own order is sequential: this fixed shuffle of the prepared shard, another
        # in each epoch, is what a resumed run skips into.
        order = prepared.shuffle(seed=settings.seed + number, keep_in_memory=True)
        done = (step - start) * settings.batch_size * settings.grad_accum * ranks.world
        sequences = order.select(range(done, len(order)), keep_in_memory=True)
        view = RankView(sequences) if ranks.world > 1 else sequences
        whole = end == start + steps
        callbacks = [unit_end(ranks, end, whole, record, view, done),
                     checkpoint_saved(bucket, checkpoints_of(settings), uploads, ranks, plan, seconds,
                                      backend, io, record),
                     evaluation(held_out, ranks)]
        trainer = make_trainer(settings, backend, model, tokenizer, sequences, work, total, callbacks)
        trainer.train_dataset, trainer.shard, trainer.seconds = view, index, seconds
        log(f"epoch {epoch}, shard {index} ({plan['shards'][index]['path']}): steps {step + 1}..{end}")
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
        record["storage_wait_s"] = round(record["storage_wait_s"] + uploads.finish(), 3)
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        evaluations = [entry for entry in json.load(f)["log_history"] if "eval_loss" in entry]
    if len(evaluations) > 1:
        log(f"evaluation loss on {len(held_out)} held-out rows: {evaluations[0]['eval_loss']:.4f} "
            f"before training, {evaluations[-1]['eval_loss']:.4f} after")


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
                record.update(sequences_by_rank=shared_exactly(ranks, sequences, kwargs["model"]),
                              sequences_before_resume=done)

    return UnitEnd()


def checkpoint_saved(bucket, prefix, uploads, ranks, plan, seconds, backend, io, record):
    """Every process's RNG state in the bucket, then rank 0 queues the checkpoint the trainer
    saved for upload: on several nodes each node's first process uploads its processes' RNG
    states (the rest of a checkpoint is the same on every node)."""
    from transformers import TrainerCallback

    class CheckpointSaved(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            name = f"checkpoint-{state.global_step}"
            local = os.path.join(args.output_dir, name)
            others = [f"rng_state_{rank}.pth" for rank in range(ranks.world)
                      if ranks.node_of(rank) != 0]
            if others:
                ranks.barrier()  # every process has saved its RNG state on its node's disk
                if ranks.local_rank == 0 and ranks.node != 0:
                    for file in others:
                        if os.path.exists(os.path.join(local, file)):
                            bucket.upload(os.path.join(local, file), f"{prefix}/{name}/{file}")
                ranks.barrier()  # ...and in the bucket before rank 0 names the checkpoint
            if uploads is None:
                return
            number, into = position(plan, state.global_step)
            epoch, index = units(plan)[number][:2] if number < len(units(plan)) else (plan["epochs"], 0)
            pointer = {"step": state.global_step, "checkpoint": name, "epoch": epoch, "shard": index,
                       "steps_into_shard": into, "total_steps": plan["total_steps"],
                       "seconds": round(seconds(), 3), "backend": backend.name,
                       "device": backend.device, "shards_io": json.loads(json.dumps(io))}
            waited = uploads.submit(local, pointer, others)
            record["storage_wait_s"] = round(record["storage_wait_s"] + waited, 3)

    return CheckpointSaved()


def evaluation(rows, ranks):
    """The evaluation loss on the held-out rows, into the trainer's log history (and so into
    every checkpoint): before the first step, and at every checkpoint the trainer saves."""
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
                loss = evaluation_loss(model, rows, ranks)
                state.log_history.append({"step": state.global_step, "eval_loss": round(loss, 6)})
                log(f"step {state.global_step}: evaluation loss {loss:.4f} ({len(rows)} held-out rows)")

    return Evaluation()


def evaluation_loss(model, rows, ranks):
    """Mean loss per trained token of the held-out rows, each row alone (no padding, no
    packing); the processes share the rows and add up their sums: the same number whatever
    their count."""
    import torch

    device = next(model.parameters()).device
    loss_sum = tokens = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for row in rows[ranks.rank::ranks.world]:
            labels = torch.tensor([row["labels"]], device=device)
            trained = int((labels[:, 1:] != -100).sum())
            if trained:
                out = model(input_ids=torch.tensor([row["input_ids"]], device=device), labels=labels,
                            use_cache=False)
                loss_sum, tokens = loss_sum + out.loss.float().item() * trained, tokens + trained
    model.train(was_training)
    sums = ranks.gather((loss_sum, tokens))
    return sum(s for s, _ in sums) / max(sum(t for _, t in sums), 1)


def held_out_rows(bucket, settings, data):
    """The rows pretokenize.py held out of training (EVAL_ROWS): input_ids and labels."""
    prefix = model_ready_prefix(settings.model_name, settings.dataset_name)
    rows = []
    for entry in data.get("eval", []):
        for batch in read_parquet_batches(bucket, f"{prefix}/{entry['path']}", 1_000):
            rows += [{"input_ids": ids, "labels": labels} for ids, labels in
                     zip(batch.column("input_ids").to_pylist(), batch.column("labels").to_pylist())]
    return rows


def report(settings, bucket, plan, work):
    """REPORT_TO's setup: tensorboard's event files go with the checkpoints (Uploads), and a
    Weights & Biases run stays one run across a managed job's recoveries."""
    if settings.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(work.trainer, "tensorboard")
    if settings.report_to != "wandb":
        return
    if importlib.util.find_spec("wandb") is None:
        raise UserError("REPORT_TO=wandb needs the wandb package: pip install wandb (allatonce.yaml's "
                        "setup installs it when REPORT_TO=wandb)")
    if not os.environ.get("WANDB_API_KEY"):
        raise UserError("REPORT_TO=wandb needs WANDB_API_KEY: give it as a secret "
                        "(--secret WANDB_API_KEY, or in .secrets)")
    os.environ.setdefault("WANDB_RUN_ID", fingerprint([bucket.url(checkpoints_of(settings)),
                                                       plan["inputs"]])[:16])
    os.environ.setdefault("WANDB_RESUME", "allow")
    os.environ.setdefault("WANDB_NAME", settings.run_name or f"{settings.model_name} {settings.dataset_name}")


def resume_point(bucket, prefix):
    """The checkpoint to resume from: the one latest.json names when it is whole (its
    _checkpoint.json and every file it lists are there), else the newest whole one (a reader in
    another region may see an older latest.json, or a newer one before its checkpoint); None
    when there is none."""
    pointer = json.loads(bucket.get(f"{prefix}/{POINTER}") or "null")
    if pointer and is_whole(bucket, prefix, pointer):
        return pointer
    found = sorted((json.loads(bucket.fs.cat_file(path))
                    for path in bucket.fs.glob(bucket.path(f"{prefix}/checkpoint-*/{WHOLE}"))),
                   key=lambda candidate: -candidate["step"])
    for candidate in found:
        if is_whole(bucket, prefix, candidate):
            log(f"{bucket.url(prefix)}/{POINTER} names "
                f"{pointer['checkpoint'] if pointer else 'no checkpoint'}, which is not whole in the "
                f"bucket: resuming from {candidate['checkpoint']}, the newest whole one")
            return candidate
    return None


def is_whole(bucket, prefix, pointer):
    folder = f"{prefix}/{pointer['checkpoint']}"
    return bucket.exists(f"{folder}/{WHOLE}") and all(bucket.exists(f"{folder}/{name}")
                                                      for name in pointer["files"])


def fetch_checkpoint(bucket, prefix, pointer, directory, files=None):
    """The pointed checkpoint's files (or some of them) in directory/checkpoint-<step>/."""
    local = os.path.join(directory, pointer["checkpoint"])
    for name in files or pointer["files"]:
        os.makedirs(os.path.dirname(os.path.join(local, name)), exist_ok=True)
        bucket.download(f"{prefix}/{pointer['checkpoint']}/{name}", os.path.join(local, name))
    return local


def shared_exactly(ranks, view, model):
    """The sequences each rank trained on, once it is checked that together they trained on
    each sequence of the shard exactly once, and that their copies of the adapter are still
    the same (DDP averaged their gradients)."""
    import torch

    with torch.no_grad():
        weights = sum(p.double().sum().item() for p in model.parameters() if p.requires_grad)
    served, weights = zip(*ranks.gather((view.served, weights)))
    together = sorted(position for positions in served for position in positions)
    if together != list(range(len(view))):
        raise RuntimeError(f"the {ranks.world} ranks trained on {len(together)} sequences "
                           f"({len(set(together))} distinct) of a shard of {len(view)}")
    if max(weights) - min(weights) > 1e-6 * max(abs(w) for w in weights):
        raise RuntimeError(f"the ranks' adapters differ (sums of their weights: {weights}): "
                           "their gradients were not averaged")
    return [len(positions) for positions in served]


class Uploads:
    """Checkpoint uploads in a background thread, one after the other: a checkpoint's files,
    its _checkpoint.json, then latest.json naming it; then the checkpoints before the previous
    one go (the previous one stays until a later one is named, so that a reader of an older
    latest.json still finds what it names; later ones stay too: other nodes upload their RNG
    states into the next checkpoint while this one uploads). Training waits only when it saves
    a checkpoint before the previous one is uploaded."""

    def __init__(self, bucket, prefix, done, work, pointer):
        self.bucket, self.prefix, self.done, self.work = bucket, prefix, done, work
        self.previous = pointer and pointer["checkpoint"]
        self.pool, self.pending = ThreadPoolExecutor(1), None

    def submit(self, local, pointer, others=()):
        """Queue a checkpoint saved in `local` (plus files other nodes uploaded); the seconds
        spent waiting for the previous one."""
        waited = self.wait()
        # Hard links: the trainer may delete its copy (save_total_limit) while this one uploads.
        staged = os.path.join(self.work.uploads, pointer["checkpoint"])
        shutil.copytree(local, staged, copy_function=os.link)
        self.pending = self.pool.submit(self.upload, staged, pointer, others)
        return waited

    def wait(self):
        began = time.time()
        if self.pending is not None:
            self.pending.result()
            self.pending = None
        return time.time() - began

    def finish(self):
        waited = self.wait()
        self.pool.shutdown()
        return waited

    def upload(self, staged, pointer, others):
        name, bucket, prefix = pointer["checkpoint"], self.bucket, self.prefix
        files = sorted(os.path.relpath(os.path.join(folder, file), staged)
                       for folder, _, names in os.walk(staged) for file in names)
        for file in files:
            bucket.upload(os.path.join(staged, file), f"{prefix}/{name}/{file}")
        pointer = json.dumps({**pointer, "files": sorted([*files, *others])}, indent=1).encode()
        bucket.put(f"{prefix}/{name}/{WHOLE}", pointer)
        bucket.put(f"{prefix}/{POINTER}", pointer)
        oldest_kept = int((self.previous or name).removeprefix("checkpoint-"))
        for old in bucket.fs.ls(bucket.path(prefix), detail=False):
            folder = os.path.basename(old)
            if folder.startswith("checkpoint-") and int(folder.removeprefix("checkpoint-")) < oldest_kept:
                bucket.fs.rm(old, recursive=True)
        self.previous = name
        self.upload_event_files()
        shutil.rmtree(staged)
        log(f"checkpoint {json.loads(pointer)['step']}/{json.loads(pointer)['total_steps']} saved to "
            f"{bucket.url(prefix)}/{name}")

    def upload_event_files(self):
        """tensorboard's event files (REPORT_TO=tensorboard), as they are now."""
        events = os.path.join(self.work.trainer, "tensorboard")
        for folder, _, names in os.walk(events):
            for file in names:
                path = os.path.join(folder, file)
                self.bucket.upload(path, f"{self.done}/tensorboard/{os.path.relpath(path, events)}")


# ---------------------------------------------------------------- outputs


def export(settings, bucket, model_dir, plan, data, inputs, work):
    """lora_model/ and fused/ from the last checkpoint, checked against each other, metrics,
    then the done manifest. Plain transformers + peft, whichever backend trained."""
    prefix = done_of(settings)
    pointer = resume_point(bucket, checkpoints_of(settings))
    checkpoint = fetch_checkpoint(bucket, checkpoints_of(settings),
                                  pointer, work.export, EXPORTED_FILES)
    tokenizer = output_tokenizer(model_dir, data)
    generation = generation_config(model_dir, tokenizer, end_of_turn(data, tokenizer))
    lora_dir, fused_dir = os.path.join(work.export, "lora_model"), os.path.join(work.export, "fused")
    save_adapter(checkpoint, lora_dir, settings.model_name, tokenizer, generation)
    merge = fuse(model_dir, lora_dir, fused_dir, tokenizer, generation)
    examples, rows = check_examples(bucket, settings, plan, data)
    check, fused = check_logits(model_dir, lora_dir, fused_dir, examples)
    check.update(merge=merge, rows=rows)
    sample = generate(fused, tokenizer, settings.sample_prompt)
    log(f"sample (greedy, fused model): {settings.sample_prompt!r} -> {sample!r}")
    del fused

    metrics = run_metrics(checkpoint, plan, pointer)
    peaks = metrics["work_dir_peak_bytes"] or {}
    peaks["node 0"] = max(peaks.get("node 0", 0), work.peak_bytes)  # the export's files too
    metrics["work_dir_peak_bytes"] = peaks
    plot_loss(metrics, os.path.join(work.export, "loss.png"))
    for folder in (lora_dir, fused_dir):
        for name in sorted(os.listdir(folder)):
            bucket.upload(os.path.join(folder, name), f"{prefix}/{os.path.basename(folder)}/{name}")
    bucket.put(f"{prefix}/metrics.json", json.dumps(metrics, indent=1).encode())
    bucket.upload(os.path.join(work.export, "loss.png"), f"{prefix}/loss.png")
    evaluations = metrics["evaluations"]
    write_manifest(bucket, prefix, {
        "complete": True, "inputs": inputs, "shards": metrics["shards"], "rows": plan["rows"],
        "total_steps": plan["total_steps"], "tokens_seen": metrics["tokens_seen"],
        "backend": pointer["backend"], "check": check,
        "eval_loss": {"before": evaluations[0]["eval_loss"], "after": evaluations[-1]["eval_loss"],
                      "rows": data.get("eval_rows")} if evaluations else None,
        "sample": {"prompt": settings.sample_prompt, "completion": sample},
        "outputs": ["lora_model/", "fused/", "metrics.json", "loss.png"]
        + (["tensorboard/"] if settings.report_to == "tensorboard" else [])})
    log(f"{bucket.url(prefix)} complete: {plan['total_steps']} steps, lora_model/ and fused/")
    if evaluations:
        log(f"evaluation loss on {data.get('eval_rows')} held-out rows: {evaluations[0]['eval_loss']:.4f} "
            f"before training, {evaluations[-1]['eval_loss']:.4f} after")
    shutil.rmtree(work.root, ignore_errors=True)


def output_tokenizer(model_dir, data):
    """The base tokenizer with the plain chat template the data was rendered with."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if data["inputs"].get("chat_template") == "chatml" or not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def end_of_turn(data, tokenizer):
    """The text that closes each answer, trained after it: what pretokenize.py found (in the
    model-ready manifest), else what the chat template renders after a probe answer."""
    if "end_of_turn" in data:
        return data["end_of_turn"]
    mark = "\ue000"  # a private-use character, found again in the rendering
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": f"Hello{mark}"}], tokenize=False)
    return text[text.rindex(mark) + 1:].rstrip()


def generation_config(model_dir, tokenizer, end_of_turn):
    """The base's generation config, stopping at the chat's end of turn as well as at eos."""
    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # the base has no generation_config.json
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    ids = tokenizer.encode(end_of_turn, add_special_tokens=False) if end_of_turn else []
    stops = ids if len(ids) == 1 else []
    if len(ids) > 1:  # any one of its tokens alone must not stop generation
        log(f"the end of turn {end_of_turn!r} is {len(ids)} tokens, not one: generation stops at "
            "it as a stop string (stop_strings)")
        config.stop_strings = [end_of_turn]
    eos = config.eos_token_id
    for token in [tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]:
        if token is not None and token not in stops:
            stops.append(token)
    config.eos_token_id = stops
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    return config


def save_adapter(checkpoint, lora_dir, model_name, tokenizer, generation):
    """The checkpoint's adapter, naming the bucket's model as its base, with the tokenizer and
    the generation config."""
    os.makedirs(lora_dir)
    shutil.copy(os.path.join(checkpoint, "adapter_model.safetensors"), lora_dir)
    with open(os.path.join(checkpoint, "adapter_config.json")) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = model_name  # not the local copy it was trained from
    with open(os.path.join(lora_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save_pretrained(lora_dir)
    generation.save_pretrained(lora_dir)


# ---------------------------------------------------------------- the merge


def fuse(model_dir, lora_dir, fused_dir, tokenizer, generation):
    """fused/: the base's files with the adapter merged into its weights, one weights file at a
    time (memory: one weights file and the adapter, whatever the model's size). Each merged
    weight is W + scale * B @ A in float32, rounded once to W's dtype, and checked as written;
    every adapter pair goes into exactly one weight. The base's other files are copied, but
    config.json says use_cache (an unsloth-trained run must not turn it off), and the tokenizer
    and generation config are those given. The merge's figures."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = weights_files(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter, scale = read_adapter(model_dir, lora_dir, files, device)
    with contextlib.suppress(OSError):  # (not glibc)
        # glibc serves freed blocks under 32 MB again from its heap, where tensors of one file
        # after another fragment it and host memory creeps up: give every block over 1 MB a
        # mapping of its own, returned to the system when freed (M_MMAP_THRESHOLD)
        ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)
    os.makedirs(fused_dir)
    applied, worst, changed, elements = [], 0.0, 0, 0
    for name in files:
        # pread, not mmap: pages of the mapped file would stay resident with the copies
        with safe_open(os.path.join(model_dir, name), "pt", backend="pread") as f:
            metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
        for key in tensors.keys() & adapter.keys():
            tensors[key] = merged_weight(tensors[key], *adapter[key], scale).to("cpu", tensors[key].dtype)
            applied.append(key)
        save_file(tensors, os.path.join(fused_dir, name), metadata)
        del tensors
        file_worst, file_changed, file_elements = check_merged_file(model_dir, fused_dir, name, adapter, scale)
        worst, changed, elements = max(worst, file_worst), changed + file_changed, elements + file_elements
    if sorted(applied) != sorted(adapter):
        raise UserError(f"the adapter's {len(adapter)} pairs were merged {len(applied)} times into "
                        f"{len(set(applied))} weights of {model_dir}, not once each: its weights "
                        "files list a weight twice; nothing was published")
    copy_other_files(model_dir, fused_dir, files, tokenizer)
    tokenizer.save_pretrained(fused_dir)
    generation.save_pretrained(fused_dir)
    log(f"fused/: {len(applied)} weights of {len(files)} files merged with scale {scale:g} on "
        f"{device}, each within {worst:.2f} of half an ulp of W + scale * B @ A; the merge changed "
        f"{changed / elements:.1%} of their values (the rest of the update rounds away in their dtype)")
    return {"files": len(files), "merged_weights": len(applied), "scale": scale, "device": device,
            "max_error_in_half_ulps": worst, "changed_fraction": changed / elements}


def weights_files(model_dir):
    """The base's safetensors weights files: those its index lists, or model.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.exists(os.path.join(model_dir, "model.safetensors")):
        return ["model.safetensors"]
    raise UserError(f"{model_dir} has no model.safetensors (or model.safetensors.index.json): "
                    "fused/ is merged from safetensors weights; import a model published as safetensors")


def read_adapter(model_dir, lora_dir, files, device):
    """{base weight name: (A, B)} of the adapter, on `device`, and its scale. The adapter must
    hold exactly the keys peft expects for its config on this base's architecture (no missing
    module, no unexpected key), each module's weight must be in the base's files, and the
    config may use no feature that a merge of scale * B @ A would not honour."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = LoraConfig.from_pretrained(lora_dir)
    used = [name for name in UNMERGED_FEATURES if getattr(config, name, None)]
    used += [f"bias={config.bias!r}"] if config.bias != "none" else []
    if config.peft_type != "LORA" or used:
        raise UserError(f"the adapter in {lora_dir} uses {', '.join(used) or config.peft_type}, which "
                        "the merge into fused/ does not support: train a plain LoRA adapter")
    with torch.device("meta"):  # the architecture alone, as peft sees it: no weights loaded
        expected = get_peft_model_state_dict(PeftModel(AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model_dir)), config), save_embedding_layers=False).keys()
    weights = load_file(os.path.join(lora_dir, "adapter_model.safetensors"), device=device)
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise UserError(f"the adapter in {lora_dir} does not fit {model_dir}: {len(missing)} missing "
                        f"keys {short(missing)}, {len(unexpected)} unexpected keys "
                        f"{short(unexpected)}; it was trained on another model or its keys were renamed")
    names = set()
    for name in files:
        with safe_open(os.path.join(model_dir, name), "pt") as f:
            names.update(f.keys())
    adapter = {}
    for key in weights:
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            adapter[f"{module}.weight"] = (weights[key].float(),
                                           weights[key.replace(".lora_A.", ".lora_B.")].float())
    unmatched = sorted(adapter.keys() - names)
    if unmatched:
        raise UserError(f"the base's weights files in {model_dir} have no weight {short(unmatched)} "
                        "for the adapter: this model's files name its weights otherwise than its "
                        "modules, which the merge does not support")
    return adapter, config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def merged_weight(weight, a, b, scale):
    """W + scale * B @ A in float32, where A and B are."""
    import torch

    return weight.to(a.device, torch.float32, copy=True).addmm_(b, a, alpha=scale)


def check_merged_file(model_dir, fused_dir, name, adapter, scale):
    """That the fused file holds the base file's tensors, names and metadata, unchanged but for
    the adapted weights, each within one rounding of its dtype (half an ulp, relative) of
    W + scale * B @ A in float32. The largest error, in half ulps, and how many elements of
    the adapted weights the merge changed, of how many."""
    import torch
    from safetensors import safe_open

    worst, changed, elements = 0.0, 0, 0
    with safe_open(os.path.join(model_dir, name), "pt", backend="pread") as base, \
            safe_open(os.path.join(fused_dir, name), "pt", backend="pread") as fused:
        same = sorted(base.keys()) == sorted(fused.keys()) and base.metadata() == fused.metadata()
        for key in base.keys() if same else ():
            weight, written = base.get_tensor(key), fused.get_tensor(key)
            same = written.dtype == weight.dtype and written.shape == weight.shape
            if not same:
                break
            if key not in adapter:
                same = torch.equal(written, weight)
                if not same:
                    break
                continue
            changed += int(torch.count_nonzero(written != weight))
            elements += weight.numel()
            exact = merged_weight(weight, *adapter[key], scale)
            error = written.to(exact.device, torch.float32).sub_(exact).abs_()
            finfo = torch.finfo(weight.dtype)
            half_ulp = exact.abs_().mul_(finfo.eps / 2).add_(finfo.smallest_normal * finfo.eps / 2)
            worst = max(worst, error.div_(half_ulp).max().item())
    if not same or worst > 1:
        raise UserError(f"fused/{name} is not what the merge should have written ("
                        + (f"a merged weight is {worst:.3g} half ulps from W + scale * B @ A" if same
                           else "its tensors, names or metadata differ from the base's")
                        + "): the merge or the disk went wrong; nothing was published")
    return worst, changed, elements


def copy_other_files(model_dir, fused_dir, files, tokenizer):
    """The base's files that are neither weights, tokenizer nor generation config, as they are;
    config.json with use_cache on."""
    from transformers.tokenization_utils_base import (ADDED_TOKENS_FILE, SPECIAL_TOKENS_MAP_FILE,
                                                      TOKENIZER_CONFIG_FILE)

    tokenizer_files = {*tokenizer.vocab_files_names.values(),
                       ADDED_TOKENS_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE,
                       "chat_template.jinja", "chat_template.json"}
    for name in sorted(os.listdir(model_dir)):
        source = os.path.join(model_dir, name)
        if name.startswith(".") or not os.path.isfile(source) or name in files \
                or name in tokenizer_files or name == "generation_config.json":
            continue
        if name.endswith(".safetensors"):
            log(f"not copied to fused/: {name}, weights that the index does not list (unmerged)")
        elif name == "config.json":
            with open(source) as f:
                config = json.load(f)
            with open(os.path.join(fused_dir, name), "w") as f:
                json.dump({**config, "use_cache": True}, f, indent=2, sort_keys=True)
        else:
            shutil.copy(source, fused_dir)


# ---------------------------------------------------------------- the check


def check_examples(bucket, settings, plan, data):
    """The rows whose logits are compared, each cut to CHECK_TOKENS tokens from a little before
    its first trained one, with the positions whose next token is trained: the first CHECK_ROWS
    held-out rows (the model-ready manifest's "eval", never trained on), or without them the
    first rows of the last trained shard. And which rows they are."""
    prefix = model_ready_prefix(settings.model_name, settings.dataset_name)
    held_out = bool(data.get("eval"))
    paths = [entry["path"] for entry in data["eval"]] if held_out else \
        [part["path"] for part in data["shards"][last_trained(plan)]["parts"]]

    def candidates():
        for path in paths:
            for batch in read_parquet_batches(bucket, f"{prefix}/{path}", CHECK_ROWS):
                columns = (batch.column(name).to_pylist() for name in ("input_ids", "labels", "source_row"))
                for ids, labels, source_row in zip(*columns):
                    trained = [t for t in range(len(ids)) if labels[t] != NOT_TRAINED]
                    start = max(0, trained[0] - CHECK_TOKENS // 4) if trained else 0
                    ids, labels = ids[start:start + CHECK_TOKENS], labels[start:start + CHECK_TOKENS]
                    positions = [t for t in range(len(ids) - 1) if labels[t + 1] != NOT_TRAINED]
                    if positions:
                        yield path, source_row, (ids, positions)

    chosen = list(itertools.islice(candidates(), CHECK_ROWS))
    if not chosen:
        raise UserError(f"{', '.join(paths)} in {bucket.url(prefix)} hold no trained token to check "
                        "the fused model on: rerun with REBUILD=pretokenize")
    if not held_out:
        log(f"the model-ready manifest lists no held-out rows: the logits are compared on rows "
            f"of {paths[0]}, which training saw")
    examples = [example for _, _, example in chosen]
    return examples, {"held_out": held_out, "paths": list(dict.fromkeys(path for path, _, _ in chosen)),
                      "source_rows": [row for _, row, _ in chosen],
                      "positions": sum(len(positions) for _, positions in examples)}


def check_logits(model_dir, lora_dir, fused_dir, examples):
    """That fused/ is base + adapter: on the trained positions of `examples` the adapter must
    move the logits by more than EFFECT_FLOOR of their size, and fused/ must be within
    LOGITS_TOLERANCE of that move from base + adapter (root mean squares over positions and
    vocabulary). Runs where the model runs: loaded straight onto the GPUs, or on the CPU in the
    base's dtype (one model at a time). The figures, and the fused model."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # on stderr, before a one-line error
    where = {"device_map": "auto"} if torch.cuda.is_available() else {}  # dtype: the checkpoint's
    base = AutoModelForCausalLM.from_pretrained(model_dir, **where)
    adapted = PeftModel(base, LoraConfig.from_pretrained(lora_dir))
    loaded = adapted.load_adapter(lora_dir, "default")  # (PeftModel.from_pretrained only warns)
    if loaded.missing_keys or loaded.unexpected_keys:
        raise UserError(f"peft loads the adapter in {lora_dir} with {len(loaded.missing_keys)} missing "
                        f"keys {short(loaded.missing_keys)} and {len(loaded.unexpected_keys)} "
                        f"unexpected keys {short(loaded.unexpected_keys)}: it does not fit the base")
    reference = logits(adapted, examples)
    with adapted.disable_adapter():
        without = logits(adapted, examples)
    figures = {"dtype": str(base.dtype).removeprefix("torch."), "device": str(base.device),
               "base_rms": rms(without), "adapter_effect_rms": rms(reference - without)}
    del base, adapted, without
    release_memory()
    fused = AutoModelForCausalLM.from_pretrained(fused_dir, **where)
    figures["fused_distance_rms"] = rms(logits(fused, examples) - reference)
    figures.update(effect_over_base=figures["adapter_effect_rms"] / figures["base_rms"],
                   effect_floor=EFFECT_FLOOR, tolerance=LOGITS_TOLERANCE,
                   distance_over_effect=figures["fused_distance_rms"] / max(figures["adapter_effect_rms"], 1e-30))
    log(f"logits on {len(reference)} trained positions ({figures['dtype']} on {figures['device']}): the "
        f"adapter moves them by {figures['effect_over_base']:.2e} of their size (floor {EFFECT_FLOOR:.2e}); "
        f"fused/ is {figures['distance_over_effect']:.2e} of that move from base + adapter "
        f"(tolerance {LOGITS_TOLERANCE})")
    if not figures["effect_over_base"] > EFFECT_FLOOR:
        raise UserError(f"the adapter changes nothing: it moves the logits by "
                        f"{figures['effect_over_base']:.2e} of their size, less than their 16-bit "
                        f"rounding ({EFFECT_FLOOR:.2e}): training did not change the model "
                        "(LEARNING_RATE, MAX_STEPS?); nothing was published")
    if not figures["distance_over_effect"] <= LOGITS_TOLERANCE:
        raise UserError(f"the fused model's logits differ from base + adapter by "
                        f"{figures['distance_over_effect']:.3g} of the adapter's effect, more than "
                        f"{LOGITS_TOLERANCE}: the merge went wrong, or the adapter is too weak for "
                        f"the base's {figures['dtype']} weights to hold (it moves the logits by "
                        f"{figures['effect_over_base']:.2e} of their size; the update of a weight "
                        "under half its ulp rounds away): train longer or with a higher "
                        "LEARNING_RATE; nothing was published")
    return figures, fused


def logits(model, examples):
    """The logits at the trained positions of each example, one after the other, in float32."""
    import torch

    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([ids], device=model.device)).logits[0, positions].float()
                          for ids, positions in examples])


def rms(values):
    return values.square().mean().sqrt().item()


def last_trained(plan):
    """The shard of the last unit that trained."""
    return max(index for _, index, start, steps in units(plan) if steps and start < plan["total_steps"])


def generate(model, tokenizer, prompt):
    """A greedy answer, prompted as the model will be served: chat template, its stop tokens
    (and stop strings)."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_dict=False)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=model.device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                             max_new_tokens=SAMPLE_TOKENS, do_sample=False, tokenizer=tokenizer)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def run_metrics(checkpoint, plan, pointer):
    """Loss, learning rate and tokens/s of every logging step, the evaluation loss of every
    evaluation, and a summary of each unit (a shard in an epoch): its loss, the seconds training
    waited on storage (shard downloads, checkpoint uploads) and, under DDP, the sequences each
    rank trained on; the most bytes the scratch directory held on each node."""
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        state = json.load(f)
    keys = ("step", "shard", "loss", "learning_rate", "grad_norm", "tokens_per_second",
            "num_input_tokens_seen", "seconds")
    steps = [{key: entry.get(key) for key in keys} for entry in state["log_history"] if "loss" in entry]
    evaluations = [{"step": entry["step"], "eval_loss": entry["eval_loss"]}
                   for entry in state["log_history"] if "eval_loss" in entry]
    shards = []
    for number, (epoch, index, start, steps_of_unit) in enumerate(units(plan)):
        end = min(start + steps_of_unit, plan["total_steps"])
        if start >= plan["total_steps"]:
            break
        logged = [entry for entry in steps if start < entry["step"] <= end]
        shards.append({**plan["shards"][index], "epoch": epoch, "first_step": start + 1,
                       "last_step": end, "partial": end < start + steps_of_unit,
                       "mean_loss": sum(e["loss"] for e in logged) / len(logged) if logged else None,
                       **plan.get("shards_io", {}).get(str(number), {})})
    return {"steps": steps, "evaluations": evaluations, "shards": shards,
            "total_steps": plan["total_steps"], "epochs": plan["epochs"],
            "tokens_seen": state.get("num_input_tokens_seen"),
            "trained_tokens": sum(shard["trained_tokens"] or 0 for shard in shards),
            "training_seconds": pointer["seconds"], "backend": pointer["backend"],
            "device": pointer["device"], "world_size": plan.get("world_size", 1),
            "work_dir_peak_bytes": plan.get("work_dir_peak_bytes")}


def plot_loss(metrics, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([e["step"] for e in metrics["steps"]], [e["loss"] for e in metrics["steps"]], lw=1,
            label="training loss")
    if metrics["evaluations"]:
        ax.plot([e["step"] for e in metrics["evaluations"]], [e["eval_loss"] for e in metrics["evaluations"]],
                "o-", lw=1.5, label="evaluation loss (held-out rows)")
    for shard in metrics["shards"][1:]:
        ax.axvline(shard["first_step"] - 0.5, color="grey", ls=":", lw=0.8)
    ax.set(xlabel="optimizer step (dotted: shard boundaries)", ylabel="loss per trained token",
           title="training and evaluation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    run(main)
