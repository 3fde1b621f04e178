"""The training processes: one, or torchrun's (several GPUs, several nodes) training one model
with DDP. Each process's place among them, what rank 0 decides for all, each rank's batches of a
shard (every sequence once) and the check that they shared it exactly, and a node's scratch disk.
"""

import contextlib
import math
import os
import shutil
import threading
import time

from common import NOT_TRAINED, UserError


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


def rank_batches(sequences, batch_size, ranks):
    """This rank's batches of a shard's `sequences`: batch k goes to rank k % world. A rank short
    of a batch gets [sequences], a batch with nothing to learn from (RankView), so that every
    rank makes the same steps."""
    batches = [list(range(start, min(start + batch_size, sequences)))
               for start in range(0, sequences, batch_size)]
    mine = batches[ranks.rank::ranks.world]
    return mine + [[sequences]] * (math.ceil(len(batches) / ranks.world) - len(mine))


def rank_sampler(sequences, batch_size, ranks):
    """rank_batches() as a BatchRebalanceSampler: the Trainer takes it as rank-aware and does not
    let accelerate split it again."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    class RankBatches(BatchRebalanceSampler):
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return iter(self.batches)

        def __len__(self):
            return len(self.batches)

    return RankBatches(rank_batches(sequences, batch_size, ranks))


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
        empty["labels"] = [NOT_TRAINED]
        if "seq_lengths" in row:
            empty["seq_lengths"] = [1]
        return empty


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
