"""The checkpoints in the bucket, and resuming from them.

    checkpoints/<MODEL_NAME>/<DATASET_NAME>[/<RUN_NAME>]/
        checkpoint-<step>/      the trainer's checkpoint (adapter, optimizer, scheduler, trainer
                                state, every process's RNG state); _checkpoint.json, uploaded
                                last, says it is whole and lists its files
        latest.json             the checkpoint to resume from, written once its upload finished
        lease.json              the launch that trains the run now (training/lease.py)

A checkpoint is whole when its _checkpoint.json and every file it lists are there. Uploads run
in the background, one after the other; the previous checkpoint stays until a later one is
named, so that a reader of an older latest.json (another region, a moment earlier) still finds
what it names.
"""

import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

from common import UserError, log
from training.shards import position, units

POINTER = "latest.json"
LEASE = "lease.json"
WHOLE = "_checkpoint.json"  # in a checkpoint's folder, uploaded last
# What a run without RUN_NAME writes under its prefixes; named runs' folders sit beside them.
UNNAMED_RUN_FILES = ("_manifest.json", POINTER, LEASE, "lora_model", "fused", "metrics.json",
                     "loss.png", "tensorboard")


def owned_by_unnamed_run(name):
    return name.split("/")[0] in UNNAMED_RUN_FILES or name.startswith("checkpoint-")


def check_run_name(name):
    """RUN_NAME must be a folder of its own beside the unnamed run's files."""
    if name and (owned_by_unnamed_run(name) or not re.fullmatch(r"[A-Za-z0-9._-]+", name)
                 or set(name) == {"."}):
        raise UserError(f"RUN_NAME={name!r}: use letters, digits, '.', '_' and '-', and none of "
                        f"{', '.join(UNNAMED_RUN_FILES)} or checkpoint-*")


def replaced_by_force(run_name):
    """What replacing a run's outputs (FORCE, REBUILD) deletes under its prefixes, by name:
    all of a named run's; the unnamed run's own files (named runs' folders sit beside them);
    never the lease, which this launch holds."""
    return lambda name: (name.split("/")[0] != LEASE
                         and (bool(run_name) or owned_by_unnamed_run(name)))


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


def pointer_at(plan, step, seconds, backend, records):
    """What latest.json says of checkpoint-<step> besides its files: where the run stands in the
    plan, its training seconds so far, the backend, and what each unit recorded."""
    number, into = position(plan, step)
    epoch, index = units(plan)[number][:2] if number < len(units(plan)) else (plan.epochs, 0)
    return {"step": step, "checkpoint": f"checkpoint-{step}", "epoch": epoch, "shard": index,
            "steps_into_shard": into, "total_steps": plan.total_steps, "seconds": round(seconds, 3),
            "backend": backend.name, "device": backend.device,
            "shards_io": {key: record.as_json() for key, record in records.items()}}


def checkpoint_saved(bucket, prefix, ranks, uploads, pointer, record):
    """A TrainerCallback: every process's RNG state in the bucket, then rank 0 queues the
    checkpoint the trainer saved for upload (`uploads`) with `pointer(step)`, and adds what it
    waited for the previous upload to `record`. On several nodes each node's first process
    uploads its processes' RNG states (the rest of a checkpoint is the same on every node)."""
    from transformers import TrainerCallback

    class CheckpointSaved(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            name = f"checkpoint-{state.global_step}"
            local = os.path.join(args.output_dir, name)
            others = [f"rng_state_{rank}.pth" for rank in range(ranks.world)
                      if ranks.node_of(rank) != 0]
            ranks.barrier()  # every process has saved its RNG state on its node's disk
            if others:
                if ranks.local_rank == 0 and ranks.node != 0:
                    for file in others:
                        if os.path.exists(os.path.join(local, file)):
                            bucket.upload(os.path.join(local, file), f"{prefix}/{name}/{file}")
                ranks.barrier()  # ...and in the bucket before rank 0 names the checkpoint
            if uploads is not None:
                record.waited(uploads.submit(local, pointer(state.global_step), others))

    return CheckpointSaved()


def save_every(minutes, ranks, clock=time.monotonic):
    """A TrainerCallback that asks for a checkpoint once `minutes` (SAVE_MINUTES; 0: never) have
    passed since the last one or since it was made, whichever of SAVE_STEPS and this comes
    first, so that a preemption loses that much training at most. Rank 0's clock decides for
    every rank (one small broadcast an optimizer step), so that all save at the same step; the
    callbacks after it (the evaluation) see the decision."""
    from transformers import TrainerCallback

    class SaveEvery(TrainerCallback):
        last = clock()

        def on_step_end(self, args, state, control, **kwargs):
            # (SAVE_STEPS and the shard's end decide the same on every rank)
            if minutes and not control.should_save:
                control.should_save = ranks.from_rank_0(lambda: clock() - self.last >= 60 * minutes)

        def on_save(self, args, state, control, **kwargs):
            self.last = clock()

    return SaveEvery()


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
