"""Benchmark: what a rerun of the whole pipeline over a finished bucket costs.

    .venv/bin/python bench/rerun.py [--rows 240] [--output FILE]

Runs allatonce.yaml's run block as `make demo` does (tiny synthetic dataset and model, a
local moto S3 server), then runs it again through a recording proxy (tests/s3proxy.py) in
front of the same server, and then each step alone, again through the proxy. Reports the
first run's wall time, the rerun's, its requests and writes, each step's rerun time and
requests, and the time a bare Python takes to import torch and transformers (what a step
would pay before finding its work done if it imported them first). Targets: the rerun
under 5% of the first run's wall time, and zero write requests. Results go to
bench/results/rerun.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from demo import run as demo  # noqa: E402
from s3proxy import S3Proxy  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "rerun.json"
STEPS = ["import-dataset.py", "import-model.py", "pretokenize.py", "dotrain.py"]
TARGET = 0.05  # rerun wall time / first run wall time


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=240, help="synthetic conversations (default 240)")
    parser.add_argument("--output", default=str(RESULTS), help="where the results go")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rerun-") as work, demo.local_s3() as endpoint:
        work = Path(work)
        demo.create_bucket(endpoint, demo.BUCKET)
        inputs = demo.make_inputs(work / "inputs", rows=args.rows)
        env = demo.demo_env(endpoint, demo.BUCKET, inputs, work, SHARD_SIZE=str(args.rows // 3 + 1),
                            OMP_NUM_THREADS="1")
        first = run_block(env)
        proxy = S3Proxy(int(endpoint.rsplit(":", 1)[1]))
        try:
            proxied = {**env, "AWS_ENDPOINT_URL_S3": proxy.url}
            rerun = run_block(proxied)
            requests, writes = len(proxy.requests), proxy.writes()
            steps = {}
            for step in STEPS:
                before = len(proxy.requests)
                began = time.time()
                subprocess.run([sys.executable, step], env=proxied, cwd=ROOT, check=True,
                               stdout=subprocess.DEVNULL)
                steps[step] = {"seconds": round(time.time() - began, 2),
                               "requests": dict(Counter(method for method, _ in proxy.requests[before:]))}
        finally:
            proxy.close()
    imports = time_imports()
    ratio = rerun / first
    met = {"under_5_percent": ratio < TARGET, "zero_writes": not writes}
    results = {
        "benchmark": "rerun", "command": "bench/rerun.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": args.rows,
        "seconds": {"first_run": round(first, 2), "rerun": round(rerun, 2)},
        "rerun_over_first": round(ratio, 4), "rerun_requests": requests, "rerun_writes": writes,
        "steps_alone": steps, "python_import_seconds": imports, "met": met,
        "table": [
            {"benchmark": "rerun of a finished pipeline (demo data)",
             "figure": f"{rerun:.1f} s = {100 * ratio:.1f}% of the first run ({first:.0f} s)",
             "target": "< 5% of the first run", "met": met["under_5_percent"]},
            {"benchmark": "rerun: write requests",
             "figure": f"{len(writes)} writes of {requests} requests",
             "target": "0 writes", "met": met["zero_writes"]}],
        "machine": {"cpu_count": os.cpu_count()},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: results[k] for k in ("seconds", "rerun_over_first", "rerun_requests",
                                              "rerun_writes", "steps_alone", "python_import_seconds")},
                     indent=1))
    print(f"results in {output}")


def run_block(env):
    began = time.time()
    result = demo.run_task(env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"the run block failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return time.time() - began


def time_imports():
    """Seconds a fresh interpreter takes to start bare, and to import each heavy library."""
    seconds = {}
    for name, code in [("python", "pass"), ("s3fs", "import s3fs"), ("torch", "import torch"),
                       ("transformers", "import torch, transformers")]:
        began = time.time()
        subprocess.run([sys.executable, "-c", code], check=True)
        seconds[name] = round(time.time() - began, 2)
    return seconds


if __name__ == "__main__":
    main()
