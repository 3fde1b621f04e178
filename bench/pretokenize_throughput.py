"""Benchmark: tokens/s of pretokenize.py with two processes and with one, of the method it
replaces, and of the tokenizer alone.

    .venv/bin/python bench/pretokenize_throughput.py [--rows N] [--repeats R] [--profile FILE]

Writes N synthetic FineTome-like conversations (multi-turn, a few long ones, text drawn from
the fixtures' real instruction data), imports them and a model with the real Qwen2.5
tokenizer into a local S3 server (moto, hosted by this process), then times, each in a
fresh process with its libraries already imported, R times in turn:

- ours:        pretokenize.py's main() with NUM_PROC=2, standardized shards in, model-ready
               parts out (EVAL_ROWS=0: every method handles every row);
- one_process: the same with NUM_PROC=1;
- original:    the method it replaces: datasets reads the shards, map() renders `text` with
               apply_chat_template, map() tokenizes it with a batched tokenizer call (no
               labels), save_to_disk() to s3://;
- limit:       the fast tokenizer alone, one encode_batch call on the already-rendered texts.
The tokenizer's threads are limited to two (RAYON_NUM_THREADS), the cores ours uses.

Every figure is tokens of the rendered conversations per second of the best of R runs, the
start of ours' worker processes included. Targets: ours at least 1.6x one_process, at least as
fast as the original method, and at least 0.7x the limit. On a machine others share, wall
times vary with their load (recorded before each run); the CPU seconds of each run (all its
threads and processes) are steadier and show the work each method does, though not what
overlapping that work gains. Results go to bench/results/pretokenize_throughput.json.
"""

