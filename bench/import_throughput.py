"""Benchmark: rows/s of a whole import with one and with two processes, and of the original method.

    .venv/bin/python bench/import_throughput.py [--rows N] [--repeats R] [--output FILE]

Writes N synthetic ShareGPT rows (~1 KB, import_memory.py's) as JSONL and imports them, as one
shard, into a local S3 server (moto, hosted by this process), R times in turn with:
- import-dataset.py with NUM_PROC=1 and with NUM_PROC=2, run as users run it: the raw copy,
  then the standardization (in NUM_PROC processes);
- the original method (import_memory.py's: stream with datasets, the shard as a dict of lists,
  Dataset.from_dict, save_to_disk to s3://), which copies the rows without standardizing them.
Each run is a fresh process, timed from its start to its end (imports included) by
import_memory.py's wrapper, which also takes its peak memory (worker processes included) and
its CPU time. Figures: rows/s of the best of R runs. Targets: NUM_PROC=2 at least 1.7x
NUM_PROC=1, and at least 2x the original method. On a machine others share, wall times vary
with their load; CPU seconds show the work each method does. Results go to
bench/results/import_throughput.json.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import import_memory  # noqa: E402 - its data, S3 server, original method and measuring wrapper

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "import_throughput.json"
METHODS = {"num_proc_1": {"NUM_PROC": "1"}, "num_proc_2": {"NUM_PROC": "2"}, "original": None}
SCALING_TARGET = 1.7  # NUM_PROC=2 / NUM_PROC=1
ORIGINAL_TARGET = 2.0  # NUM_PROC=2 / original


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="N (default 200000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (default 3)")
    parser.add_argument("--work-dir", help="where the JSONL file and logs go (default: a temp dir)")
    parser.add_argument("--output", default=str(RESULTS), help="where the results go "
                        "(default: bench/results/import_throughput.json)")
    args = parser.parse_args()
    shard_size = max(5_000_000, args.rows)  # one shard, as most datasets are with the default
    importer = str(ROOT / "import-dataset.py")
    with tempfile.TemporaryDirectory(prefix="import-throughput-", dir=args.work_dir) as work:
        work = Path(work)
        data = import_memory.write_sharegpt_jsonl(work / "sharegpt.jsonl", args.rows)
        server, endpoint = import_memory.start_s3_server()
        try:
            runs = {name: [] for name in METHODS}
            for repeat in range(args.repeats):
                for name, settings in METHODS.items():
                    import_memory.reset_bucket(endpoint)
                    load = round(os.getloadavg()[0], 2)
                    run = import_memory.measure("ours" if settings else "original", importer, data,
                                                args.rows, shard_size, endpoint,
                                                work / f"{name}-{repeat}.log", settings)
                    runs[name].append({**run, "load_average_before": load})
        finally:
            server.stop()
    report(args, data, runs)


def report(args, data, runs):
    best = {name: min(runs[name], key=lambda run: run["wall_s"]) for name in METHODS}
    rate = {name: args.rows / best[name]["wall_s"] for name in METHODS}
    per_cpu_s = {name: args.rows / min(run["cpu_s"] for run in runs[name]) for name in METHODS}
    # ours in two phases: the raw copy (process start included; one stream whatever NUM_PROC)
    # and the standardization after it (NUM_PROC workers)
    phases = {name: {"raw_copy_s": best[name]["raw_copy_s"],
                     "standardize_s": best[name]["wall_s"] - best[name]["raw_copy_s"],
                     "raw_copy_cpu_s": best[name]["raw_copy_cpu_s"],
                     "standardize_cpu_s": best[name]["cpu_s"] - best[name]["raw_copy_cpu_s"]}
              for name in METHODS if METHODS[name]}
    ratios = {"num_proc_2_vs_1": rate["num_proc_2"] / rate["num_proc_1"],
              "num_proc_2_vs_original": rate["num_proc_2"] / rate["original"],
              "standardize_num_proc_2_vs_1": phases["num_proc_1"]["standardize_s"]
              / phases["num_proc_2"]["standardize_s"]}
    met = {"num_proc_2_vs_1": ratios["num_proc_2_vs_1"] >= SCALING_TARGET,
           "num_proc_2_vs_original": ratios["num_proc_2_vs_original"] >= ORIGINAL_TARGET}
    results = {
        "benchmark": "import_throughput",
        "command": " ".join([".venv/bin/python", "bench/import_throughput.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data": {k: v for k, v in data.items() if k != "path"},
        "rows_per_s": {name: round(value) for name, value in rate.items()},
        "rows_per_cpu_s": {name: round(value) for name, value in per_cpu_s.items()},
        "peak_mb": {name: round(best[name]["peak_mb"]) for name in METHODS},
        "phases": {name: {k: round(v, 2) for k, v in split.items()} for name, split in phases.items()},
        "ratios": {name: round(value, 3) for name, value in ratios.items()},
        "targets": {"num_proc_2_vs_1": SCALING_TARGET, "num_proc_2_vs_original": ORIGINAL_TARGET},
        "met": met,
        "runs": runs,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "packages": {name: metadata.version(name) for name in import_memory.PACKAGES}},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{args.rows} rows, {data['bytes'] / 1e6:.0f} MB of JSONL, {os.cpu_count()} CPUs "
          f"(best of {args.repeats})")
    print(f"{'method':<12} {'seconds':>8} {'rows/s':>9} {'CPU s':>8} {'rows/CPU s':>11} {'peak MB':>8}")
    for name in METHODS:
        run = best[name]
        print(f"{name:<12} {run['wall_s']:>8.1f} {rate[name]:>9,.0f} {run['cpu_s']:>8.1f} "
              f"{per_cpu_s[name]:>11,.0f} {run['peak_mb']:>8.0f}")
    for name, split in phases.items():
        print(f"{name:<12} raw copy {split['raw_copy_s']:.1f} s ({split['raw_copy_cpu_s']:.1f} CPU s), "
              f"standardization {split['standardize_s']:.1f} s ({split['standardize_cpu_s']:.1f} CPU s)")
    print(f"standardization alone, NUM_PROC 2 vs 1: {ratios['standardize_num_proc_2_vs_1']:.2f}x")
    for name, target in results["targets"].items():
        print(f"{name:<24} {ratios[name]:.2f}x (target >= {target}: "
              f"{'met' if met[name] else 'MISSED'})")
    print(f"written to {output}")


if __name__ == "__main__":
    main()
