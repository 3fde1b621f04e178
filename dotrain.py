"""Step 4: LoRA fine-tuning on the model-ready shards, one shard after another, resumable.

    models/<MODEL_NAME>/                                  base model (import-model.py)
    model-ready/<MODEL_NAME>/<DATASET_NAME>/              input_ids and labels (pretokenize.py)
 -> checkpoints/<MODEL_NAME>/<DATASET_NAME>/_manifest.json      the plan: optimizer steps of each shard
    checkpoints/<MODEL_NAME>/<DATASET_NAME>/checkpoint-<step>/  adapter, optimizer, scheduler, RNG,
                                                                trainer state
    checkpoints/<MODEL_NAME>/<DATASET_NAME>/latest.json         the checkpoint to resume from, written
                                                                once its upload finished
    done/<MODEL_NAME>/<DATASET_NAME>/lora_model/          the adapter and tokenizer (PeftModel.from_pretrained)
    done/<MODEL_NAME>/<DATASET_NAME>/fused/               the adapter merged into the base's weights
                                                          files, same names and dtypes (AutoModelForCausalLM, vLLM)
    done/<MODEL_NAME>/<DATASET_NAME>/metrics.json, loss.png, _manifest.json (written last)

One epoch over every shard, in manifest order, under one learning-rate schedule whose length
is counted before training starts: each shard's optimizer steps are counted on the dataset the
trainer itself prepares from it (packed or not). Optimizer and schedule carry over from shard to
shard through the checkpoint saved at the end of each shard. On GPU with unsloth installed,
unsloth trains (16-bit LoRA of exactly the bucket's model); elsewhere transformers + peft do.
Checkpoints upload in the background while training goes on.

Under torchrun (several GPUs, several nodes) the ranks train one model with DDP and transformers +
peft: each optimizer step takes BATCH_SIZE x GRAD_ACCUM sequences on every rank, each rank its own
batches of each shard, every sequence once. Rank 0 alone writes to the bucket.

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
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from common import (CHATML_TEMPLATE, MODEL_CACHE_SETTING, Setting, UserError, checkpoints_prefix,
                    done_prefix, download_model, fingerprint, log, model_fingerprint, model_prefix,
                    model_ready_prefix, open_bucket, parse_settings, read_parquet_batches,
                    require_complete, resume_or_start, run, short, write_manifest)

SETTINGS = [
    Setting("MODEL_NAME", help="name of the model in bucket paths, e.g. Qwen/Qwen2.5-0.5B",
            required=True),
    Setting("DATASET_NAME", help="name of the dataset in bucket paths, e.g. mlabonne/FineTome-100k",
            required=True),
    Setting("TRAIN_BACKEND", "auto", "unsloth (CUDA GPU), peft (transformers + peft, any "
            "device) or auto: unsloth when a GPU and unsloth are there", choices=("auto", "unsloth", "peft")),
    Setting("LORA_R", 16, "LoRA rank", int, minimum=1),
    Setting("LORA_ALPHA", 16, "LoRA alpha (scale = alpha / r)", int, minimum=1),
    Setting("LORA_DROPOUT", 0.0, "dropout on the LoRA input", float, minimum=0),
    Setting("LEARNING_RATE", 2e-4, "peak learning rate (linear warmup, then linear decay to 0)",
            float, minimum=0),
    Setting("BATCH_SIZE", 2, "sequences per device batch", int, minimum=1),
    Setting("GRAD_ACCUM", 4, "batches per optimizer step", int, minimum=1),
    Setting("WARMUP_STEPS", 5, "optimizer steps of linear warmup", int, minimum=0),
    Setting("WEIGHT_DECAY", 0.01, "AdamW weight decay", float, minimum=0),
    Setting("SEED", 3407, "seed of the LoRA initialisation and of the data order", int, minimum=0),
    Setting("MAX_SEQ_LENGTH", 4096, "tokens per training sequence (longer rows are cut)", int,
            minimum=8),
    Setting("PACKING", True, "pack rows into MAX_SEQ_LENGTH sequences, padding-free (0: one "
            "padded row per sequence)", bool),
    Setting("MAX_STEPS", None, "stop after this many optimizer steps (smoke runs; default: one "
            "epoch)", int, minimum=1),
    Setting("SAVE_STEPS", 200, "optimizer steps between checkpoints (and one at each shard's end)",
            int, minimum=1),
    Setting("LOGGING_STEPS", 1, "optimizer steps between log lines", int, minimum=1),
    Setting("WORK_DIR", os.path.join(tempfile.gettempdir(), "dotrain"),
            "local scratch directory (two shards, a checkpoint, the exported model)"),
    Setting("SAMPLE_PROMPT", "Give three tips for staying healthy.",
            "user message answered greedily by the fused model as a smoke test"),
    MODEL_CACHE_SETTING,
]
CODE_VERSION = "dotrain/1"  # bump when a change alters what training produces
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
POINTER = "latest.json"
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
    ranks = Ranks.start()
    bucket = open_bucket(settings)
    model_manifest = require_complete(bucket, model_prefix(settings.model_name), "import-model.py")
    data = require_complete(bucket, model_ready_prefix(settings.model_name, settings.dataset_name),
                            "pretokenize.py")
    inputs = run_inputs(settings, model_manifest, data)
    # Rank 0 first: with FORCE it removes the old outputs, which the other ranks must not see.
    with ranks.first():
        force = settings.force and ranks.rank == 0
        done = resume_or_start(bucket, done_prefix(settings.model_name, settings.dataset_name),
                               inputs, force)
        plan = None if done["complete"] else resume_or_start(
            bucket, checkpoints_prefix(settings.model_name, settings.dataset_name), inputs, force)
    if done["complete"]:
        log(f"{bucket.url(done_prefix(settings.model_name, settings.dataset_name))} is complete: "
            "nothing to do")
        return
    with ranks.first_on_node():
        work = Work(settings, ranks)
        model_dir = download_model(bucket, settings.model_name, settings.model_cache_dir)
    weights_files(model_dir)  # fused/ is merged from safetensors: refuse others now, not after training
    if not plan["complete"]:
        backend = choose_backend(settings, ranks)
        where = bucket.url(checkpoints_prefix(settings.model_name, settings.dataset_name))
        if plan.get("optim", backend.optim) != backend.optim:
            raise UserError(f"the checkpoints of {where} hold {plan['optim']} optimizer state and "
                            f"this machine trains with {backend.optim}: resume on the same kind of "
                            "machine, or rerun with FORCE=1 to start over")
        if plan.get("world_size", ranks.world) != ranks.world:
            raise UserError(f"the checkpoints of {where} were planned for {plan['world_size']} "
                            f"training processes and this run has {ranks.world}: relaunch with as "
                            "many nodes and GPUs, or rerun with FORCE=1 to start over")
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
        "lora_r", "lora_alpha", "lora_dropout", "learning_rate", "batch_size", "grad_accum",
        "warmup_steps", "weight_decay", "seed", "max_seq_length", "packing", "max_steps")}
    return {"step": CODE_VERSION, "model": model_fingerprint(model_manifest),
            "model_ready": fingerprint(data), "target_modules": TARGET_MODULES, **hyperparameters}


class Ranks:
    """This process's place among the training processes: one, or torchrun's (WORLD_SIZE > 1)."""

    def __init__(self, rank=0, local_rank=0, world=1):
        self.rank, self.local_rank, self.world = rank, local_rank, world

    @classmethod
    def start(cls):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch
        import torch.distributed as dist

        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), local_rank, world)

    @contextlib.contextmanager
    def first(self, leader=None):
        """Rank 0 (or each node's first rank) runs the block, then the others do."""
        leader = self.rank == 0 if leader is None else leader
        if not leader:
            self.barrier()
        yield
        if leader:
            self.barrier()

    def first_on_node(self):
        return self.first(self.local_rank == 0)

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered


class Work:
    """The local scratch directories of this model and dataset: the trainer's (a node's ranks
    share it, as they share its checkpoints) and each rank's own for shards and exports."""

    def __init__(self, settings, ranks):
        self.root = os.path.join(os.path.expanduser(settings.work_dir), settings.model_name,
                                 settings.dataset_name)
        mine = self.root if ranks.world == 1 else os.path.join(self.root, f"rank-{ranks.local_rank}")
        self.shards = os.path.join(mine, "shards")
        self.trainer = os.path.join(self.root, "trainer")
        self.uploads = os.path.join(self.root, "uploads")
        self.export = os.path.join(mine, "export")
        shared = (self.trainer, self.uploads) if ranks.local_rank == 0 else ()
        for path in (self.shards, self.export, *shared):  # a killed run's leftovers
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)