import argparse
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "pretokenize_throughput.json"
FIXTURES = Path(os.environ.get("FIXTURES_DIR", ROOT.parent / "shared" / "fixtures"))
BUCKET = "bench-bucket"
MODEL, DATASET = "bench/qwen2.5-tokenizer", "bench/finetome-like"
FAKE_KEY_ID = "FAKEKEYID0123456789"
FAKE_SECRET = "fake-secret-4f9c2e7b1a"
MAX_SEQ_LENGTH = 1_000_000  # nothing truncated: every method handles the same tokens
ORIGINAL_TARGET = 1.0  # ours / original
LIMIT_TARGET = 0.7  # ours / limit
PROCESSES_TARGET = 1.6  # ours (two processes) / one_process
METHODS = ("ours", "one_process", "original", "limit")
PACKAGES = ("transformers", "tokenizers", "datasets", "pyarrow", "s3fs", "moto")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=25_000, help="conversations (default 25000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (default 3)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="rows per shard")
    parser.add_argument("--work-dir", help="where the data and logs go (default: a temp dir)")
    parser.add_argument("--profile", help="save a cProfile of ours' last run to this file")
    parser.add_argument("--output", default=str(RESULTS), help="where the results go "
                        "(default: bench/results/pretokenize_throughput.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    tokenizer_dir = FIXTURES / "tokenizers" / "qwen2.5-0.5b"
    if not tokenizer_dir.exists():
        sys.exit(f"{tokenizer_dir} is absent: set FIXTURES_DIR to the shared fixtures")
    with tempfile.TemporaryDirectory(prefix="pretokenize-bench-", dir=args.work_dir) as work:
        work = Path(work)
        data = write_conversations(work / "finetome-like.jsonl", args.rows)
        server, endpoint = start_s3_server()
        try:
            env = bucket_env(endpoint, work)
            if args.profile:
                env["BENCH_PROFILE"] = os.path.abspath(args.profile)
            prepare_inputs(env, work, data["path"], tokenizer_dir, args.shard_size)
            runs = {method: [] for method in METHODS}
            for repeat in range(args.repeats):
                for method in METHODS:
                    clear_outputs(endpoint)
                    runs[method].append(measure(method, env, work / f"{method}-{repeat}.log"))
                    print(f"  {method} run {repeat + 1}: {runs[method][-1]['seconds']:.1f} s "
                          f"(load average before: {runs[method][-1]['load_average_before']})",
                          flush=True)
        finally:
            server.stop()
    report(args, data, runs)


# ---------------------------------------------------------------- data


def write_conversations(path, rows, seed=0):
    """ShareGPT rows like FineTome-100k's: mostly one exchange, some up to six, ~3% long."""
    rng = random.Random(seed)
    texts = fixture_texts()

    def answer(scale):
        parts = rng.choices(texts, k=max(1, round(rng.lognormvariate(0.5, 0.8) * scale)))
        if rng.random() < 0.3:
            parts.insert(rng.randrange(len(parts) + 1), code_block(rng))
        if rng.random() < 0.3:
            parts.append("\n".join(f"{i}. {t}" for i, t in enumerate(rng.choices(texts, k=4), 1)))
        return "\n\n".join(parts)

    with open(path, "w") as f:
        for i in range(rows):
            turns = []
            if rng.random() < 0.2:
                turns.append({"from": "system",
                              "value": "You are an AI assistant. " + rng.choice(texts)})
            long = rng.random() < 0.03
            for _ in range(rng.choices((1, 2, 3, 4, 6), (60, 25, 8, 5, 2))[0]):
                turns.append({"from": "human", "value": f"{rng.choice(texts)} (#{i})"})
                turns.append({"from": "gpt", "value": answer(10 if long else 1.5)})
            f.write(json.dumps({"conversations": turns, "source": "synthetic",
                                "score": round(rng.uniform(3.0, 5.5), 4)}) + "\n")
    return {"path": str(path), "rows": rows, "bytes": os.path.getsize(path)}


def fixture_texts():
    """Real instruction and answer texts from the fixtures' datasets."""
    folder = FIXTURES / "datasets"
    texts = []
    for row in json.loads((folder / "llamafactory_alpaca_en_demo.json").read_text()):
        texts += [row["instruction"], row["output"]]
    for row in json.loads((folder / "fastchat_dummy_conversation.json").read_text()):
        texts += [turn["value"] for turn in row["conversations"]]
    for row in json.loads((folder / "llamafactory_kto_en_demo.json").read_text()):
        texts += [message["content"] for message in row["messages"]]
    return [t for t in texts if t.strip()]


def code_block(rng):
    names = ["total", "items", "value", "result", "count", "index", "data", "row"]
    lines = [f"def {rng.choice(names)}_{rng.randint(0, 99)}({rng.choice(names)}):"]
    for _ in range(rng.randint(2, 8)):
        a, b = rng.sample(names, 2)
        lines.append(f"    {a} = {b} * {rng.randint(0, 999)} + len({rng.choice(names)})")
    lines.append(f"    return {rng.choice(names)}")
    return "```python\n" + "\n".join(lines) + "\n```"


# ---------------------------------------------------------------- S3 server and inputs


def start_s3_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id=FAKE_KEY_ID,
                 aws_secret_access_key=FAKE_SECRET).create_bucket(Bucket=BUCKET)
    return server, endpoint


def bucket_env(endpoint, work):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "BUCKET_", "DATASET_", "MODEL_", "HF_", "TOKENIZERS_"))}
    env.update({"BUCKET_NAME": BUCKET, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_REGION": "auto",
                "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
                "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf-home"), "PYTHONUNBUFFERED": "1",
                "MODEL_NAME": MODEL, "DATASET_NAME": DATASET, "EVAL_ROWS": "0",
                "RAYON_NUM_THREADS": "2"})
    return env


