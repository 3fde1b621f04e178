"""Benchmark: the most bytes a node's scratch directory (WORK_DIR) holds during training, with
one and with two training processes a node.

    .venv/bin/python bench/node_disk.py [--rows 6000] [--shard-size 1500] [--output FILE]

Runs allatonce.yaml's run block on two simulated nodes at once (two bash processes, as
SkyPilot runs it on each node), training with torchrun and DDP on the CPU (gloo), first with
one process a node, then with two, on the synthetic conversations and tiny model of `make
demo`, against a local S3 server. Reports what dotrain.py measured (metrics.json's
work_dir_peak_bytes, every file under WORK_DIR sampled twice a second, the export's files
on node 0 included) beside the size of one shard as a node prepares it and of the exported
model. Target: a node's peak does not grow with its process count (within 1.15x), since a
node's processes share one copy of each shard. Results go to bench/results/node_disk.json.
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from demo import run as demo  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "node_disk.json"
TARGET = 1.15  # peak with two processes a node / peak with one


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=6000, help="synthetic conversations (default 6000)")
    parser.add_argument("--shard-size", type=int, default=1500, help="rows a shard (default 1500)")
    parser.add_argument("--output", default=str(RESULTS), help="where the results go")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-node-disk-") as work:
        work = Path(work)
        inputs = demo.make_inputs(work / "inputs", rows=args.rows)
        for gpus in (1, 2):
            with demo.local_s3() as endpoint:
                # moto's buckets live in the process, not the server: start from none.
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset",
                                                              method="POST"))
                demo.create_bucket(endpoint, demo.BUCKET)
                env = demo.demo_env(endpoint, demo.BUCKET, inputs, work / f"{gpus}-a-node",
                                    SHARD_SIZE=str(args.shard_size), MAX_SEQ_LENGTH="256",
                                    GRAD_ACCUM="1", OMP_NUM_THREADS="1", WAIT_TIMEOUT="900",
                                    EVAL_ROWS="20")
                began = time.time()
                nodes(env, work / f"{gpus}-a-node", gpus)
                runs[f"{gpus}_a_node"] = measured(endpoint, time.time() - began)
                print(f"{gpus} process(es) a node: {json.dumps(runs[f'{gpus}_a_node'])}", flush=True)
    one, two = (max(runs[f"{n}_a_node"]["work_dir_peak_bytes"].values()) for n in (1, 2))
    result = {"benchmark": "node_disk", "command": " ".join(["bench/node_disk.py", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": args.rows,
              "shard_size": args.shard_size, "runs": runs, "ratio": round(two / one, 3),
              "target": TARGET, "met": two / one <= TARGET}
    output = Path(args.output)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"peak per node, two processes / one: {result['ratio']} (target <= {TARGET}); results in {output}")


def nodes(env, work, gpus):
    """The run block on two nodes at once, each with its own disk, to the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    block = demo.yaml.safe_load(demo.TASK.read_text())["run"]
    procs = [subprocess.Popen(["bash", "-c", block], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT,
                              env={**env, "WORK_DIR": str(work / f"node{rank}" / "work"),
                                   "MODEL_CACHE_DIR": str(work / f"node{rank}" / "models"),
                                   "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NUM_NODES": "2",
                                   "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1",
                                   "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus), "TRAIN_PORT": port})
             for rank in (0, 1)]
    if any(proc.wait() for proc in procs):
        sys.exit(f"error: the run block failed with {gpus} process(es) a node")


def measured(endpoint, seconds):
    client = demo.s3_client(endpoint)
    done = demo.OUTPUTS[-1][1]

    def size(prefix):
        return sum(item["Size"] for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=demo.BUCKET, Prefix=prefix) for item in page.get("Contents", []))

    metrics = json.loads(client.get_object(Bucket=demo.BUCKET, Key=f"{done}/metrics.json")["Body"].read())
    shards = metrics["shards"]
    return {"work_dir_peak_bytes": metrics["work_dir_peak_bytes"], "world_size": metrics["world_size"],
            "shards": len(shards), "sequences_a_shard": [shard["sequences"] for shard in shards],
            "model_ready_bytes": size(demo.OUTPUTS[3][1] + "/"),
            "fused_bytes": size(f"{done}/fused/"), "seconds": round(seconds, 1)}


if __name__ == "__main__":
    main()