# ---------------------------------------------------------------- backend and model


@dataclass
class Backend:
    name: str  # unsloth | peft
    device: str  # cuda | cpu
    bf16: bool
    fp16: bool
    optim: str
    trainer_class: type = None


def choose_backend(settings, ranks=Ranks()):
    """unsloth on a CUDA GPU when installed (imported here, before transformers, trl and peft,
    which it patches), else transformers + peft; and the precision and optimizer of the device.
    Several processes (DDP) train with transformers + peft."""
    import torch

    cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None and ranks.world == 1
    if settings.train_backend == "unsloth" and ranks.world > 1:
        raise UserError(f"TRAIN_BACKEND=unsloth trains in one process and this run has {ranks.world} "
                        "(torchrun): use TRAIN_BACKEND=peft (or auto) on several GPUs")
    if settings.train_backend == "unsloth" and not cuda:
        raise UserError("TRAIN_BACKEND=unsloth needs a CUDA GPU and this machine has none: "
                        "use TRAIN_BACKEND=peft (or auto) here")
    if settings.train_backend == "unsloth" and not has_unsloth:
        raise UserError("TRAIN_BACKEND=unsloth but unsloth is not installed: pip install "
                        "unsloth==2026.10.9 (see requirements.txt), or use TRAIN_BACKEND=peft")
    name = "unsloth" if cuda and has_unsloth and settings.train_backend != "peft" else "peft"
    if name == "unsloth":
        import unsloth  # noqa: F401
    elif cuda and settings.train_backend == "auto":
        log("unsloth is not installed: training with transformers + peft" if ranks.world == 1 else
            f"{ranks.world} processes: training with transformers + peft under DDP")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    eight_bit = cuda and importlib.util.find_spec("bitsandbytes") is not None
    # Packed, padding-free batches are exact with SDPA too, as long as no KV cache is built
    # (compute_loss passes use_cache=False; the tests check it): TRL's warning does not apply.
    logging.getLogger("trl.trainer.sft_trainer").addFilter(
        lambda record: "Flash Attention variant" not in record.getMessage())
    backend = Backend(name, "cuda" if cuda else "cpu", bf16=bf16, fp16=cuda and not bf16,
                      optim="adamw_8bit" if eight_bit else "adamw_torch")
    backend.trainer_class = shard_trainer_class(backend, ranks)
    log(f"backend: {name} on {backend.device}, {'bf16' if bf16 else 'fp16' if backend.fp16 else 'fp32'}, "
        f"{backend.optim}")
    return backend