def prepare_inputs(env, work, data_path, tokenizer_dir, shard_size):
    """The dataset and the model (real tokenizer, placeholder weights) imported as users do."""
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    model_dir = work / "model"
    shutil.copytree(tokenizer_dir, model_dir)
    save_file({"weight": np.zeros((2, 2), dtype=np.float32)}, str(model_dir / "model.safetensors"))
    print("importing the dataset and the model ...", flush=True)
    for script, extra in (("import-dataset.py", {"DATASET_SOURCE": data_path,
                                                 "SHARD_SIZE": str(shard_size)}),
                          ("import-model.py", {"MODEL_SOURCE": str(model_dir)})):
        result = subprocess.run([sys.executable, str(ROOT / script)], env={**env, **extra},
                                cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{script} failed:\n{result.stdout}\n{result.stderr}")


def clear_outputs(endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)
    for prefix in ("model-ready/", "original/"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=BUCKET, Key=item["Key"])


# ---------------------------------------------------------------- measuring


def measure(method, env, log_path):
    """One method in a fresh process; its seconds of work and the tokens it handled."""
    env = {**env, "MODEL_CACHE_DIR": str(Path(log_path).with_suffix(".cache")),
           "NUM_PROC": "1" if method == "one_process" else "2"}
    load = round(os.getloadavg()[0], 2)  # other work on the machine slows every method
    if method == "original":
        # datasets refuses s3:// data files when offline; these read the local server only.
        env["HF_HUB_OFFLINE"] = "0"
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, __file__, "--child", method], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=log, text=True)
    if result.returncode != 0:
        sys.exit(f"{method} failed; see {log_path}:\n{Path(log_path).read_text()[-3000:]}")
    return {**json.loads(result.stdout.splitlines()[-1]), "load_average_before": load}


def child(method):
    """Runs in the measured process: libraries are imported before the clock starts."""
    sys.path.insert(0, str(ROOT))
    sys.argv = [str(ROOT / "pretokenize.py"), "--max-seq-length", str(MAX_SEQ_LENGTH)]
    import datasets  # noqa: F401
    import pyarrow  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401 - imports most of transformers

    import common
    import pretokenize

    settings = common.parse_settings("", pretokenize.SETTINGS)
    bucket = common.open_bucket(settings)
    shards = common.require_complete(bucket, common.standardized_prefix(DATASET),
                                     "import-dataset.py")["shards"]
    keys = [f"{common.standardized_prefix(DATASET)}/{shard['path']}" for shard in shards]
    if method in ("ours", "one_process"):
        import cProfile

        profile = cProfile.Profile() if os.environ.get("BENCH_PROFILE") else None
        with Clock() as clock:
            if profile:
                profile.runcall(pretokenize.main)
            else:
                pretokenize.main()
        if profile:
            profile.dump_stats(os.environ["BENCH_PROFILE"])
        tokens = common.read_manifest(bucket, common.model_ready_location(bucket, settings))["tokens"]
    elif method == "original":
        import pyarrow.compute as pc

        with Clock() as clock:
            dataset = original_method(bucket, keys)
        tokens = pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py()
    else:
        tokenizer = common.load_chat_tokenizer(common.download_model(bucket, MODEL, os.environ[
            "MODEL_CACHE_DIR"]), "model")
        conversations = [conversation for key in keys
                         for batch in common.read_parquet_batches(bucket, key, 10_000)
                         for conversation in batch.column("conversations").to_pylist()]
        texts = tokenizer.apply_chat_template(conversations, tokenize=False)
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        with Clock() as clock:
            encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        tokens = sum(len(e.ids) for e in encodings)
    print(json.dumps({"seconds": clock.wall, "cpu_seconds": clock.cpu, "tokens": tokens}))


class Clock:
    """Wall time, and CPU time of the whole process (every thread) and of the processes it
    starts (the workers, children of multiprocessing's fork server, as sampled every 50 ms)
    while it runs."""

    def __enter__(self):
        import threading

        import psutil

        self.wall, self.cpu, self.descendants = time.perf_counter(), time.process_time(), {}
        self.running = True

        def sample():
            while self.running:
                for process in psutil.Process().children(recursive=True):
                    with contextlib.suppress(psutil.Error):  # (ended meanwhile)
                        self.descendants[process.pid] = sum(process.cpu_times()[:2])
                time.sleep(0.05)

        self.sampler = threading.Thread(target=sample, daemon=True)
        self.sampler.start()
        return self

    def __exit__(self, *exception):
        self.wall = time.perf_counter() - self.wall
        self.running = False
        self.sampler.join()
        self.cpu = time.process_time() - self.cpu + sum(self.descendants.values())


