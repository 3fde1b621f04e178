"""Benchmark: peak memory of import-dataset.py against the original save_to_disk method.

    .venv/bin/python bench/import_memory.py [--rows N] [--work-dir DIR]
        [--importer path/to/import-dataset.py] [--output FILE]

Writes synthetic ShareGPT rows (~1 KB, multi-turn, FineTome-like) as JSONL at N and 4N rows,
imports each into a local S3 server (moto, hosted by this process) as one shard, both with
import-dataset.py run as users run it and with the method it replaces (stream with datasets,
take the shard as a dict of lists, Dataset.from_dict, save_to_disk to s3://), and measures
the peak memory of each import, its worker processes included (import-dataset.py runs with
its default NUM_PROC, every core). Targets: ours at 4N within 1.15x of ours at N, and at most
a quarter of the original method's at 4N. Results go to bench/results/import_memory.json.
"""

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "import_memory.json"
BUCKET = "bench-bucket"
FAKE_KEY_ID = "FAKEKEYID0123456789"
FAKE_SECRET = "fake-secret-4f9c2e7b1a"
GROWTH_TARGET = 1.15  # ours at 4N / ours at N
ORIGINAL_TARGET = 0.25  # ours at 4N / original at 4N
PACKAGES = ("datasets", "pyarrow", "s3fs", "fsspec", "boto3", "moto", "psutil")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="N (at least 200000 for the "
                        "recorded figures; default 200000)")
    parser.add_argument("--work-dir", help="where the JSONL files and logs go (default: a temp dir)")
    parser.add_argument("--importer", default=str(ROOT / "import-dataset.py"),
                        help="the import-dataset.py to measure (default: this checkout's), e.g. a "
                        "changed copy, with its common.py beside it")
    parser.add_argument("--output", default=str(RESULTS), help="where the results go "
                        "(default: bench/results/import_memory.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="import-memory-", dir=args.work_dir) as work:
        work = Path(work)
        sizes = {"N": args.rows, "4N": 4 * args.rows}
        shard_size = max(5_000_000, 4 * args.rows + 1)  # the whole dataset is one shard
        files = {label: write_sharegpt_jsonl(work / f"sharegpt-{rows}.jsonl", rows)
                 for label, rows in sizes.items()}
        server, endpoint = start_s3_server()
        try:
            runs = {}
            for method in ("ours", "original"):
                for label, rows in sizes.items():
                    reset_bucket(endpoint)
                    runs[f"{method}_{label}"] = measure(method, args.importer, files[label], rows,
                                                        shard_size, endpoint,
                                                        work / f"{method}-{label}.log")
        finally:
            server.stop()
    report(args, sizes, shard_size, runs)


# ---------------------------------------------------------------- data


def write_sharegpt_jsonl(path, rows, seed=0):
    """`rows` FineTome-like rows: conversations [{from, value}] of 1-3 exchanges, ~1 KB each."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(3000)]
    sentences = [" ".join(rng.choices(words, k=rng.randint(5, 16))).capitalize() + "."
                 for _ in range(20000)]
    sources = ["infini-instruct-top-500k", "WebInstructSub_axolotl", "flan", "financial-instructions"]
    with open(path, "w") as f:
        for i in range(rows):
            exchanges = rng.choice((1, 1, 2, 2, 3))
            turns = []
            for _ in range(exchanges):
                question = " ".join(rng.choices(sentences, k=rng.randint(1, 3)))
                answer = " ".join(rng.choices(sentences, k=rng.randint(2, 12 // exchanges + 2)))
                turns += [{"from": "human", "value": f"{question} (#{i})"},
                          {"from": "gpt", "value": answer}]
            row = {"conversations": turns, "source": rng.choice(sources),
                   "score": round(rng.uniform(3.0, 5.5), 4)}
            f.write(json.dumps(row) + "\n")
    return {"path": str(path), "rows": rows, "bytes": os.path.getsize(path)}


# ---------------------------------------------------------------- S3 server


def start_s3_server():
    """moto in this process: its memory (it holds every object) is never in a measured process."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    return server, f"http://127.0.0.1:{port}"


def reset_bucket(endpoint):
    """An empty bucket, and the previous run's objects freed from the server."""
    import boto3
    import requests

    requests.post(f"{endpoint}/moto-api/reset", timeout=60)
    # moto refuses CreateBucket in region "auto"; objects signed for "auto" work afterwards.
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id=FAKE_KEY_ID,
                 aws_secret_access_key=FAKE_SECRET).create_bucket(Bucket=BUCKET)