def load_for_training(settings, backend, model_dir):
    """The base model with fresh LoRA adapters on the seven projections, and its tokenizer."""
    import torch
    from transformers import AutoTokenizer, set_seed

    set_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lora = dict(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                target_modules=TARGET_MODULES, bias="none")
    if backend.name == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            model_name=model_dir, max_seq_length=settings.max_seq_length, dtype=None,
            load_in_4bit=False, load_in_16bit=True, use_exact_model_name=True)
        return FastLanguageModel.get_peft_model(model, **lora, use_gradient_checkpointing="unsloth",
                                                random_state=settings.seed), tokenizer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if backend.bf16 else torch.float16 if backend.fp16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.to(backend.device)
    return get_peft_model(model, LoraConfig(**lora, task_type="CAUSAL_LM")), tokenizer


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
        shard = None
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
    from trl import SFTConfig

    config = SFTConfig(
        output_dir=work.trainer, report_to="none", seed=settings.seed,
        use_cpu=backend.device == "cpu",  # (without it, processes on CPUs would not form a DDP group)
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.learning_rate,
        lr_scheduler_type="linear", warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay, optim=backend.optim, bf16=backend.bf16, fp16=backend.fp16,
        # unsloth checkpoints gradients itself; on CPU the models are small and time matters more
        gradient_checkpointing=backend.name == "peft" and backend.device == "cuda",
        max_length=settings.max_seq_length, packing=settings.packing, packing_strategy="bfd",
        max_steps=max_steps, ignore_data_skip=True, train_sampling_strategy="sequential",
        save_strategy="steps", save_steps=settings.save_steps, save_total_limit=1,
        save_on_each_node=True,  # (several nodes: every node resumes each shard from its own copy)
        logging_steps=settings.logging_steps,
        include_num_input_tokens_seen="all" if settings.packing else "non_padding",
        disable_tqdm=True)
    return backend.trainer_class(model=model, args=config, train_dataset=dataset,
                                 processing_class=tokenizer, callbacks=list(callbacks))


