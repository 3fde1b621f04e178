"""Benchmark: training tokens/s, MFU and peak GPU memory of dotrain.py's trainer, unsloth vs
peft, packed, on the Qwen2.5-0.5B and Qwen2.5-7B shapes with random weights (the 7B also on a
4-bit base).

    .venv/bin/python bench/gpu_train.py [--configs NAMES] [--budget SECONDS] [--rows N]
    .venv/bin/python bench/gpu_train.py --smoke      # every line on this CPU, tiny shapes

The shapes: Qwen2.5-0.5B from FIXTURES_DIR/tokenizers/qwen2.5-0.5b/config.json, Qwen2.5-7B from
its published config's sizes (QWEN_7B below); random bf16 weights made on the GPU and saved
with the real Qwen2.5 tokenizer, as a published model is (nothing is downloaded). The data are
FineTome-like token lengths (lognormal, median 600 tokens, mean about 830, cut at 4,096) of
random ids, the last ~65% of each row trained, packed as dotrain.py packs a shard.

Each configuration runs in a process of its own (unsloth patches transformers when imported),
through dotrain.py's own choose_backend, load_for_training and make_trainer, at the step's
defaults (LoRA r 16 on the seven projections, batch 2 of up to 4,096 tokens, adamw_8bit with
bitsandbytes; accumulation 4 on the 0.5B, 1 on the 7B to keep its steps short; the per-token
figures do not depend on it). Its steps: 3 warm-up, 10 measured, 1 profiled (torch.profiler:
the GPU's busy share, the costliest kernels and host operators), then 2 warm-up and 5 measured
steps of sequences packed to a quarter of the length. Figures are medians over the measured
steps: tokens/s counts real (non-padding) tokens; MFU is tokens/s x the model FLOPs of a token
(training.speed.model_flops_per_token) / the GPU's dense peak in the run's precision (TRL's
table, trl.trainer.utils.get_peak_flops); the fixed part of a step is the time at zero tokens
on the line through the two step sizes' medians; distinct shapes are the batch shapes the
trainer met; the FineTome-100k epoch is 84.8M tokens at that rate. Before
training on the 0.5B shape, two checks on the first batch: its packed loss against its rows'
run one by one (no row sees another), and for peft TRL's fused loss against transformers' loss
over the full logits.

Configurations run in the order given while --budget seconds last (model building included),
each within its shape's time limit; the others are recorded as skipped. Results go to
bench/results/gpu_train.json (--smoke: a temporary file). Needs a CUDA GPU, but for --smoke.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from training.speed import attended, matmul_params, mfu, model_flops_per_token  # noqa: E402

FIXTURES_DIR = Path(os.environ.get("FIXTURES_DIR", ROOT.parent / "shared" / "fixtures"))
SHAPE = FIXTURES_DIR / "tokenizers" / "qwen2.5-0.5b"  # the 0.5B config and the Qwen2.5 tokenizer
RESULTS = ROOT / "bench" / "results" / "gpu_train.json"
# Qwen2.5-7B's config.json sizes (the others as the 0.5B's)
QWEN_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "max_window_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
           "tie_word_embeddings": False}
# Tiny stand-ins for --smoke, with demo/synthetic.py's tokenizer
SMOKE_SHAPES = {"0.5b": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2},
                "7b": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}}
CONFIGS = {  # name: (shape, backend, 4-bit base)
    "peft_packed": ("0.5b", "peft", False),
    "unsloth_packed": ("0.5b", "unsloth", False),
    "7b_peft_packed": ("7b", "peft", False),
    "7b_unsloth_packed": ("7b", "unsloth", False),
    "7b_unsloth_packed_4bit": ("7b", "unsloth", True),
    "7b_peft_packed_4bit": ("7b", "peft", True),
}
GRAD_ACCUM = {"0.5b": 4, "7b": 1}
TIME_LIMIT = {"0.5b": 150, "7b": 180}  # seconds a configuration may take (--smoke: SMOKE_TIME_LIMIT)
SMOKE_TIME_LIMIT = 300
STEPS = {"warmup": 3, "measured": 10, "profiled": 1, "short_warmup": 2, "short": 5}
SMOKE_STEPS = {"warmup": 1, "measured": 2, "profiled": 1, "short_warmup": 1, "short": 1}
MAX_SEQ_LENGTH, SMOKE_MAX_SEQ_LENGTH = 4096, 256
FINETOME_TOKENS = 84_800_000
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "unsloth", "unsloth_zoo",
            "bitsandbytes", "triton", "xformers", "datasets")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"configurations, in this order (default: all: {', '.join(CONFIGS)})")
    parser.add_argument("--budget", type=int, default=360, help="seconds for all configurations, "
                        "model building included (default 360)")
    parser.add_argument("--rows", type=int, default=None, help="synthetic rows (default 1500; --smoke 300)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and steps, on the CPU too")
    parser.add_argument("--output", default=None, help="where the results go (default: "
                        f"{RESULTS.relative_to(ROOT)}; --smoke: a temporary file)")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], Path(args.one[1]), args.smoke)))
        return
    names = args.configs.split(",")
    if unknown := [name for name in names if name not in CONFIGS]:
        sys.exit(f"error: unknown configurations {', '.join(unknown)}: choose among {', '.join(CONFIGS)}")
    import torch

    cuda = torch.cuda.is_available()
    if not (cuda or args.smoke):
        sys.exit("error: bench/gpu_train.py needs a CUDA GPU and this machine has none: run it on "
                 "the GPU node, or with --smoke here")
    if not args.smoke and not (SHAPE / "config.json").exists():
        sys.exit(f"error: {SHAPE}/config.json is absent: set FIXTURES_DIR to the shared fixtures")
    smoke_output = Path(tempfile.gettempdir()) / "gpu_train_smoke.json"
    output = Path(args.output or (smoke_output if args.smoke else RESULTS))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as work:
        work = Path(work)
        if args.smoke:
            sys.path.insert(0, str(ROOT / "demo"))
            from synthetic import make_tokenizer

            make_tokenizer(work / "tokenizer")
        data = make_rows(work / "rows.parquet", args.rows or (300 if args.smoke else 1500), args.smoke)
        shapes, runs = {}, {}
        for name in names:
            shape, backend, four_bit = CONFIGS[name]
            left = args.budget - (time.time() - started)
            if reason := unavailable(backend, four_bit, cuda):
                runs[name] = {"skipped": reason}
            elif left < 30:
                runs[name] = {"skipped": f"the budget of {args.budget} s was spent"}
            else:
                if shape not in shapes:
                    shapes[shape] = make_model(work / shape, shape, args.smoke, work / "tokenizer")
                    left = args.budget - (time.time() - started)
                limit = SMOKE_TIME_LIMIT if args.smoke else TIME_LIMIT[shape]
                runs[name] = run_one(name, work, min(limit, int(left)), args.smoke)
            print(f"{name}: {json.dumps(runs[name])}", flush=True)
    result = {
        "benchmark": "gpu_train", "command": " ".join(["bench/gpu_train.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": args.smoke,
        "machine": {"gpu": torch.cuda.get_device_name(0) if cuda else None,
                    "platform": platform.platform(), "python": platform.python_version()},
        "versions": {name: _version(name) for name in PACKAGES},
        "shapes": shapes,
        "flops": {"mfu": "tokens/s x model_flops_per_token / dense peak of the GPU in the run's "
                         "precision (trl.trainer.utils.get_peak_flops; model_flops_per_token from "
                         "training.speed: 4 x matmul parameters + attention to the rows' own "
                         "positions; gradient checkpointing's recomputation and the LoRA matrices "
                         "left out)",
                  "finetome_epoch": f"{FINETOME_TOKENS:,} tokens (100,000 rows of ~848 tokens, the "
                                    "Qwen2.5 tokenizer on FineTome-like rows) / tokens/s"},
        "data": data,
        "settings": {"lora_r": 16, "batch_size": 2, "grad_accum": GRAD_ACCUM,
                     "max_seq_length": SMOKE_MAX_SEQ_LENGTH if args.smoke else MAX_SEQ_LENGTH,
                     "steps": SMOKE_STEPS if args.smoke else STEPS, "budget_s": args.budget},
        "runs": runs, "seconds": round(time.time() - started, 1),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results in {output}")


def unavailable(backend, four_bit, cuda):
    """Why a configuration cannot run here, or None."""
    if backend == "unsloth" and not cuda:
        return "unsloth needs a CUDA GPU"
    if backend == "unsloth" and not _installed("unsloth"):
        return "unsloth is not installed"
    if four_bit and not (cuda and _installed("bitsandbytes")):
        return "a 4-bit base needs a CUDA GPU and bitsandbytes"
    return None


def _installed(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def shape_config(shape, smoke):
    """A shape's config.json, as a dict."""
    if smoke:
        return {"model_type": "qwen2", "vocab_size": 512, "max_position_embeddings": 4096,
                "tie_word_embeddings": True, **SMOKE_SHAPES[shape]}
    return {**json.loads((SHAPE / "config.json").read_text()), **(QWEN_7B if shape == "7b" else {})}


