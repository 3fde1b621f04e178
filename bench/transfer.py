"""Benchmark: upload and download throughput of a model's files, ours against `aws s3 sync`.

    .venv/bin/python bench/transfer.py [--size-gb 2] [--files 4] [--output FILE]

Writes a model-sized directory (a few large safetensors-like files of random bytes and a
config), starts a local S3 server (moto, in a process of its own, everything in memory), and
times in the same run:
- ours, up: import-model.py with MODEL_SOURCE set to the directory (hashes, uploads in
  parallel, checks each object's size, writes the manifest);
- ours, down: common.download_model into an empty cache (downloads in parallel, checks each
  file's sha256 against the manifest);
- `aws s3 sync` of the same directory up, then down into an empty directory.
Target: ours at least as fast as `aws s3 sync`, each way. The CPU seconds of each command
are recorded too (steadier than wall times on a shared machine). Results go to
bench/results/transfer.json.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "transfer.json"
BUCKET = "bench-bucket"
MODEL_NAME = "bench/model"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "FAKEKEYID0123456789", "AWS_SECRET_ACCESS_KEY": "fake-secret-4f9c2e7b1a"}
DOWNLOAD = ("import sys; sys.path.insert(0, sys.argv[1]); from common import *; "
            "s = parse_settings('', [], []); download_model(open_bucket(s), sys.argv[2], sys.argv[3])")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="total size of the files (default 2)")
    parser.add_argument("--files", type=int, default=4, help="how many weight files (default 4)")
    parser.add_argument("--output", default=str(RESULTS), help="where the results go")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as work:
        work = Path(work)
        size = make_model_dir(work / "model", int(args.size_gb * 1e9), args.files)
        with moto_server() as endpoint:
            env = bench_env(endpoint, work)
            runs = {
                "ours_up": timed([sys.executable, "import-model.py"],
                                 {**env, "MODEL_NAME": MODEL_NAME, "MODEL_SOURCE": str(work / "model")}),
                "aws_up": timed([aws(), "s3", "sync", "--only-show-errors", str(work / "model"),
                                 f"s3://{BUCKET}/aws/"], env),
                "ours_down": timed([sys.executable, "-c", DOWNLOAD, str(ROOT), MODEL_NAME,
                                    str(work / "down-cache")], env),
                "aws_down": timed([aws(), "s3", "sync", "--only-show-errors", f"s3://{BUCKET}/aws/",
                                   str(work / "aws-down")], env),
            }
    seconds = {name: wall for name, (wall, _) in runs.items()}
    mb_per_s = {name: round(size / 1e6 / value, 1) for name, value in seconds.items()}
    met = {"up": seconds["ours_up"] <= seconds["aws_up"], "down": seconds["ours_down"] <= seconds["aws_down"]}
    results = {
        "benchmark": "transfer", "command": "bench/transfer.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "bytes": size, "files": args.files + 1,
        "seconds": {k: round(v, 2) for k, v in seconds.items()}, "mb_per_s": mb_per_s,
        "cpu_seconds": {name: round(cpu, 2) for name, (_, cpu) in runs.items()},
        "met": met,
        "table": [{"benchmark": f"transfer {way} ({size / 1e9:.1f} GB, moto)",
                   "figure": f"ours {mb_per_s[f'ours_{way}']} MB/s, aws s3 sync {mb_per_s[f'aws_{way}']} MB/s",
                   "target": "ours >= aws s3 sync", "met": met[way]} for way in ("up", "down")],
        "machine": {"cpu_count": os.cpu_count()},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({key: results[key] for key in ("seconds", "cpu_seconds", "table")}, indent=1))
    print(f"results in {output}")


def make_model_dir(path, size, files):
    """Weight files of random bytes (incompressible, like weights) and a config; total bytes."""
    path.mkdir(parents=True)
    block = 64 * 2**20
    for index in range(files):
        with open(path / f"model-{index + 1:05d}-of-{files:05d}.safetensors", "wb") as f:
            left = size // files
            while left > 0:
                f.write(os.urandom(min(block, left)))
                left -= block
    (path / "config.json").write_text(json.dumps({"model_type": "bench"}))
    return sum(p.stat().st_size for p in path.iterdir())


class moto_server:
    """A moto S3 server in a process of its own (so that its work does not share this
    process's interpreter lock with the clients), with the bench bucket."""

    def __enter__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                                         "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        deadline = time.time() + 30
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                return endpoint
            except Exception:  # noqa: BLE001 - not listening yet
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait()


def bench_env(endpoint, work):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))}
    return {**clean, **CREDENTIALS, "BUCKET_NAME": BUCKET, "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
            "MODEL_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1"}


def aws():
    return str(Path(sys.executable).parent / "aws")


def timed(command, env):
    """Seconds the command ran, and the CPU seconds it used."""
    began = time.time()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), command)
    return time.time() - began, usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