def release_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- shards and the plan


def local_shards(bucket, prefix, shards, first, directory):
    """(index, local path, seconds waited for it) of shards[first:] in order. The next shard
    downloads while the caller trains on the current one; a shard's local files go once the
    caller moves on."""

    def fetch(index):
        folder = os.path.join(directory, str(index))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, os.path.basename(shards[index]["path"]))
        bucket.download(f"{prefix}/{shards[index]['path']}", path)
        return path

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(fetch, first) if first < len(shards) else None
        for index in range(first, len(shards)):
            waiting = time.time()
            path = pending.result()
            waited = time.time() - waiting
            pending = pool.submit(fetch, index + 1) if index + 1 < len(shards) else None
            try:
                yield index, path, waited
            finally:
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def load_shard(path, entry):
    """A local shard as a memory-mapped dataset of input_ids and labels, exactly as pretokenized."""
    import datasets

    dataset = datasets.Dataset.from_parquet(path, cache_dir=os.path.join(os.path.dirname(path), "cache"))
    if len(dataset) != entry["rows"]:
        raise UserError(f"{entry['path']} has {len(dataset)} rows but its manifest says "
                        f"{entry['rows']}: rerun pretokenize.py with FORCE=1")
    return dataset.select_columns(["input_ids", "labels"])


def optimizer_steps(sequences, settings, world):
    """Optimizer steps of one pass over `sequences` by `world` processes, as transformers.Trainer
    counts them: each rank takes every world-th batch; the last batch and the last accumulation
    may be short, and each still makes a step."""
    batches = math.ceil(sequences / settings.batch_size)
    return math.ceil(math.ceil(batches / world) / settings.grad_accum)


def make_plan(settings, bucket, backend, model, tokenizer, data, plan, work, ranks):
    """The optimizer steps of every shard, counted once on the trainer's own preparation of
    each shard (packing, truncation, dropped rows) and saved before training starts. Every
    rank counts the same; rank 0 saves."""
    prefix = checkpoints_prefix(settings.model_name, settings.dataset_name)
    data_prefix = model_ready_prefix(settings.model_name, settings.dataset_name)
    for index, path, _ in local_shards(bucket, data_prefix, data["shards"], 0, work.shards):
        entry = data["shards"][index]
        sequences = tokens = 0
        if entry["rows"]:  # (a trainer needs a first row to look at)
            trainer = make_trainer(settings, backend, model, tokenizer, load_shard(path, entry), work,
                                   max_steps=1)
            sequences, tokens = len(trainer.train_dataset), count_tokens(trainer.train_dataset)
            del trainer
        shard = {"path": entry["path"], "rows": entry["rows"], "sequences": sequences,
                 "steps": optimizer_steps(sequences, settings, ranks.world), "tokens": tokens,
                 "trained_tokens": entry.get("trained_tokens"),
                 "dropped_rows": 0 if settings.packing else entry["rows"] - sequences,
                 "cut_tokens": entry["tokens"] - tokens if "tokens" in entry else None}
        if shard["dropped_rows"] or shard["cut_tokens"]:
            log(f"{entry['path']}: rows longer than MAX_SEQ_LENGTH={settings.max_seq_length} lose "
                f"{shard['cut_tokens']} tokens; {shard['dropped_rows']} rows are left with no "
                "trained token and dropped")
        plan["shards"].append(shard)
        plan["rows"] += entry["rows"]
    all_steps = sum(shard["steps"] for shard in plan["shards"])
    if not all_steps:
        raise UserError(f"{bucket.url(data_prefix)} has no row left to train on: check "
                        "pretokenize.py's output and MAX_SEQ_LENGTH")
    plan.update(total_steps=min(all_steps, settings.max_steps or all_steps), optim=backend.optim,
                world_size=ranks.world)
    if ranks.rank == 0:
        write_manifest(bucket, prefix, plan)

    log(f"plan: {plan['total_steps']} optimizer steps over {len(plan['shards'])} shards "
        f"({', '.join(str(shard['steps']) for shard in plan['shards'])})"
        + (f", capped by MAX_STEPS from {all_steps}" if plan["total_steps"] < all_steps else ""))