def make_model(out, shape="0.5b", smoke=False, smoke_tokenizer=None):
    """A shape's model with random bf16 weights (made on the GPU when there is one) and its
    tokenizer, saved as published; what it is, for the results."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    began = time.time()
    config = shape_config(shape, smoke)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    tokenizer = smoke_tokenizer if smoke else SHAPE
    for path in tokenizer.iterdir():
        if path.name != "config.json" and path.is_file():
            shutil.copy(path, out / path.name)
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size")
    return {"config": {key: config[key] for key in sizes},
            "params": matmul_params(config), "build_seconds": round(time.time() - began, 1)}


def make_rows(path, count, smoke):
    """FineTome-like rows: lognormal lengths, random ids, the answer (last ~65%) trained."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    longest, vocab = (SMOKE_MAX_SEQ_LENGTH, 500) if smoke else (MAX_SEQ_LENGTH, 151_000)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(600 * longest / 4096), 0.8, count), 32 * longest // 4096, longest)
    lengths = lengths.astype(int)
    ids, labels = [], []
    for length in lengths:
        row = rng.integers(1, vocab, length).tolist()
        prompt = int(length * 0.35)
        ids.append(row)
        labels.append([-100] * prompt + row[prompt:])
    pq.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                             "labels": pa.array(labels, pa.list_(pa.int32()))}), path)
    return {"rows": count, "tokens": int(lengths.sum()), "mean_length": round(float(lengths.mean()), 1),
            "max_length": int(lengths.max()), "attended": round(attended(lengths), 1),
            "length_distribution": f"lognormal(log {600 * longest // 4096}, 0.8), cut to "
                                   f"{32 * longest // 4096}..{longest}"}