def original_method(bucket, keys):
    """Render `text` with the chat template, tokenize it as the trainer does, save to the bucket."""
    import datasets

    import common

    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tokenizer = common.load_chat_tokenizer(
        common.download_model(bucket, MODEL, os.environ["MODEL_CACHE_DIR"]), "model")
    dataset = datasets.load_dataset("parquet", data_files=[bucket.url(key) for key in keys],
                                    split="train", storage_options=bucket.storage_options)
    dataset = dataset.map(lambda batch: {"text": tokenizer.apply_chat_template(
        batch["conversations"], tokenize=False)}, batched=True, remove_columns=["conversations"])
    dataset = dataset.map(lambda batch: tokenizer(batch["text"], add_special_tokens=False),
                          batched=True, remove_columns=["text"])
    dataset.save_to_disk(bucket.url(f"original/{DATASET}"), storage_options=bucket.storage_options)
    return dataset


# ---------------------------------------------------------------- report


def report(args, data, runs):
    tokens = {method: {r["tokens"] for r in runs[method]} for method in METHODS}
    if len(set.union(*tokens.values())) != 1:
        sys.exit(f"the methods handled different token counts: {tokens}")
    total = runs["ours"][0]["tokens"]
    best = {method: min(r["seconds"] for r in runs[method]) for method in METHODS}
    cpu = {method: min(r["cpu_seconds"] for r in runs[method]) for method in METHODS}
    rate = {method: total / best[method] for method in METHODS}
    targets = {"ours_vs_one_process": PROCESSES_TARGET, "ours_vs_original": ORIGINAL_TARGET,
               "ours_vs_limit": LIMIT_TARGET}
    ratios = {name: rate["ours"] / rate[name.split("_vs_")[1]] for name in targets}
    cpu_ratios = {name: cpu[name.split("_vs_")[1]] / cpu["ours"] for name in targets}
    met = {name: ratios[name] >= target for name, target in targets.items()}
    results = {
        "benchmark": "pretokenize_throughput",
        "command": f"bench/pretokenize_throughput.py --rows {args.rows} --repeats {args.repeats} "
                   f"--shard-size {args.shard_size}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {p: metadata.version(p) for p in PACKAGES},
        "data": {**{k: v for k, v in data.items() if k != "path"}, "tokens": total,
                 "tokenizer": "Qwen/Qwen2.5-0.5B (fixtures)"},
        "seconds": {method: [round(r["seconds"], 3) for r in runs[method]] for method in METHODS},
        "cpu_seconds": {method: [round(r["cpu_seconds"], 3) for r in runs[method]]
                        for method in METHODS},
        "load_average_before": {method: [r["load_average_before"] for r in runs[method]]
                                for method in METHODS},
        "tokens_per_s": {method: round(rate[method]) for method in METHODS},
        "tokens_per_cpu_s": {method: round(total / cpu[method]) for method in METHODS},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "cpu_ratios": {k: round(v, 3) for k, v in cpu_ratios.items()},
        "targets": targets,
        "met": met,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{data['rows']} conversations, {total} tokens, {os.cpu_count()} CPUs "
          f"(best of {args.repeats})")
    print(f"{'method':<12} {'seconds':>8} {'tokens/s':>10} {'CPU s':>8} {'tokens/CPU s':>13}")
    for method in METHODS:
        print(f"{method:<12} {best[method]:>8.1f} {rate[method]:>10,.0f} {cpu[method]:>8.1f} "
              f"{total / cpu[method]:>13,.0f}")
    for name, target in targets.items():
        print(f"{name.replace('_vs_', ' / '):<20} {ratios[name]:.2f} (target >= {target}: "
              f"{'met' if met[name] else 'MISSED'}); per CPU second: {cpu_ratios[name]:.2f}")
    print(f"results in {output}")


if __name__ == "__main__":
    main()