def count_tokens(dataset):
    import pyarrow.compute as pc

    return sum(pc.sum(pc.list_value_length(batch["input_ids"])).as_py() or 0
               for batch in dataset.with_format("arrow").iter(batch_size=10_000))


def shard_starts(plan):
    """The global step at which each shard begins."""
    starts, step = [], 0
    for shard in plan["shards"]:
        starts.append(step)
        step += shard["steps"]
    return starts


def position(plan, step):
    """(shard index, its optimizer steps already done) after `step` steps of the run."""
    for index, (start, shard) in enumerate(zip(shard_starts(plan), plan["shards"])):
        if step < start + shard["steps"]:
            return index, step - start
    return len(plan["shards"]), 0


# ---------------------------------------------------------------- training


def train(settings, bucket, backend, model_dir, data, plan, work, ranks):
    """Plan the steps (once), then train from the latest checkpoint to the plan's last step."""
    prefix = checkpoints_prefix(settings.model_name, settings.dataset_name)
    model, tokenizer = load_for_training(settings, backend, model_dir)
    if plan.get("total_steps") is None:
        make_plan(settings, bucket, backend, model, tokenizer, data, plan, work, ranks)
    pointer = read_pointer(bucket, prefix)
    step, total = pointer["step"] if pointer else 0, plan["total_steps"]
    io = (pointer or {}).get("shards_io", {})
    if step < total:
        first, into = position(plan, step)
        log(f"resuming at step {step}: shard {first}, after {into} of its "
            f"{plan['shards'][first]['steps']} steps" if pointer else
            f"training {total} steps over {len(plan['shards'])} shards")
        checkpoint = os.path.join(work.trainer, pointer["checkpoint"]) if pointer else None
        with ranks.first_on_node():
            if pointer and ranks.local_rank == 0:
                fetch_checkpoint(bucket, prefix, pointer, work.trainer)
        began, seconds_before = time.time(), pointer["seconds"] if pointer else 0.0
        uploads = Uploads(bucket, prefix, work.uploads) if ranks.rank == 0 else None
        train_shards(settings, bucket, backend, model, tokenizer, plan, work, ranks, step, checkpoint,
                     lambda: seconds_before + time.time() - began, uploads, io)
    plan.update(complete=True, shards_io=io)
    if ranks.rank == 0:
        write_manifest(bucket, prefix, plan)
    log(f"training complete: {total} steps")
    del model
    release_memory()


def train_shards(settings, bucket, backend, model, tokenizer, plan, work, ranks, step, checkpoint,
                 seconds, uploads, io):
    """Train shard after shard from `step` (and its checkpoint) on; `seconds()` is the training
    time of the run so far, this process's and that of the checkpoints before. `io` collects, by
    shard, the seconds training waited on storage and the sequences each rank trained on."""
    data_prefix = model_ready_prefix(settings.model_name, settings.dataset_name)
    starts, total = shard_starts(plan), plan["total_steps"]
    first, _ = position(plan, step)
    for index, path, waited in local_shards(bucket, data_prefix, plan["shards"], first, work.shards):
        end = min(starts[index] + plan["shards"][index]["steps"], total)
        if end == step:  # a shard with nothing left to train on
            continue
        record = io.setdefault(str(index), {"storage_wait_s": 0.0})
        record["storage_wait_s"] = round(record["storage_wait_s"] + waited, 3)
        trainer = make_trainer(settings, backend, model, tokenizer,
                               load_shard(path, plan["shards"][index]), work, total)
        # The trainer's own order is sequential: this fixed shuffle of the prepared shard is what
        # a resumed run skips into.
        order = trainer.train_dataset.shuffle(seed=settings.seed + index)
        done = (step - starts[index]) * settings.batch_size * settings.grad_accum * ranks.world
        trainer.train_dataset = order.select(range(done, len(order)))
        if ranks.world > 1:
            trainer.train_dataset = RankView(trainer.train_dataset)
        whole = end == starts[index] + plan["shards"][index]["steps"]
        trainer.add_callback(shard_callback(uploads, ranks, plan, end, whole, seconds, backend, io,
                                            record, trainer.train_dataset, done))
        trainer.shard, trainer.seconds = index, seconds
        log(f"shard {index} ({plan['shards'][index]['path']}): steps {step + 1}..{end}")
        trainer.train(resume_from_checkpoint=checkpoint)
        if trainer.state.global_step != end:
            raise RuntimeError(f"shard {index} ended at step {trainer.state.global_step}, "
                               f"not at the planned {end}")
        ranks.barrier()  # each node's checkpoint is saved before any of its ranks loads it
        step, checkpoint = end, os.path.join(work.trainer, f"checkpoint-{end}")
        del trainer, order
        release_memory()
        if step >= total:
            break
    if uploads:
        record["storage_wait_s"] = round(record["storage_wait_s"] + uploads.finish(), 3)