def run_one(name, work, limit, smoke):
    command = [sys.executable, __file__, *(["--smoke"] if smoke else []), "--one", name, str(work)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                   "UNSLOTH_DISABLE_STATISTICS": "1"})
    except subprocess.TimeoutExpired:
        return {"error": f"over its {limit} s"}
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-3:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(name, work, smoke):
    """One configuration, in this process (see the module's docstring)."""
    import dotrain
    from training.attention import avoid_cudnn_attention
    from training.processes import Ranks
    from training.shards import Plan, prepare

    shape, backend_name, four_bit = CONFIGS[name]
    steps = SMOKE_STEPS if smoke else STEPS
    longest = SMOKE_MAX_SEQ_LENGTH if smoke else MAX_SEQ_LENGTH
    settings = SimpleNamespace(
        train_backend=backend_name, train_device="auto", load_in_4bit=four_bit, seed=3407, lora_r=16,
        gradient_checkpointing="auto", lora_alpha=16, lora_dropout=0.0, lora_targets="all-linear",
        learning_rate=2e-4, lr_scheduler="linear", batch_size=2, grad_accum=GRAD_ACCUM[shape],
        warmup_steps=5, weight_decay=0.01, max_seq_length=longest, packing=True, save_steps=10**9,
        logging_steps=10**9,
        report_to="none")
    ranks = Ranks()
    model_dir = work / shape
    avoid_cudnn_attention()  # as dotrain.py's processes do
    backend = dotrain.choose_backend(settings, ranks, Plan({}), str(model_dir))  # unsloth first
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl.trainer.utils import get_peak_flops

    cuda = torch.cuda.is_available()
    began = time.perf_counter()
    model, tokenizer = dotrain.load_for_training(settings, backend, str(model_dir), ranks)
    load_seconds = time.perf_counter() - began
    rows = datasets.Dataset.from_parquet(str(work / "rows.parquet"), cache_dir=str(work / f"cache-{name}"))
    per_step = settings.batch_size * settings.grad_accum
    full = prepare(rows, True, longest)  # as dotrain.py prepares a shard
    short = prepare(rows.filter(lambda row: len(row["input_ids"]) <= longest // 4), True, longest // 4)
    full_steps = steps["warmup"] + steps["measured"] + steps["profiled"]
    short_steps = steps["short_warmup"] + steps["short"]
    if len(full) < full_steps * per_step or len(short) < short_steps * per_step:
        raise SystemExit(f"too few rows for {full_steps} + {short_steps} steps: raise --rows")
    dataset = datasets.concatenate_datasets([full.select(range(full_steps * per_step)),
                                             short.select(range(short_steps * per_step))])
    profiled = (steps["warmup"] + steps["measured"], full_steps)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  *([torch.profiler.ProfilerActivity.CUDA] if cuda else [])])
    clock = []  # (time, tokens seen) when training began and at the end of every step

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.append((time.perf_counter(), state.num_input_tokens_seen))

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            clock.append((time.perf_counter(), state.num_input_tokens_seen))
            if state.global_step in profiled:
                (profiler.start if state.global_step == profiled[0] else profiler.stop)()

    out = SimpleNamespace(trainer=str(work / f"trainer-{name}"))
    trainer = dotrain.make_trainer(settings, backend, model, tokenizer, dataset, out,
                                   max_steps=full_steps + short_steps, callbacks=[Clock()])
    trainer.shard, trainer.seconds = 0, time.perf_counter
    checked = checks(trainer, model, backend) if shape == "0.5b" else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = [b[0] - a[0] for a, b in zip(clock, clock[1:])]  # of each step
    tokens = [b[1] - a[1] for a, b in zip(clock, clock[1:])]
    phase, at = {}, 0
    for part, count in steps.items():  # the steps of each phase
        phase[part], at = slice(at, at + count), at + count
    rate = statistics.median(n / s for n, s in zip(tokens[phase["measured"]], seconds[phase["measured"]]))
    step_seconds, step_tokens = (statistics.median(x[phase["measured"]]) for x in (seconds, tokens))
    short_seconds, short_tokens = (statistics.median(x[phase["short"]]) for x in (seconds, tokens))
    flops = model_flops_per_token(model.config.to_dict(), attended([len(ids) for ids in rows["input_ids"]]))
    peak = get_peak_flops(torch.cuda.get_device_name(), backend.dtype) if cuda else None
    return {"shape": shape, "params": matmul_params(model.config.to_dict()), "backend": backend.name,
            "load_in_4bit": four_bit, "packing": True, "attention": backend.attention, "optim": backend.optim,
            "precision": backend.dtype, "batch_size": settings.batch_size, "grad_accum": settings.grad_accum,
            "tokens_per_second": round(rate), "mfu": mfu(rate, flops, peak),
            "model_flops_per_token": flops,
            "seconds_per_step": round(step_seconds, 3), "tokens_per_step": round(step_tokens),
            "short_step": {"seconds": round(short_seconds, 3), "tokens": round(short_tokens)},
            "fixed_seconds_per_step": round(step_seconds - (step_seconds - short_seconds) * step_tokens
                                            / max(step_tokens - short_tokens, 1), 3),
            "warmup_seconds": round(sum(seconds[phase["warmup"]]), 1),
            "load_seconds": round(load_seconds, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
            "distinct_shapes": len(trainer.shapes),
            "finetome_epoch_minutes": round(FINETOME_TOKENS / rate / 60, 1),
            "checks": checked, "profile": summary(profiler, sum(seconds[phase["profiled"]]),
                                                  steps["profiled"], cuda)}


def checks(trainer, model, backend):
    """The first batch's loss, packed, against its rows' run one by one (no row sees another:
    the same within bf16's rounding), and for peft TRL's fused loss (the trainer's on CUDA)
    against transformers' over the full logits. Before training, without gradients."""
    import torch
    import transformers

    from training.speed import real_tokens

    try:
        batch = next(iter(trainer.get_train_dataloader()))
        end = int(real_tokens(batch))
        starts = [int(i) for i in (batch["position_ids"][0, :end] == 0).nonzero().flatten()] + [end]
        trained = int((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad():
            packed = trainer.compute_loss(model, dict(batch), num_items_in_batch=trained).item()
            alone = sum(trainer.compute_loss(model, {"input_ids": batch["input_ids"][:, a:b],
                                                     "labels": batch["labels"][:, a:b]},
                                             num_items_in_batch=trained).item()
                        for a, b in zip(starts, starts[1:]))
            result = {"rows": len(starts) - 1, "packed_loss": round(packed, 5),
                      "rows_alone_loss": round(alone, 5)}
            if backend.name == "peft":
                full = transformers.Trainer.compute_loss(trainer, model, {**batch, "use_cache": False},
                                                         num_items_in_batch=trained)
                result["full_logits_loss"] = round(full.item(), 5)
        return result
    except Exception as error:  # a check that fails to run is reported, the figures still measured
        return {"error": f"{type(error).__name__}: {error}"[:300]}


def summary(profiler, seconds, steps, cuda, top=12):
    """A profile in a few figures: the profiled steps' seconds each, the share of them the GPU
    was busy (its kernels' time over the wall time), the kernels with the most GPU time and the
    operators with the most self time on the CPU (milliseconds a step)."""
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    operators = [e for e in events if e.device_type == DeviceType.CPU]

    def ops(chosen, time_of):
        return [{"op": e.key[:120], "calls_per_step": e.count // steps,
                 "ms_per_step": round(time_of(e) / 1e3 / steps, 2)}
                for e in sorted(chosen, key=time_of, reverse=True)[:top]]

    gpu_seconds = sum(e.self_device_time_total for e in kernels) / 1e6
    return {"seconds_per_step": round(seconds / steps, 3),
            "gpu_busy_fraction": round(gpu_seconds / seconds, 3) if cuda else None,
            "top_gpu_kernels": ops(kernels, lambda e: e.self_device_time_total),
            "top_cpu_operators": ops(operators, lambda e: e.self_cpu_time_total)}


if __name__ == "__main__":
    main()
