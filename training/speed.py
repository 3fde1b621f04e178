"""How fast a run trains: the model FLOPs of a token and the run's model FLOPs utilization (MFU)
on the GPUs' peak arithmetic (TRL's table), batch lengths rounded up so that a run meets few
shapes, the real (non-padding) tokens of a batch, what each run reports of its speed, and the
backend that trained faster in the GPU benchmark at a model's size (TRAIN_BACKEND=auto chooses
by it).
"""

import json
import math
import os
import statistics

from training.fit import model_shape

SHAPES = 16  # a run's batches take at most this many lengths
MEASURED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results",
                        "gpu_train.json")
COVERS = 2.0  # a measurement speaks for models within this factor of its size


def read_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def matmul_params(config):
    """The weights a token is multiplied by (a decoder's config.json, a multimodal model's
    text_config): the projections of every block (q, k, v, o; gate, up, down) and the output
    layer, counted even when tied to the input embedding, whose lookup is no product; biases and
    norms left out. None when the config does not give the sizes (training.fit.model_shape)."""
    shape = model_shape(config or {})
    if shape is None:
        return None
    attention = 2 * shape.hidden * shape.heads * shape.head + 2 * shape.hidden * shape.kv_heads * shape.head
    return shape.layers * (attention + 3 * shape.hidden * shape.mlp) + shape.vocab * shape.hidden


def model_flops_per_token(config, context):
    """Model FLOPs of training on one token: a LoRA step on a frozen base, a token attending to
    `context` positions on average (its own row's, up to itself).

        4 x matmul_params + 12 x layers x heads x head_dim x context

    A product by an m x n weight costs 2mn FLOPs a token (a multiply and an add each). The forward
    pass costs 2 x matmul_params. The backward pass computes the gradient of each product's input
    (another 2mn) but not of its weight, which is frozen: 2 x matmul_params more, so 4 x in all.
    Attention multiplies the query by each attended key and the scores by each attended value:
    2 products of head_dim per head and position, 4 x heads x head_dim x context FLOPs a layer
    forward; its backward computes the gradients of queries, keys and values (all needed: LoRA
    adapts q, k and v, and the layers below), twice the forward: 12 x in all. `context`: the
    mean number of positions a token attends to (attended: (s + 1) / 2 for rows of s tokens).

    Left out: the forward that gradient checkpointing recomputes (hardware, not model, FLOPs),
    the LoRA matrices (6r(m + n) a token for each adapted m x n weight: about 4% more at r 16 on
    Qwen2.5), norms, activations, softmax and the optimizer. None when the config does not give
    the sizes, or `context` is None."""
    shape = model_shape(config or {})
    if shape is None or context is None:
        return None
    return 4 * matmul_params(config) + 12 * shape.layers * shape.heads * shape.head * context


def attended_positions(lengths):
    """The positions the tokens of rows of these lengths attend to, all together: a token attends
    to its own row's, up to itself, so a row of l tokens to l(l + 1) / 2."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    return int((lengths * (lengths + 1)).sum() // 2)


def attended(lengths):
    """The mean number of positions a token of rows of these lengths attends to."""
    return attended_positions(lengths) / sum(lengths)


def mfu(tokens_per_second, flops_per_token, peak, gpus=1):
    """Model FLOPs utilization: the share of the GPUs' peak arithmetic the run's tokens needed;
    None without a peak, a speed or the FLOPs of a token."""
    if not (peak and tokens_per_second and flops_per_token):
        return None
    return round(tokens_per_second * flops_per_token / (peak * gpus), 4)


def length_multiple(settings):
    """Batches are padded at their end to a multiple of this many tokens (TRL's collator:
    pad_to_multiple_of), so that a run meets at most SHAPES lengths: a new length can cost a
    compilation or a kernel plan. The smallest divisor of the longest batch (BATCH_SIZE rows
    flattened into one when packing) of at least 64 tokens and 1/SHAPES of it, a multiple of 8
    where one is: padding never makes a batch longer than the longest (unsloth cuts a batch
    longer than MAX_SEQ_LENGTH, but not its labels)."""
    longest = settings.max_seq_length * (settings.batch_size if settings.packing else 1)
    least = max(64, math.ceil(longest / SHAPES))
    divisors = [d for d in range(least, longest + 1) if longest % d == 0]
    return next((d for d in divisors if d % 8 == 0), divisors[0]) if divisors else longest


def real_tokens(batch):
    """The tokens of a collated batch that are not padding, as a tensor on its device.

    A padded batch has an attention mask. A packed (padding-free) batch is one row of position
    ids that restart at 0 with each of its rows, and the padding appended to it has position 0:
    the real tokens end at the last position that is not 0 (a row's first token is never trained,
    so every row has at least two)."""
    import torch

    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    positions = batch["position_ids"]
    index = torch.arange(1, positions.shape[-1] + 1, device=positions.device)
    return ((positions != 0) * index).amax(dim=-1).sum()


def describe(config, backend, gpus, plan):
    """How a run's processes train, written into its trainer log (recorder) for metrics.json:
    the attention, the GPU and its dense peak FLOP/s in the run's precision (TRL's table,
    trl.trainer.utils.get_peak_flops: None for a GPU it does not list, a V100 among them), and
    the model FLOPs of a token attending to the mean of the plan's rows (attended: the positions
    make_plan counted in each shard; a plan made before it counted them gives no FLOPs)."""
    import torch
    from trl.trainer.utils import get_peak_flops

    gpu = torch.cuda.get_device_name() if backend.device == "cuda" else None
    positions = [shard.get("attended") for shard in plan.shards]
    tokens = sum(shard["tokens"] for shard in plan.shards)
    context = sum(positions) / tokens if tokens and None not in positions else None
    return {"attention": backend.attention, "gpu": gpu, "gpus": gpus,
            "peak_flops": get_peak_flops(gpu, backend.dtype) if gpu else None,
            "model_flops_per_token": model_flops_per_token(config, context)}


def recorder(entry):
    """A TrainerCallback that writes `entry` (describe) into the trainer's log history when
    training starts, unless the log's last such entry says the same; the checkpoints carry it."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            last = next((e["speed"] for e in reversed(state.log_history) if "speed" in e), None)
            if last != entry:
                state.log_history.append({"step": state.global_step, "speed": entry})

    return Record()


