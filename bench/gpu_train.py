"""Benchmark: training tokens/s and peak GPU memory of dotrain.py's trainer, unsloth vs peft,
packed vs padded, on the true Qwen2.5-0.5B shape with random weights.

    .venv/bin/python bench/gpu_train.py [--steps N] [--warmup N] [--rows N] [--profile]

Builds a Qwen2 model from FIXTURES_DIR/tokenizers/qwen2.5-0.5b/config.json (hidden 896, 24
layers, vocabulary 151936) with random bf16 weights, saved with the real tokenizer as a
published model is. The data are FineTome-like token lengths (lognormal, median 600 tokens,
mean about 830, cut at MAX_SEQ_LENGTH) of random token ids, the last ~65% of each row trained.
Each configuration runs in its own process (unsloth patches transformers when imported) through
dotrain.py's own load_for_training and make_trainer with the step's defaults (LoRA r 16 on the
seven projections, batch 2, accumulation 4, MAX_SEQ_LENGTH 4096, adamw_8bit when bitsandbytes
is there). Tokens/s counts real (non-padding) tokens over the steps after the warmup.
With --profile, torch.profiler records two more steps after the measured ones (so the figures
stay unprofiled): the GPU's busy share of their time and the operators that take the most GPU
and CPU time, to tell a step bound by the GPU's work from one that waits on the host.
Results go to bench/results/gpu_train.json. Needs a CUDA GPU; without one it says so and stops.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = Path(os.environ.get("FIXTURES_DIR", ROOT.parent / "shared" / "fixtures"))
SHAPE = FIXTURES_DIR / "tokenizers" / "qwen2.5-0.5b"
RESULTS = ROOT / "bench" / "results" / "gpu_train.json"
CONFIGS = [("unsloth", True), ("peft", True), ("unsloth", False), ("peft", False)]
# Dense bf16 matrix peak by GPU name, from the vendors' datasheets (FLOP/s).
DENSE_BF16_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.1e12,
                   "L4": 121e12}
FINETOME_TOKENS = 84_800_000
MAX_SEQ_LENGTH = 4096
PROFILED_STEPS = 2
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "unsloth", "unsloth_zoo",
            "bitsandbytes", "datasets")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps measured (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before measuring (default 3)")
    parser.add_argument("--rows", type=int, default=1500, help="synthetic rows (default 1500; "
                        "enough for the steps when padded)")
    parser.add_argument("--profile", action="store_true", help="profile two steps after the measured ones")
    parser.add_argument("--timeout", type=int, default=100, help="seconds per configuration (default 100)")
    parser.add_argument("--output", default=str(RESULTS), help="where the results go")
    parser.add_argument("--configs", default=",".join(f"{b}_{'packed' if p else 'padded'}" for b, p in CONFIGS),
                        help="which configurations, in this order (default: all)")
    parser.add_argument("--one", nargs=3, metavar=("BACKEND", "PACKING", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        backend, packing, work = args.one
        print(json.dumps(measure(backend, packing == "1", Path(work), args.steps, args.warmup,
                                 args.profile)))
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: bench/gpu_train.py needs a CUDA GPU and this machine has none: run it on "
                 "the GPU node (e.g. .venv/bin/python bench/gpu_train.py there)")
    if not (SHAPE / "config.json").exists():
        sys.exit(f"error: {SHAPE}/config.json is absent: set FIXTURES_DIR to the shared fixtures")
    has_unsloth = _installed("unsloth")
    started = time.time()
    gpu = torch.cuda.get_device_name(0)
    peak = next((flops for name, flops in DENSE_BF16_PEAK.items() if name in gpu), None)
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as work:
        work = Path(work)
        matmul_params = make_model(work / "model")
        rows = make_rows(work / "rows.parquet", args.rows)
        runs = {}
        for name in args.configs.split(","):
            backend, packing = name.split("_")[0], name.endswith("_packed")
            if backend == "unsloth" and not has_unsloth:
                runs[name] = {"skipped": "unsloth is not installed"}
                continue
            runs[name] = run_one(backend, packing, work, args)
            if "tokens_per_second" in runs[name]:
                runs[name].update(utilization(runs[name]["tokens_per_second"], matmul_params, peak))
            print(f"{name}: {json.dumps(runs[name])}", flush=True)
    result = {
        "benchmark": "gpu_train", "command": " ".join(["bench/gpu_train.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"gpu": torch.cuda.get_device_name(0), "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {name: _version(name) for name in PACKAGES},
        "model": "Qwen2.5-0.5B shape (fixtures config.json), random bf16 weights",
        "flops": {"matmul_params": matmul_params, "dense_bf16_peak": peak,
                  "mfu": "tokens/s x 4 x matmul_params / peak: a frozen-base LoRA step costs a "
                         "forward (2 x params per token) and a backward through the activations only "
                         "(2 x params); attention scores and the LoRA matrices left out",
                  "hfu": "the same with the forward that gradient checkpointing recomputes: 6 x params",
                  "finetome_epoch": f"{FINETOME_TOKENS:,} tokens (100,000 rows of ~848 tokens, the "
                                    "Qwen2.5 tokenizer on FineTome-like rows) / tokens/s"},
        "data": rows, "settings": {"lora_r": 16, "batch_size": 2, "grad_accum": 4,
                                   "max_seq_length": MAX_SEQ_LENGTH, "steps": args.steps,
                                   "warmup_steps_excluded": args.warmup,
                                   "profiled_steps": PROFILED_STEPS if args.profile else 0},
        "runs": runs, "seconds": round(time.time() - started, 1),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results in {output}")


def utilization(tokens_per_second, matmul_params, peak):
    """Model (and hardware) FLOPs utilization, and the minutes one FineTome-100k epoch would take."""
    return {"mfu": peak and round(tokens_per_second * 4 * matmul_params / peak, 4),
            "hfu": peak and round(tokens_per_second * 6 * matmul_params / peak, 4),
            "finetome_epoch_minutes": round(FINETOME_TOKENS / tokens_per_second / 60, 1)}


def _installed(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def make_model(out):
    """The 0.5B architecture with random weights and the real tokenizer, saved as published."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(SHAPE)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(SHAPE / name, out / name)
    # What the matrix products of a token multiply by: every weight but the input embedding,
    # plus the output layer's (the embedding again when tied).
    embedding = model.get_input_embeddings().weight
    matmul_params = sum(p.numel() for p in model.parameters() if p is not embedding) \
        + model.get_output_embeddings().weight.numel() * model.config.tie_word_embeddings
    del model
    torch.cuda.empty_cache()
    return matmul_params