def read_pointer(bucket, prefix):
    """latest.json: the checkpoint to resume from and where training continues after it."""
    return json.loads(bucket.get(f"{prefix}/{POINTER}") or "null")


def fetch_checkpoint(bucket, prefix, pointer, directory, files=None):
    """The pointed checkpoint's files (or some of them) in directory/checkpoint-<step>/."""
    local = os.path.join(directory, pointer["checkpoint"])
    for name in files or pointer["files"]:
        os.makedirs(os.path.dirname(os.path.join(local, name)), exist_ok=True)
        bucket.download(f"{prefix}/{pointer['checkpoint']}/{name}", os.path.join(local, name))
    return local


def shard_callback(uploads, ranks, plan, shard_end, whole, seconds, backend, io, record, sequences,
                   done):
    """Stops (and saves) at the shard's last step, after checking (when the shard is `whole`,
    not cut by MAX_STEPS) that the ranks trained on each of its sequences once; rank 0 queues
    every checkpoint the trainer saves for upload."""
    from transformers import TrainerCallback

    class ShardEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < shard_end:
                return
            control.should_save = control.should_training_stop = True
            if ranks.world > 1 and whole:
                record.update(sequences_by_rank=shared_exactly(ranks, sequences, kwargs["model"]),
                              sequences_before_resume=done)

        def on_save(self, args, state, control, **kwargs):
            if uploads is None:
                return
            name = f"checkpoint-{state.global_step}"
            shard, into = position(plan, state.global_step)
            pointer = {"step": state.global_step, "checkpoint": name, "shard": shard,
                       "steps_into_shard": into, "total_steps": plan["total_steps"],
                       "seconds": round(seconds(), 3), "backend": backend.name,
                       "device": backend.device}
            waited = uploads.submit(os.path.join(args.output_dir, name), pointer, io)
            record["storage_wait_s"] = round(record["storage_wait_s"] + waited, 3)

    return ShardEnd()


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
    then latest.json pointing at it, then the older checkpoints go. Training waits only when
    it saves a checkpoint before the previous one is uploaded."""

    def __init__(self, bucket, prefix, directory):
        self.bucket, self.prefix, self.directory = bucket, prefix, directory
        self.pool, self.pending = ThreadPoolExecutor(1), None

    def submit(self, local, pointer, io):
        """Queue a checkpoint saved in `local`; the seconds spent waiting for the previous one."""
        waited = self.wait()
        # Hard links: the trainer may delete its copy (save_total_limit) while this one uploads.
        staged = os.path.join(self.directory, pointer["checkpoint"])
        shutil.copytree(local, staged, copy_function=os.link)
        pointer = {**pointer, "shards_io": json.loads(json.dumps(io))}
        self.pending = self.pool.submit(self.upload, staged, pointer)
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

    def upload(self, staged, pointer):
        name, bucket, prefix = pointer["checkpoint"], self.bucket, self.prefix
        files = sorted(os.path.relpath(os.path.join(folder, file), staged)
                       for folder, _, names in os.walk(staged) for file in names)
        for file in files:
            bucket.upload(os.path.join(staged, file), f"{prefix}/{name}/{file}")
        bucket.put(f"{prefix}/{POINTER}", json.dumps({**pointer, "files": files}, indent=1).encode())
        for old in bucket.fs.ls(bucket.path(prefix), detail=False):
            if os.path.basename(old).startswith("checkpoint-") and os.path.basename(old) != name:
                bucket.fs.rm(old, recursive=True)
        shutil.rmtree(staged)
        log(f"checkpoint {pointer['step']}/{pointer['total_steps']} saved to {bucket.url(prefix)}/{name}")


# ---------------------------------------------------------------- outputs


def export(settings, bucket, model_dir, plan, data, inputs, work):
    """lora_model/ and fused/ from the last checkpoint, checked against each other, metrics,
    then the done manifest. Plain transformers + peft, whichever backend trained."""
    prefix = done_prefix(settings.model_name, settings.dataset_name)
    pointer = read_pointer(bucket, checkpoints_prefix(settings.model_name, settings.dataset_name))
    checkpoint = fetch_checkpoint(bucket, checkpoints_prefix(settings.model_name, settings.dataset_name),
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
    plot_loss(metrics, os.path.join(work.export, "loss.png"))
    for folder in (lora_dir, fused_dir):
        for name in sorted(os.listdir(folder)):
            bucket.upload(os.path.join(folder, name), f"{prefix}/{os.path.basename(folder)}/{name}")
    bucket.put(f"{prefix}/metrics.json", json.dumps(metrics, indent=1).encode())
    bucket.upload(os.path.join(work.export, "loss.png"), f"{prefix}/loss.png")
    write_manifest(bucket, prefix, {
        "complete": True, "inputs": inputs, "shards": metrics["shards"],
        "rows": sum(shard["rows"] for shard in metrics["shards"]), "total_steps": plan["total_steps"],
        "tokens_seen": metrics["tokens_seen"], "backend": pointer["backend"], "check": check,
        "sample": {"prompt": settings.sample_prompt, "completion": sample},
        "outputs": ["lora_model/", "fused/", "metrics.json", "loss.png"]})
    log(f"{bucket.url(prefix)} complete: {plan['total_steps']} steps, lora_model/ and fused/")
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
        [plan["shards"][last_trained(plan)]["path"]]

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
                        "the fused model on: rerun pretokenize.py with FORCE=1")
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
    return max(index for index, shard in enumerate(plan["shards"])
               if shard["steps"] and shard_starts(plan)[index] < plan["total_steps"])


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
    """Loss, learning rate and tokens/s of every logging step, and a summary of each shard:
    its loss, the seconds training waited on storage (shard downloads, checkpoint uploads) and,
    under DDP, the sequences each rank trained on."""
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        state = json.load(f)
    keys = ("step", "shard", "loss", "learning_rate", "grad_norm", "tokens_per_second",
            "num_input_tokens_seen", "seconds")
    steps = [{key: entry.get(key) for key in keys} for entry in state["log_history"] if "loss" in entry]
    shards, starts = [], shard_starts(plan)
    for index, shard in enumerate(plan["shards"]):
        start, end = starts[index], min(starts[index] + shard["steps"], plan["total_steps"])
        if start >= plan["total_steps"]:
            break
        logged = [entry for entry in steps if start < entry["step"] <= end]
        shards.append({**shard, "first_step": start + 1, "last_step": end,
                       "partial": end < start + shard["steps"],
                       "mean_loss": sum(e["loss"] for e in logged) / len(logged) if logged else None,
                       **plan.get("shards_io", {}).get(str(index), {})})
    return {"steps": steps, "shards": shards, "total_steps": plan["total_steps"],
            "tokens_seen": state.get("num_input_tokens_seen"),
            "trained_tokens": sum(shard["trained_tokens"] or 0 for shard in shards),
            "training_seconds": pointer["seconds"], "backend": pointer["backend"],
            "device": pointer["device"], "world_size": plan.get("world_size", 1)}


def plot_loss(metrics, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([e["step"] for e in metrics["steps"]], [e["loss"] for e in metrics["steps"]], lw=1)
    for shard in metrics["shards"][1:]:
        ax.axvline(shard["first_step"] - 0.5, color="grey", ls=":", lw=0.8)
    ax.set(xlabel="optimizer step (dotted: shard boundaries)", ylabel="training loss",
           title="training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    run(main)