def summary(steps, entry):
    """metrics.json's `speed`: the median tokens/s of the logged steps (each over the steps since
    the log before it), the model FLOPs of a token and the MFU they make on the GPUs' peak, the
    most batch shapes one training process met, and how the run trained (describe)."""
    rates = [step["tokens_per_second"] for step in steps if step.get("tokens_per_second")]
    tokens_per_second = round(statistics.median(rates), 1) if rates else None
    entry = entry or {}
    return {"tokens_per_second": tokens_per_second,
            "model_flops_per_token": entry.get("model_flops_per_token"),
            "mfu": mfu(tokens_per_second, entry.get("model_flops_per_token"), entry.get("peak_flops"),
                       entry.get("gpus") or 1),
            "distinct_shapes": max((step.get("shapes") or 0 for step in steps), default=0),
            **{key: entry.get(key) for key in ("attention", "gpu", "gpus", "peak_flops")}}


def measured_faster(config, load_in_4bit, packing, capability, results=MEASURED):
    """(the backend that trained more tokens a second on one GPU at this model's size, why), from
    the GPU benchmark's results (bench/gpu_train.py): the measured size nearest to this model's
    matmul_params within a factor COVERS, with the same LOAD_IN_4BIT and PACKING, both backends
    measured. (None, why) when no measurement covers it, and on a GPU of compute capability
    (major, minor) below 8.0, where both backends take other paths than on the benchmark's GPU
    (float16 with loss scaling; SDPA with a dense mask, or xformers, for attention)."""
    if capability < (8, 0):
        return None, (f"the GPU benchmark measured a GPU of compute capability 8.0 or more and this one "
                      f"is {capability[0]}.{capability[1]}, where training runs in float16 with other "
                      "attention kernels: its figures do not decide here")
    size = matmul_params(config)
    if size is None:
        return None, "config.json gives no sizes"
    try:
        with open(results) as f:
            measured = json.load(f)
    except (OSError, ValueError):
        return None, f"no GPU training measurements ({os.path.relpath(results)} is missing or unreadable)"
    runs = [run for run in measured.get("runs", {}).values()
            if run.get("tokens_per_second") and run.get("params") and run.get("packing") == packing
            and bool(run.get("load_in_4bit")) == load_in_4bit
            and max(run["params"], size) / min(run["params"], size) <= COVERS]
    if runs:
        nearest = min(runs, key=lambda run: abs(math.log(run["params"] / size)))["params"]
        speeds = {run["backend"]: run["tokens_per_second"] for run in runs if run["params"] == nearest}
        if len(speeds) == 2:
            faster, slower = sorted(speeds, key=speeds.get, reverse=True)
            return faster, (f"{faster} trained {speeds[faster]:,} tokens/s and {slower} {speeds[slower]:,} "
                            f"at {nearest / 1e9:.2f}B matmul parameters on an {measured['machine']['gpu']} "
                            f"({measured['date'][:10]}, {os.path.relpath(results)})")
    return None, (f"no measurement of both backends within {COVERS:g}x of this model's "
                  f"{size / 1e9:.2f}B matmul parameters{', 4-bit' if load_in_4bit else ''} "
                  f"({os.path.relpath(results)})")
