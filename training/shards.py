"""The plan and the shards: how many optimizer steps each shard makes (counted from its rows'
lengths, before any shard is downloaded), the units of training (a shard in an epoch), and each
shard prepared for training as the trainer would prepare it, one unit ahead, in a process of its
own, once per node.
"""

import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

from common import Bucket, UserError, exit_with_parent, log, write_json_atomically
from training.speed import attended_positions

PACK_ROWS = 1_000  # rows packed together (the batches of TRL's packing map)


@dataclass
class UnitRecord:
    """What training recorded of a unit (a shard in an epoch), carried by every checkpoint's
    pointer: the seconds it waited on storage (shard downloads, checkpoint uploads), under DDP
    the sequences each rank trained on, and under fp16 the optimizer steps the loss scaler
    skipped."""

    storage_wait_s: float = 0.0
    sequences_by_rank: list = None
    sequences_before_resume: int = None
    skipped_steps: list = None  # global step numbers

    def waited(self, seconds):
        self.storage_wait_s = round(self.storage_wait_s + seconds, 3)

    def as_json(self):
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass
class Plan:
    """The run's plan, its checkpoints' manifest: the optimizer steps of every shard and of the
    run, saved before training starts; when training is complete, what each unit recorded and
    the most bytes each node's scratch disk held."""

    inputs: dict
    complete: bool = False
    shards: list = field(default_factory=list)  # path, rows, sequences, steps, tokens, attended, trained_tokens
    rows: int = 0
    epochs: int = None
    total_steps: int = None
    world_size: int = None
    optim: str = None  # the optimizer whose state the checkpoints hold
    dtype: str = None  # the precision they were trained in
    shards_io: dict = None  # {unit number: UnitRecord.as_json()}
    work_dir_peak_bytes: dict = None  # {"node N": bytes}

    @classmethod
    def from_manifest(cls, manifest):
        return cls(**manifest)

    def manifest(self):
        return {name: value for name, value in asdict(self).items() if value is not None}


def make_plan(settings, bucket, data_prefix, data, inputs, world):
    """The optimizer steps of every shard, from its rows' lengths alone (the `length` column:
    no shard is downloaded to plan), and of the run: NUM_EPOCHS passes, capped by MAX_STEPS.
    Each shard also counts the positions its tokens attend to (training.speed: the model FLOPs
    of a token)."""
    plan = Plan(inputs)
    for entry in data["shards"]:
        lengths = shard_lengths(bucket, data_prefix, entry)
        sequences = packed_sequences(lengths, settings.max_seq_length) if settings.packing else len(lengths)
        plan.shards.append({"path": entry["path"], "rows": entry["rows"], "sequences": sequences,
                            "steps": optimizer_steps(sequences, settings, world),
                            "tokens": int(sum(lengths)), "attended": attended_positions(lengths),
                            "trained_tokens": entry.get("trained_tokens")})
        plan.rows += entry["rows"]
    epoch_steps = sum(shard["steps"] for shard in plan.shards)
    if not epoch_steps:
        raise UserError(f"{bucket.url(data_prefix)} has no row to train on: check pretokenize.py's "
                        "output")
    all_steps = epoch_steps * settings.num_epochs
    plan.epochs, plan.world_size = settings.num_epochs, world
    plan.total_steps = min(all_steps, settings.max_steps or all_steps)
    log(f"plan: {plan.total_steps} optimizer steps, {settings.num_epochs} epoch(s) over "
        f"{len(plan.shards)} shards ({', '.join(str(shard['steps']) for shard in plan.shards)} "
        f"steps each)" + (f", capped by MAX_STEPS from {all_steps}" if plan.total_steps < all_steps else ""))
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
    for epoch in range(plan.epochs or 1):
        for index, shard in enumerate(plan.shards):
            found.append((epoch, index, step, shard["steps"]))
            step += shard["steps"]
    return found


def position(plan, step):
    """(unit number, its optimizer steps already done) after `step` steps of the run."""
    for number, (_, _, start, steps) in enumerate(units(plan)):
        if step < start + steps:
            return number, step - start
    return len(units(plan)), 0


def last_trained(plan):
    """The shard of the last unit that trained."""
    return max(index for _, index, start, steps in units(plan) if steps and start < plan.total_steps)


def prepared_shards(settings, data_prefix, data, plan, first, work, ranks):
    """(unit number, prepared sequences, seconds waited) for the plan's units from `first` on.

    Each node's first process downloads a shard's parts and prepares them once, one unit ahead,
    in a process of its own (prepare_shard: the work grows with the shard and must not slow
    training); all the node's processes read the prepared sequences from its disk. A shard's
    files go once no later unit needs them next; the disk holds two shards at most."""
    import multiprocessing

    from datasets import Dataset, concatenate_datasets

    todo = [(number, unit) for number, unit in enumerate(units(plan))  # (not past MAX_STEPS)
            if number >= first and unit[2] < plan.total_steps]
    leader = ranks.local_rank == 0

    def folder(unit):
        return os.path.join(work.shards, str(unit[1]))

    def start(unit):
        if not leader or os.path.exists(os.path.join(folder(unit), "ready.json")):
            return None
        return pool.submit(prepare_shard, settings, data_prefix, data["shards"][unit[1]], folder(unit))

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent) as pool:
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


def prepare_shard(settings, prefix, entry, folder):
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
    rows = prepare(rows.select_columns(["input_ids", "labels"]), settings.packing, settings.max_seq_length)
    files = []
    for k, cache in enumerate(rows.cache_files):
        files.append(f"prepared-{k}.arrow")
        os.replace(cache["filename"], os.path.join(folder, files[-1]))
    shutil.rmtree(os.path.join(folder, "cache"))
    write_json_atomically(os.path.join(folder, "ready.json"), {"files": files, "sequences": len(rows)})
    log(f"prepared {entry['path']}: {len(rows)} sequences, for this node's processes")
