"""Benchmark: peak host memory of dotrain.py's merge (fused/, with its per-tensor check) and of
its logits check, for a model of 4 weights files and one of 8, each file F MB.

    .venv/bin/python bench/export_memory.py [--file-mb F] [--work-dir DIR] [--output FILE]

Writes a Qwen2-architecture model with random bf16 weights, whole layers per file, as 4 (then
8) safetensors files of about F MB with the Hub's index file, and a rank-16 LoRA adapter on its
seven projections with random, non-zero A and B, as training saves it. Then training.merge.fuse
runs in a fresh child process, and training.export.check_logits in another (3 rows of 32 random
tokens: bf16 matrix products are slow on this CPU, and the activations of 128 would add little), each
measuring its own peak RSS: getrusage(RUSAGE_SELF).ru_maxrss, the kernel's high-water mark,
which includes the ~0.5 GB of importing torch, transformers and peft. On this CPU-only machine
the logits check loads the model in its dtype (bf16): it holds about one model. Targets for the
merge: the 8-file peak within 1.15x of the 4-file peak, and at most 2F + 1 GB. Results go to
bench/results/export_memory.json.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

QWEN2_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "export_memory.json"
GROWTH_TARGET = 1.15  # merge peak with 8 files / with 4 files
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, RANK = 1024, 2816, 16, 8, 16
PACKAGES = ("torch", "transformers", "peft", "safetensors")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file-mb", type=int, default=256, help="F, MB per weights file (default 256)")
    parser.add_argument("--work-dir", help="where the models go (default: a temp dir)")
    parser.add_argument("--output", default=str(RESULTS), help="where the results go "
                        "(default: bench/results/export_memory.json)")
    args = parser.parse_args()
    runs = {}
    for files in (4, 8):
        with tempfile.TemporaryDirectory(prefix="export-memory-", dir=args.work_dir) as work:
            work = Path(work)
            print(f"{files} files of {args.file_mb} MB: writing the model and the adapter ...", flush=True)
            model = child("write", work, files, args.file_mb * 10**6)
            for step in ("merge", "check"):
                print(f"  {step} ...", flush=True)
                runs[f"{step}_{files}_files"] = {**model, **child(step, work)}
                print(f"    peak RSS {runs[f'{step}_{files}_files']['peak_rss_mb']:.0f} MB, "
                      f"{runs[f'{step}_{files}_files']['wall_s']:.1f} s", flush=True)
    report(args, runs)


# ---------------------------------------------------------------- the model and the adapter


def write_model(path, files, file_bytes):
    """A Qwen2 model of `files` weights files of about `file_bytes` each (whole layers; the first
    also holds the embeddings and the final norm), its index, config, tokenizer and generation
    config, and beside it lora/, a LoRA adapter on it."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    sys.path[:0] = [str(ROOT), str(ROOT / "demo")]
    from synthetic import make_tokenizer

    tokenizer = make_tokenizer(path)
    layer_bytes = 2 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN * KV_HEADS // HEADS
                       + 3 * HIDDEN * INTERMEDIATE)
    per_file = max(1, round(file_bytes / layer_bytes))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=per_file * files, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, tie_word_embeddings=True, dtype="bfloat16",
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.save_pretrained(path)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(path)
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in Qwen2ForCausalLM(config).state_dict().items()
                  if name != "lm_head.weight"}  # (tied: not saved)
    generator = torch.Generator().manual_seed(0)
    weight_map, sizes = {}, []
    for index in range(files):
        layers = range(index * per_file, (index + 1) * per_file)
        names = [name for name in shapes if (index == 0 and ".layers." not in name)
                 or any(f".layers.{layer}." in name for layer in layers)]
        tensors = {name: random_weight(name, shapes[name], generator) for name in names}
        file = f"model-{index + 1:05d}-of-{files:05d}.safetensors"
        save_file(tensors, path / file, {"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        sizes.append(os.path.getsize(path / file))
        del tensors
    total = sum(2 * shape.numel() for shape in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    lora = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=QWEN2_LINEAR, task_type="CAUSAL_LM")
    with torch.device("meta"):
        keys = get_peft_model_state_dict(PeftModel(Qwen2ForCausalLM(config), lora),
                                         save_embedding_layers=False)
    adapter = {key: torch.randn(value.shape, generator=generator) * (0.01 if "lora_B" in key else 0.03)
               for key, value in keys.items()}
    (path.parent / "lora").mkdir()
    save_file(adapter, path.parent / "lora" / "adapter_model.safetensors")
    lora.save_pretrained(path.parent / "lora")
    return {"files": files, "layers": config.num_hidden_layers, "file_mb": [round(size / 1e6) for size in sizes],
            "model_mb": round(total / 1e6), "adapter_mb": round(os.path.getsize(
                path.parent / "lora" / "adapter_model.safetensors") / 1e6)}


def random_weight(name, shape, generator):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


# ---------------------------------------------------------------- measuring


def child(step, work, *args):
    """Run one step in a fresh process; what it prints last (for the merge and the check: its
    peak RSS and wall time). This process imports no torch and stays small: a child's
    ru_maxrss starts from the high-water mark of the process it was forked from."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, "--child", step, str(work), *map(str, args)],
                            env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{step} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def run_child(step, work, *args):
    """In the child: writing the model, or the merge or the logits check as export() calls them,
    then this process's peak RSS (KiB on Linux) and the RSS it had before the step, after its
    imports."""
    if step == "write":
        print(json.dumps(write_model(work / "model", int(args[0]), int(args[1]))))
        return
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    sys.path.insert(0, str(ROOT))
    from training import export, merge

    model, lora, fused = (str(work / name) for name in ("model", "lora", "fused"))
    before = resident_mb()
    began = time.monotonic()
    if step == "merge":
        figures = merge.fuse(model, lora, fused, AutoTokenizer.from_pretrained(model),
                               GenerationConfig.from_pretrained(model))
    else:
        vocab = json.loads((work / "model" / "config.json").read_text())["vocab_size"]
        generator = torch.Generator().manual_seed(1)
        examples = [(torch.randint(0, vocab, (32,), generator=generator).tolist(), list(range(8, 31)))
                    for _ in range(3)]
        figures, _ = export.check_logits(model, lora, fused, examples)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
                      "rss_before_step_mb": before, "wall_s": time.monotonic() - began,
                      "figures": figures}))


def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


# ---------------------------------------------------------------- report


def report(args, runs):
    f_mb = args.file_mb
    merge_4, merge_8 = runs["merge_4_files"]["peak_rss_mb"], runs["merge_8_files"]["peak_rss_mb"]
    limit = 2 * f_mb + 1000
    results = {
        "command": " ".join([".venv/bin/python", "bench/export_memory.py", *sys.argv[1:]]),
        "file_mb": f_mb,
        "peak_rss_method": "getrusage(RUSAGE_SELF).ru_maxrss of a fresh child process per step, "
                           "imports included",
        "check_note": "the logits check on this CPU-only machine loads the model in its dtype "
                      "(bf16), one model at a time",
        "runs": runs,
        "ratios": {"merge_8_over_4": merge_8 / merge_4},
        "targets": {"merge_8_within_1.15x_of_4": merge_8 / merge_4 <= GROWTH_TARGET,
                    "merge_at_most_2F_plus_1GB": max(merge_4, merge_8) <= limit},
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_1_5_15_min_at_end": os.getloadavg(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "packages": {name: metadata.version(name) for name in PACKAGES},
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{'step':<16} {'model MB':>9} {'peak RSS MB':>12} {'before MB':>10} {'wall s':>7}")
    for name, run in runs.items():
        print(f"{name:<16} {run['model_mb']:>9} {run['peak_rss_mb']:>12.0f} "
              f"{run['rss_before_step_mb']:>10.0f} {run['wall_s']:>7.1f}")
    print(f"\nmerge 8 files / 4 files: {merge_8 / merge_4:.3f} (target <= {GROWTH_TARGET}): "
          f"{'met' if merge_8 / merge_4 <= GROWTH_TARGET else 'MISSED'}")
    print(f"merge peak {max(merge_4, merge_8):.0f} MB (target <= 2F + 1 GB = {limit} MB): "
          f"{'met' if max(merge_4, merge_8) <= limit else 'MISSED'}")
    print(f"written to {output}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        run_child(sys.argv[2], Path(sys.argv[3]), *sys.argv[4:])
    else:
        main()
