"""make demo: run allatonce.yaml's `run` block on this machine, as a SkyPilot node runs it.

    .venv/bin/python demo/run.py

The block runs as written, with bash, in the repository (the task's workdir). Only its
environment differs from a cloud node's:
- the bucket is a local S3 server (moto, on 127.0.0.1) that lives as long as the demo;
- the dataset and the model are made here, in .demo/ (demo/synthetic.py: conversations
  with a learnable pattern, a tiny ChatML tokenizer, a tiny random Qwen2), and imported
  from there instead of the Hugging Face Hub;
- the settings are small (2-3 shards, short sequences) and training uses peft on the CPU;
- VENV=.venv: the block activates ${VENV:-$HOME/venv-finetune}, the venv that the task's
  setup makes on a node; here it is this repository's.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from demo import synthetic  # noqa: E402

TASK = ROOT / "allatonce.yaml"
DEMO_DIR = ROOT / ".demo"
BUCKET = "demo-bucket"
DATASET_NAME = "demo/colors"
MODEL_NAME = "demo/tiny-qwen2"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "demo-key-id", "AWS_SECRET_ACCESS_KEY": "demo-secret-key",
               "HF_TOKEN": ""}
SETTINGS = {
    "DATASET_NAME": DATASET_NAME,
    "MODEL_NAME": MODEL_NAME,
    "SHARD_SIZE": "400",  # 1000 conversations: 3 shards
    "MAX_SEQ_LENGTH": "256",
    "TRAIN_BACKEND": "peft",
    "LEARNING_RATE": "0.005",  # a tiny random model changes visibly in 31 steps only at a high rate
    "SAMPLE_PROMPT": "The apple is red. What color is the apple?",
    "EVAL_ROWS": "50",  # held out: the evaluation loss before and after training
    "HF_HUB_OFFLINE": "1",
}
# What the task leaves in the bucket: (what, prefix).
OUTPUTS = [
    ("raw dataset", f"raw/{DATASET_NAME}"),
    ("standardized dataset", f"standardized/{DATASET_NAME}"),
    ("model", f"models/{MODEL_NAME}"),
    ("tokenized shards", f"model-ready/{MODEL_NAME}/{DATASET_NAME}/*"),  # *: the demo's settings' folder
    ("checkpoints", f"checkpoints/{MODEL_NAME}/{DATASET_NAME}"),
    ("LoRA adapter and fused model", f"done/{MODEL_NAME}/{DATASET_NAME}"),
]


def main():
    started = time.time()
    inputs = make_inputs(DEMO_DIR / "inputs")
    with local_s3() as endpoint:
        create_bucket(endpoint, BUCKET)
        env = demo_env(endpoint, BUCKET, inputs, DEMO_DIR)
        print(f"== running allatonce.yaml's run block against {endpoint} (bucket {BUCKET})",
              flush=True)
        result = run_task(env)
        if result.returncode != 0:
            sys.exit(f"demo: the run block failed (exit {result.returncode}); see the output above")
        print("\n== outputs (in the local server's bucket)")
        for line in describe_outputs(endpoint, BUCKET):
            print(line)
        fused = copy_fused(endpoint, BUCKET, DEMO_DIR / "fused")
        print(f"\n== the fused model, copied to {fused.relative_to(ROOT)}/, stays after the bucket:"
              f"\n  AutoModelForCausalLM.from_pretrained('{fused.relative_to(ROOT)}')")
        print(f"\n== stopping the local S3 server at {endpoint}: its bucket goes with it")
    print(f"demo finished in {time.time() - started:.0f} s")


def make_inputs(out, rows=1000):
    """The dataset file and the model directory the demo imports instead of the Hub's."""
    print(f"== making a synthetic dataset, tokenizer and tiny model in {out}", flush=True)
    datasets = synthetic.write_datasets(out / "datasets", n=rows)
    synthetic.make_tokenizer(out / "tokenizer")
    synthetic.make_model(out / "model", out / "tokenizer")
    return {"DATASET_SOURCE": str(datasets["sharegpt"]), "MODEL_SOURCE": str(out / "model")}


@contextlib.contextmanager
def local_s3():
    """A moto S3 server on a free loopback port, for as long as the block lasts."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def create_bucket(endpoint, bucket):
    # The steps sign for region "auto" (Tigris); moto creates buckets only in a real region.
    s3_client(endpoint).create_bucket(Bucket=bucket)


def demo_env(endpoint, bucket, inputs, work_dir, **settings):
    """The node's environment: the task's envs, then the demo's bucket, inputs and settings."""
    task = yaml.safe_load(TASK.read_text())
    envs = {name: str(value) for name, value in task["envs"].items() if value is not None}
    # Nothing of the caller's cloud or Hub setup leaks in (a real AWS profile, say).
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("AWS_", "HF_", "SKYPILOT_")) and k not in envs}
    return {
        **inherited, **envs, **SETTINGS, **settings, **inputs, **CREDENTIALS,
        "BUCKET_NAME": bucket, "AWS_ENDPOINT_URL_S3": endpoint,
        "WORK_DIR": str(work_dir / "work"), "MODEL_CACHE_DIR": str(work_dir / "model-cache"),
        "VENV": str(ROOT / ".venv"), "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_task(env, **popen):
    """allatonce.yaml's run block, with bash, in the repository, as a node runs it."""
    run = yaml.safe_load(TASK.read_text())["run"]
    return subprocess.run(["bash", "-c", run], cwd=ROOT, env=env, **popen)


def describe_outputs(endpoint, bucket):
    """A line per output prefix: its URL, its objects, and what its manifest says."""
    client = s3_client(endpoint)
    for what, prefix in OUTPUTS:
        if prefix.endswith("/*"):
            prefix = only_folder(client, bucket, prefix[:-2])
        objects = [item for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/") for item in page.get("Contents", [])]
        size = sum(item["Size"] for item in objects) / 2**20
        state = f"{len(objects)} objects, {size:.1f} MiB"
        if any(item["Key"] == f"{prefix}/_manifest.json" for item in objects):
            manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/_manifest.json")
                                  ["Body"].read())
            state += ", complete" if manifest.get("complete") else ", incomplete"
            state += f", {manifest['rows']} rows" if manifest.get("rows") else ""
        yield f"  {what:<30} s3://{bucket}/{prefix}/  ({state})"
    yield f"  {'serve it with':<30} service.yaml (it pulls {OUTPUTS[-1][1]}/fused)"


def only_folder(client, bucket, prefix):
    """The one folder under prefix (the model-ready data of the one set of data settings)."""
    found = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", Delimiter="/")
    folders = [item["Prefix"].rstrip("/") for item in found.get("CommonPrefixes", [])]
    return folders[0] if len(folders) == 1 else prefix


def copy_fused(endpoint, bucket, out):
    shutil.rmtree(out, ignore_errors=True)  # an earlier demo's
    client = s3_client(endpoint)
    prefix = f"{OUTPUTS[-1][1]}/fused/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            path = out / item["Key"][len(prefix):]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(path))
    return out


if __name__ == "__main__":
    main()