# ---------------------------------------------------------------- measuring


def measure(method, importer, data, rows, shard_size, endpoint, log_path, settings=None):
    """Import `data` with one method (and the importer's `settings`, e.g. NUM_PROC) in a fresh
    wrapper process; its peak memory, wall time and CPU time."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "BUCKET_", "DATASET_", "HF_", "NUM_PROC"))}
    env.update({"BUCKET_NAME": BUCKET, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_REGION": "auto",
                "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
                "HF_HUB_OFFLINE": "1", "HF_HOME": str(Path(log_path).parent / "hf-home"),
                "SHARD_SIZE": str(shard_size), "PYTHONUNBUFFERED": "1", **(settings or {})})
    if method == "ours":
        env["DATASET_NAME"] = "bench/sharegpt"
        env["DATASET_SOURCE"] = data["path"]
        command = [sys.executable, importer]
    else:
        command = [sys.executable, __file__, "--original-method", data["path"]]
    print(f"{method} at {rows} rows ...", flush=True)
    wrapper = [sys.executable, __file__, "--measure", str(log_path), "--", *command]
    result = subprocess.run(wrapper, env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        log_tail = Path(log_path).read_text()[-3000:] if Path(log_path).exists() else ""
        sys.exit(f"{method} at {rows} rows failed:\n{result.stderr}\n{log_tail}")
    figures = json.loads(result.stdout.splitlines()[-1])
    print(f"  peak RSS {figures['peak_rss_mb']:.0f} MB (all processes: "
          f"{figures['sampled_tree_peak_mb']:.0f} MB), {figures['wall_s']:.1f} s, "
          f"{figures['cpu_s']:.1f} CPU s", flush=True)
    return {"method": method, "rows": rows, "bytes": data["bytes"], **figures}


def measure_child(log_path, command):
    """Run `command` as the only child of this small, fresh process; print its peak RSS.

    The figure is the kernel's high-water mark, getrusage(RUSAGE_CHILDREN).ru_maxrss: exact
    (no sampling can miss a short spike) and the importer's alone. It is the largest peak over
    every child waited for so far, which is why each measurement gets this fresh wrapper with
    one child. The wrapper is small (a few tens of MB), so the part of its own memory that a
    child inherits for the instant between fork and exec cannot raise the figure materially.
    ru_maxrss is per process, not a sum: the tree is also sampled with psutil every 50 ms,
    summing the RSS of the child and its descendants (import-dataset.py's NUM_PROC workers),
    which the high-water mark would miss; the figure compared is the larger of the two. The
    CPU time is the child's (exact) and its descendants' as last sampled: the workers are
    children of multiprocessing's fork server, which the child never waits for. The child's
    output goes to the log; the line saying the raw copy is complete splits the run in two
    phases: the wall and CPU seconds up to it (raw_copy_s, raw_copy_cpu_s) and the rest."""
    import threading

    import psutil

    start = time.monotonic()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        tree = psutil.Process(child.pid)
        phases = {}

        def copy_output():
            for line in child.stdout:
                log.write(line.decode(errors="replace"))
                if b"/raw/" in line and b" complete: " in line:
                    phases.update(raw_copy_s=time.monotonic() - start,
                                  raw_copy_cpu_s=sum(tree.cpu_times()[:2]))

        copier = threading.Thread(target=copy_output)
        copier.start()
        sampled_peak, processes_max, descendants_cpu = 0, 1, {}
        while child.poll() is None:
            total, count = 0, 0
            try:
                for process in [tree, *tree.children(recursive=True)]:
                    total += process.memory_info().rss
                    count += 1
                    if process.pid != child.pid:
                        descendants_cpu[process.pid] = sum(process.cpu_times()[:2])
            except psutil.Error:  # a process ended between listing and reading
                pass
            sampled_peak, processes_max = max(sampled_peak, total), max(processes_max, count)
            time.sleep(0.05)
        copier.join()
    wall = time.monotonic() - start
    if child.returncode != 0:
        sys.exit(f"{command[1]} exited with {child.returncode}; see {log_path}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_rss_mb = usage.ru_maxrss * 1024 / 1e6  # KiB on Linux
    print(json.dumps({"peak_rss_mb": peak_rss_mb, "sampled_tree_peak_mb": sampled_peak / 1e6,
                      "peak_mb": max(peak_rss_mb, sampled_peak / 1e6), "processes_max": processes_max,
                      "wall_s": wall,
                      "cpu_s": usage.ru_utime + usage.ru_stime + sum(descendants_cpu.values()),
                      **phases}))


# ---------------------------------------------------------------- the original method


def original_method(data_path):
    """The method import-dataset.py replaces: a whole shard in memory, then save_to_disk."""
    import datasets

    shard_size = int(os.environ["SHARD_SIZE"])
    storage_options = {"key": os.environ["AWS_ACCESS_KEY_ID"],
                       "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
                       "endpoint_url": os.environ["AWS_ENDPOINT_URL_S3"],
                       "client_kwargs": {"region_name": os.environ["AWS_REGION"]},
                       "config_kwargs": {"s3": {"addressing_style": "path"}}}
    stream = datasets.load_dataset("json", data_files=data_path, split="train", streaming=True)
    for index, batch in enumerate(stream.iter(batch_size=shard_size)):
        shard = datasets.Dataset.from_dict(batch)
        shard.save_to_disk(f"s3://{os.environ['BUCKET_NAME']}/original/shard-{index:05d}",
                           storage_options=storage_options)
        print(f"shard {index}: {len(shard)} rows saved", flush=True)


# ---------------------------------------------------------------- report


def report(args, sizes, shard_size, runs):
    growth = runs["ours_4N"]["peak_mb"] / runs["ours_N"]["peak_mb"]
    versus_original = runs["ours_4N"]["peak_mb"] / runs["original_4N"]["peak_mb"]
    results = {
        "command": " ".join([".venv/bin/python", "bench/import_memory.py", *sys.argv[1:]]),
        "importer": os.path.relpath(args.importer, ROOT),
        "n": sizes["N"],
        "shard_size": shard_size,
        "peak_rss_method": "the larger of getrusage(RUSAGE_CHILDREN).ru_maxrss of a fresh "
                           "wrapper process around each import (kernel high-water mark of the "
                           "largest process) and the RSS of the whole process tree (the importer "
                           "and its workers) sampled with psutil every 50 ms",
        "runs": runs,
        "ratios": {"ours_4N_over_ours_N": growth, "ours_4N_over_original_4N": versus_original},
        "targets": {
            "ours_4N_within_1.15x_of_ours_N": growth <= GROWTH_TARGET,
            "ours_4N_at_most_quarter_of_original_4N": versus_original <= ORIGINAL_TARGET,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            # Other work on the machine slows the wall times; peak RSS does not depend on it.
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
    print(f"\n{'method':<10} {'rows':>9} {'MB of JSONL':>12} {'peak MB':>12} {'wall s':>8}")
    for run in runs.values():
        print(f"{run['method']:<10} {run['rows']:>9} {run['bytes'] / 1e6:>12.0f} "
              f"{run['peak_mb']:>12.0f} {run['wall_s']:>8.1f}")
    print(f"\nours 4N / ours N:     {growth:.3f} (target <= {GROWTH_TARGET}): "
          f"{'met' if growth <= GROWTH_TARGET else 'MISSED'}")
    print(f"ours 4N / original 4N: {versus_original:.3f} (target <= {ORIGINAL_TARGET}): "
          f"{'met' if versus_original <= ORIGINAL_TARGET else 'MISSED'}")
    print(f"written to {output}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure_child(sys.argv[2], sys.argv[4:])
    elif sys.argv[1:2] == ["--original-method"]:
        original_method(sys.argv[2])
    else:
        main()