def make_rows(path, count):
    """FineTome-like rows: lognormal lengths, random ids, the answer (last ~65%) trained."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(600), 0.8, count), 32, MAX_SEQ_LENGTH).astype(int)
    ids, labels = [], []
    for length in lengths:
        row = rng.integers(0, 151_000, length).tolist()
        prompt = int(length * 0.35)
        ids.append(row)
        labels.append([-100] * prompt + row[prompt:])
    pq.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                             "labels": pa.array(labels, pa.list_(pa.int32()))}), path)
    return {"rows": count, "tokens": int(lengths.sum()), "mean_length": round(float(lengths.mean()), 1),
            "max_length": int(lengths.max()), "length_distribution": "lognormal(log 600, 0.8), "
            f"cut to 32..{MAX_SEQ_LENGTH}"}


def run_one(backend, packing, work, args):
    command = [sys.executable, __file__, "--steps", str(args.steps), "--warmup", str(args.warmup),
               *(["--profile"] if args.profile else []), "--one", backend, "1" if packing else "0", str(work)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.timeout} s"}
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(backend_name, packing, work, steps, warmup, profile=False):
    """One configuration, in this process: tokens/s over `steps` steps after `warmup`, then
    with `profile` a profile of PROFILED_STEPS more."""
    sys.path.insert(0, str(ROOT))
    import dotrain  # noqa: E402 - after sys.path
    from training.processes import Ranks
    from training.shards import Plan, prepare

    settings = SimpleNamespace(
        train_backend=backend_name, train_device="cuda", load_in_4bit=False, seed=3407, lora_r=16,
        gradient_checkpointing="auto", lora_alpha=16, lora_dropout=0.0, lora_targets="all-linear",
        learning_rate=2e-4,
        lr_scheduler="linear", batch_size=2, grad_accum=4, warmup_steps=5, weight_decay=0.01,
        max_seq_length=MAX_SEQ_LENGTH, packing=packing, save_steps=10**9, logging_steps=10**9,
        report_to="none")
    ranks = Ranks()
    backend = dotrain.choose_backend(settings, ranks, Plan({}))  # imports unsloth first when asked for
    import datasets
    import torch
    from transformers import TrainerCallback

    model, tokenizer = dotrain.load_for_training(settings, backend, str(work / "model"), ranks)
    dataset = datasets.Dataset.from_parquet(str(work / "rows.parquet"),
                                            cache_dir=str(work / f"cache-{backend_name}-{packing}"))
    dataset = prepare(dataset, packing, MAX_SEQ_LENGTH)  # as dotrain.py prepares a shard
    clock = {}
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA])
    profiled = (warmup + steps, warmup + steps + PROFILED_STEPS) if profile else ()

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + steps, *profiled):
                torch.cuda.synchronize()
                clock[state.global_step] = (time.perf_counter(), state.num_input_tokens_seen)
            if state.global_step in profiled:
                (profiler.start if state.global_step == profiled[0] else profiler.stop)()

    out = SimpleNamespace(trainer=str(work / f"trainer-{backend_name}-{packing}"))
    trainer = dotrain.make_trainer(settings, backend, model, tokenizer, dataset, out,
                                   max_steps=warmup + steps + PROFILED_STEPS * profile, callbacks=[Clock()])
    trainer.shard, trainer.seconds = 0, time.perf_counter
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (start, tokens_before), (end, tokens_after) = clock[warmup], clock[warmup + steps]
    result = {"backend": backend.name, "packing": packing, "optim": backend.optim,
              "precision": backend.dtype,
              "tokens_per_second": round((tokens_after - tokens_before) / (end - start)),
              "seconds_per_step": round((end - start) / steps, 3),
              "tokens_per_step": round((tokens_after - tokens_before) / steps),
              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
    if profile:
        result["profile"] = summary(profiler, clock[profiled[1]][0] - clock[profiled[0]][0])
    return result


def summary(profiler, seconds, top=12):
    """A profile in a few figures: the profiled steps' seconds each, the share of them the GPU
    was busy (its kernels' time over the wall time), the kernels with the most GPU time and the
    operators with the most self time on the CPU (milliseconds a step)."""
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    operators = [e for e in events if e.device_type == DeviceType.CPU]

    def ops(chosen, time_of):
        return [{"op": e.key[:120], "calls_per_step": e.count // PROFILED_STEPS,
                 "ms_per_step": round(time_of(e) / 1e3 / PROFILED_STEPS, 2)}
                for e in sorted(chosen, key=time_of, reverse=True)[:top]]

    gpu_seconds = sum(e.self_device_time_total for e in kernels) / 1e6
    return {"seconds_per_step": round(seconds / PROFILED_STEPS, 3),
            "gpu_busy_fraction": round(gpu_seconds / seconds, 3),
            "top_gpu_kernels": ops(kernels, lambda e: e.self_device_time_total),
            "top_cpu_operators": ops(operators, lambda e: e.self_cpu_time_total)}


if __name__ == "__main__":
    main()
