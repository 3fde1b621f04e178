#!/usr/bin/env bash
# The pipeline on a real GPU, in one go, from the repository root:
#
#   bash bench/gpu_proof.sh                     # on the GPU machine (no network needed)
#   GPU_PROOF_SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu_proof.sh   # every line, on a CPU
#
# What it needs beside the repository, both git-ignored, carried to the GPU machine:
#   python bench/offline_wheels.py            # .whl/: the packages the image lacks (~20 MiB)
#   mkdir -p .fixtures/tokenizers && cp -r ../shared/fixtures/tokenizers/qwen2.5-0.5b .fixtures/tokenizers/
#
# 1. install the wheels in .whl/ (bench/offline_wheels.py) if there are any; print the versions
#    and nvidia-smi;
# 2. start a local S3 server (moto, 127.0.0.1) with a bucket (should that fail, the runs below
#    use a local-directory bucket, so that training is still proved);
# 3. make a model of the true Qwen2.5-0.5B shape (random bf16 weights, the real Qwen2.5
#    tokenizer from $FIXTURES_DIR/tokenizers/qwen2.5-0.5b) and a few thousand synthetic
#    conversations (demo/synthetic.py);
# 4. run allatonce.yaml's run block with TRAIN_BACKEND=unsloth into s3://proof/unsloth, kill it
#    once a checkpoint is named in latest.json, run it again (it resumes), and check the done
#    manifest: complete, the merge check passed, the fused model generated;
# 5. the same with TRAIN_BACKEND=peft into s3://proof/peft;
# 6. bench/gpu_train.py: tokens/s, MFU and peak GPU memory, unsloth vs peft on the Qwen2.5-0.5B
#    shape, with a profile of each (GPU_TRAIN_ARGS: other configurations, e.g. the 7B ones);
# 7. fp16 with loss scaling (T4, V100), forced on this GPU, with each backend: the loss of
#    chosen steps made inf, as an overflow makes it; the steps the scaler skipped, the logged
#    losses (inf on those steps, finite after them) and loss scales, and the schedule checked;
# 8. QLoRA (LOAD_IN_4BIT=1) with each backend into s3://proof/qlora (RUN_NAME=qlora-BACKEND),
#    each killed once a checkpoint is named, resumed and exported (unsloth's in a fresh process,
#    as every unsloth run exports) and its done manifest checked (fused/'s evaluation loss
#    beside the 4-bit model's); then the export's logits check on the peft run's outputs with
#    the GPU capped (max_memory) so that part of the base is offloaded to RAM;
# 9. the 4-bit peak GPU memory of the 8B shape (Llama-3.1-8B's: hidden 4096, 32 layers, MLP
#    14336, vocabulary 128256, 8 KV heads; random bf16 weights) with each backend at the step's
#    defaults (batch 2 of 4096 tokens, LoRA r 16 on every projection), two optimizer steps.
#
# PARTS="gpu_train peft ..." runs only those of 4 to 9, in that order (1 to 3 always run);
# EXTRA_SETTINGS="MAX_STEPS=4 ..." changes the runs' settings; KILL=0 runs them once, unkilled.
# GPU_TRAIN_ARGS="--budget 360" replaces 6's arguments, GPU_TRAIN_LIMIT=400 its seconds (200).
#
# Each part runs on its own with a time limit, all of them within PROOF_BUDGET seconds: a part
# that fails prints the tail of its log and the next one runs. Results go to $OUT (default
# ./gpu-proof-out): summary.txt (a line per part: passed/FAILED/skipped, seconds), setup.log,
# moto.log, unsloth.log, peft.log, gpu_train.log, gpu_train.json, fp16.log, fp16.json,
# qlora.log, peak8b.log, peak8b.json.
#
# GPU_PROOF_SMOKE=1 (no CUDA): the tiny model and tokenizer of demo/synthetic.py and fewer rows;
# the unsloth part trains with peft; no 6; 7 with peft alone, on the CPU with torch's CPU loss
# scaler; 8 with peft alone, not in 4-bit, and the logits check without a GPU to cap; 9 on a
# tiny Llama, not in 4-bit, measuring nothing: every line of the script runs, the GPU's figures
# do not.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=$(realpath -m "${OUT:-./gpu-proof-out}")
SMOKE=${GPU_PROOF_SMOKE:-0}
PYTHON=$(command -v "${PYTHON:-python3}")
WHEELS=${WHEELS:-.whl}
PROOF_BUDGET=${PROOF_BUDGET:-450}  # seconds for all the parts together
export FIXTURES_DIR=$(realpath -m "${FIXTURES_DIR:-.fixtures}")
WORK=$(mktemp -d /tmp/gpu-proof.XXXXXX)
mkdir -p "$OUT"
: > "$OUT/summary.txt"

# The pipeline's settings in both runs, one line each (the run block reads them from the
# environment); then each run's own. A later NAME=VALUE of the same name wins.
SETTINGS=(
  DATASET_NAME=proof/colors
  MODEL_NAME=proof/qwen2.5-0.5b-shape
  SHARD_SIZE=2000
  MAX_SEQ_LENGTH=1024
  MAX_STEPS=30
  SAVE_STEPS=10
  LOGGING_STEPS=5
  "SAMPLE_PROMPT=The apple is red. What color is the apple?"
  EVAL_ROWS=100
)
SETTINGS+=(${EXTRA_SETTINGS:-})
ROWS=${ROWS:-4000}  # synthetic conversations: two shards
if [ "$SMOKE" = 1 ]; then
  SETTINGS+=(MODEL_NAME=proof/tiny-qwen2 SHARD_SIZE=300 MAX_SEQ_LENGTH=256 MAX_STEPS=20 SAVE_STEPS=3 EVAL_ROWS=20)
  ROWS=600
fi
UNSLOTH_RUN=(BUCKET_NAME=s3://proof/unsloth TRAIN_BACKEND=unsloth)
PEFT_RUN=(BUCKET_NAME=s3://proof/peft TRAIN_BACKEND=peft)
BACKENDS="peft unsloth"  # of 7 to 9, in this order (a part stops at its first failure)
# Nothing from the Hub, no usage statistics: the machine has no network.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 HF_HOME="$WORK/hf"
export PYTHONUNBUFFERED=1 AWS_ACCESS_KEY_ID=proof-key AWS_SECRET_ACCESS_KEY=proof-secret AWS_REGION=auto
export WORK OUT PYTHON WHEELS SMOKE ROWS

# A run block started in a session of its own (to be killed with all it started) that is still
# there after its part (a part stopped by its time limit): it must not train beside the next.
stop_runs() {
  [ -f "$WORK/runs" ] && while read -r pid; do kill -KILL -- "-$pid" 2>/dev/null; done < "$WORK/runs"
  rm -f "$WORK/runs"
}
cleanup() {
  stop_runs
  [ -f "$WORK/moto.pid" ] && kill "$(cat "$WORK/moto.pid")" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# part NAME LOG SECONDS COMMAND: run COMMAND (a function of this file, with set -e) with its
# output appended to $OUT/LOG, for at most SECONDS (less when the budget runs out); note
# passed/FAILED and its seconds in summary.txt, and print the tail of the log if it failed.
BUDGET_END=$((SECONDS + PROOF_BUDGET))
part() {
  local name=$1 log=$OUT/$2 limit=$3 started=$SECONDS status
  [ $((BUDGET_END - SECONDS)) -lt "$limit" ] && limit=$((BUDGET_END - SECONDS))
  if [ "$limit" -lt 10 ]; then
    note "$name" skipped "PROOF_BUDGET=$PROOF_BUDGET s is spent"
    return
  fi
  echo "== $name (at most ${limit}s)" | tee -a "$log"
  # A fresh bash runs it (so that `timeout` can end it and all it started), given this file's
  # functions and arrays.
  timeout --kill-after=10 "$limit" bash -c \
    "$(declare -f); $(declare -p SETTINGS UNSLOTH_RUN PEFT_RUN CHECK_DONE BACKENDS); RUN=(); set -euo pipefail; $4" \
    >> "$log" 2>&1
  status=$?
  stop_runs
  if [ "$status" = 0 ]; then
    note "$name" passed "" $((SECONDS - started))
  else
    [ "$status" = 124 ] && echo "== $name: stopped after ${limit}s" >> "$log"
    note "$name" FAILED "exit $status, see $(basename "$log")" $((SECONDS - started))
    tail -n 25 "$log" | sed "s/^/  $name| /"
  fi
}

note() {  # note NAME STATUS WHY [SECONDS]
  printf '%-9s %-7s %4ss  %s\n' "$1" "$2" "${4:-0}" "$3" | tee -a "$OUT/summary.txt"
}

install_wheels() {
  ls -l "$WHEELS"/*.whl
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl
}

versions() {
  "$PYTHON" - <<'EOF'
import platform, sys
from importlib import metadata
import torch

print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "bf16", torch.cuda.is_bf16_supported())
for name in ("transformers", "trl", "peft", "accelerate", "datasets", "unsloth", "unsloth_zoo",
             "bitsandbytes", "triton", "s3fs", "fsspec", "aiobotocore", "botocore", "boto3", "moto",
             "flask", "werkzeug", "cryptography", "cffi", "aiohttp", "python-dateutil", "urllib3",
             "requests", "pyarrow", "huggingface_hub", "tokenizers", "safetensors", "numpy"):
    try:
        dist = metadata.distribution(name)
        print(f"{name:16} {dist.version:14} {dist.locate_file('')}")
    except metadata.PackageNotFoundError:
        print(f"{name:16} absent")
EOF
  echo "pip check, version conflicts only (what is absent on purpose is left out):"
  "$PYTHON" -m pip check 2>&1 | grep -v "which is not installed" || true
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not here"; fi
  source torch-for-driver.sh
  local driver capability
  driver=$(nvidia_query driver_version)
  capability=$(nvidia_query compute_cap)
  echo "setup's torch for this driver (${driver:-none}) and GPU (compute capability" \
    "${capability:-none}): $(cuda_line "$driver" "$capability")"
}

# A moto server on a free loopback port, in the background until the end, and its bucket, then
# a round trip through the steps' own Bucket (s3fs). Only then is $WORK/endpoint written: without
# it the runs use a local-directory bucket, so that a broken S3 stack still lets training be proved.
start_s3() {
  "$PYTHON" - "$WORK/server" > "$OUT/moto.log" 2>&1 <<'EOF' &
import logging, os, sys, threading
from moto.server import ThreadedMotoServer

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"http://{host}:{port}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
print(f"moto S3 server at http://{host}:{port}", flush=True)
threading.Event().wait()
EOF
  local server=$!
  echo "$server" > "$WORK/moto.pid"
  for _ in $(seq 60); do
    [ -f "$WORK/server" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$OUT/moto.log"; return 1; }
    sleep 1
  done
  BUCKET_NAME=s3://proof AWS_ENDPOINT_URL_S3="$(cat "$WORK/server")" "$PYTHON" - <<'EOF'
import os, boto3
from common import open_bucket, parse_settings

endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")  # moto: not "auto"
s3.create_bucket(Bucket="proof")
print("bucket", [bucket["Name"] for bucket in s3.list_buckets()["Buckets"]], "at", endpoint)
bucket = open_bucket(parse_settings("", [], []))
bucket.put("hello.txt", b"hello")
assert bucket.get("hello.txt") == b"hello", bucket.get("hello.txt")
bucket.fs.rm(bucket.path("hello.txt"))
print("put, get and rm through s3fs (the steps' Bucket): fine")
EOF
  cp "$WORK/server" "$WORK/endpoint"
}

# The model and the conversations the runs import instead of the Hub's.
make_inputs() {
  "$PYTHON" - "$WORK/inputs" <<'EOF'
import os, sys
from pathlib import Path

sys.path[:0] = [".", "bench"]
from demo import synthetic

out, rows = Path(sys.argv[1]), int(os.environ["ROWS"])
print("conversations:", synthetic.write_datasets(out / "datasets", n=rows)["sharegpt"], rows, "rows")
if os.environ["SMOKE"] == "1":
    synthetic.make_tokenizer(out / "tokenizer")
    synthetic.make_model(out / "model", out / "tokenizer")
else:
    import gpu_train  # the 0.5B shape from FIXTURES_DIR, random bf16 weights, the real tokenizer

    if not (gpu_train.SHAPE / "config.json").exists():
        sys.exit(f"{gpu_train.SHAPE}/config.json is absent: carry .fixtures/ (see the top of this file)")
    gpu_train.make_model(out / "model")
print("model:", sorted(path.name for path in (out / "model").iterdir()))
EOF
}

# run_settings NAME SETTINGS...: RUN=(the environment of run NAME: the common settings, SETTINGS,
# the inputs, scratch directories of its own, and the S3 server or, without one, a local bucket).
run_settings() {
  local name=$1
  shift
  RUN=("${SETTINGS[@]}" "$@" "DATASET_SOURCE=$WORK/inputs/datasets/sharegpt.jsonl"
       "MODEL_SOURCE=$WORK/inputs/model" "VENV=$WORK/venv" "WORK_DIR=$WORK/$name/work"
       "MODEL_CACHE_DIR=$WORK/$name/models"
       "EXPECT_DEVICE=$([ "$SMOKE" = 1 ] && echo cpu || echo cuda)")
  if [ -f "$WORK/endpoint" ]; then
    RUN+=("AWS_ENDPOINT_URL_S3=$(cat "$WORK/endpoint")")
  else
    echo "== no S3 server (see the s3 part in setup.log): the bucket is a local directory"
    RUN+=("BUCKET_NAME=$WORK/buckets/${name%%-*}")  # (the qlora-* runs share one)
  fi
  mkdir -p "$WORK/$name"
}

# pipeline NAME SETTINGS...: allatonce.yaml's run block, killed once a checkpoint is named in
# latest.json, then run again (it resumes) to the end; then the done manifest is checked.
# BLOCK=dotrain: dotrain.py alone, on data an earlier run left in the bucket.
pipeline() {
  local name=$1
  shift
  run_settings "$name" "$@"
  if [ "${BLOCK:-run}" = dotrain ]; then  # the data are in the bucket already: dotrain.py alone
    printf 'source "$VENV/bin/activate"\npython dotrain.py\n' > "$WORK/run.sh"
  else
    "$PYTHON" -c 'import yaml; print(yaml.safe_load(open("allatonce.yaml"))["run"])' > "$WORK/run.sh"
  fi
  [ "${KILL:-1}" = 1 ] && env "${RUN[@]}" "$PYTHON" - <<'PY'
import json, os, signal, subprocess, sys, time
from common import checkpoints_prefix, open_bucket, parse_settings

bucket = open_bucket(parse_settings("", [], []))
key = checkpoints_prefix(os.environ["MODEL_NAME"], os.environ["DATASET_NAME"], os.environ.get("RUN_NAME")) \
    + "/latest.json"
block = subprocess.Popen(["bash", os.environ["WORK"] + "/run.sh"], start_new_session=True)
with open(os.environ["WORK"] + "/runs", "a") as runs:
    runs.write(f"{block.pid}\n")
while block.poll() is None:
    pointer = bucket.get(key)
    if pointer:
        print(f"== latest.json names {json.loads(pointer)['checkpoint']}: killing the run", flush=True)
        os.killpg(block.pid, signal.SIGKILL)
        sys.exit(0)
    time.sleep(0.2)
sys.exit(f"== the run ended (exit {block.returncode}) before latest.json named a checkpoint")
PY
  echo "== the run block again: it resumes (KILL=0: it runs once, to the end)"
  env "${RUN[@]}" bash "$WORK/run.sh" 2>&1 | tee "$WORK/$name/resumed.log"
  [ "${KILL:-1}" = 0 ] || grep -q "resuming at step" "$WORK/$name/resumed.log"
  env "${RUN[@]}" "$PYTHON" -c "$CHECK_DONE"
}

# The done manifest of the run in the environment: complete, trained where expected (in 4-bit
# with LOAD_IN_4BIT=1), the merge check passed, fused/'s evaluation loss measured, the fused
# model generated.
CHECK_DONE='
import json, os
from common import done_prefix, open_bucket, parse_settings, read_manifest

bucket = open_bucket(parse_settings("", [], []))
prefix = done_prefix(os.environ["MODEL_NAME"], os.environ["DATASET_NAME"], os.environ.get("RUN_NAME"))
done = read_manifest(bucket, prefix)
metrics = json.loads(bucket.get(f"{prefix}/metrics.json"))
print(json.dumps({key: done.get(key) for key in ("complete", "rows", "total_steps", "tokens_seen",
                                                   "backend", "check", "eval_loss", "sample")}, indent=1))
print("training:", {key: metrics[key] for key in ("device", "training_seconds", "trained_tokens",
                                                  "work_dir_peak_bytes", "speed")},
      "tokens/s at each log:", [step["tokens_per_second"] for step in metrics["steps"]])
for folder in ("lora_model", "fused"):
    print(f"{folder}/:", sorted(path.rsplit("/", 1)[-1]
                                for path in bucket.fs.ls(bucket.path(f"{prefix}/{folder}"), detail=False)))
assert done["complete"], "the done manifest is not complete"
assert done["backend"] == os.environ["TRAIN_BACKEND"], "trained with " + done["backend"]
assert metrics["device"] == os.environ["EXPECT_DEVICE"], "trained on " + metrics["device"]
assert done["inputs"]["load_in_4bit"] == (os.environ.get("LOAD_IN_4BIT") == "1"), done["inputs"]
check = done["check"]
assert check["distance_over_effect"] <= check["tolerance"], "the merge check failed"
assert done["eval_loss"]["after_fused"] > 0, done["eval_loss"]
assert isinstance(done["sample"]["completion"], str), "the fused model generated nothing"
print("done manifest complete, merge check passed, fused/ evaluated, the fused model generated")
'

# fp16 with loss scaling, as on a T4 or V100, forced on this GPU with each backend (a process
# each: unsloth patches transformers). The loss of steps 3 and 6 is made inf, as an overflow
# makes it: the steps the scaler skipped are recorded and each halves the loss scale, the
# logged losses are inf on those steps only, and the schedule stays on the step count.
# A line each in $OUT/fp16.json.
fp16() {
  local backend
  for backend in $BACKENDS; do
    echo "== fp16, $backend"
    "$PYTHON" - "$backend" "$WORK/inputs/model" "$WORK/fp16-$backend" "$OUT/fp16.json" <<'PY'
import importlib.util, json, math, sys, time
from pathlib import Path
from types import SimpleNamespace

import torch

name, model_dir, work, results = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
cuda = torch.cuda.is_available()
if name == "unsloth":
    import unsloth  # noqa: F401 - before transformers, trl and peft, which it patches
sys.path[:0] = ["."]
import datasets
import dotrain
from training.precision import skipped_steps
from training.processes import Ranks
from training.shards import UnitRecord, prepare

OVERFLOW, STEPS = {3, 6}, 8
settings = SimpleNamespace(seed=3407, lora_r=16, lora_alpha=16, lora_dropout=0.0, lora_targets="all-linear",
                           learning_rate=2e-4, lr_scheduler="linear", batch_size=2, grad_accum=2,
                           warmup_steps=2, weight_decay=0.01, max_seq_length=1024, packing=True,
                           save_steps=10**9, logging_steps=1, report_to="none")
optim = "adamw_8bit" if cuda and importlib.util.find_spec("bitsandbytes") else "adamw_torch"
backend = dotrain.Backend(name, "cuda" if cuda else "cpu", "float16", optim)


class Overflowing(dotrain.shard_trainer_class(backend)):
    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * math.inf if self.state.global_step + 1 in OVERFLOW else loss


backend.trainer_class = Overflowing
model, tokenizer = dotrain.load_for_training(settings, backend, model_dir, Ranks())
generator = torch.Generator().manual_seed(0)
ids = [torch.randint(0, model.config.vocab_size, (int(length),), generator=generator).tolist()
       for length in torch.randint(64, 1024, (80,), generator=generator)]
rows = prepare(datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}), True, 1024)
records = {"0": UnitRecord()}
trainer = dotrain.make_trainer(settings, backend, model, tokenizer, rows, SimpleNamespace(trainer=str(work)),
                               STEPS, [skipped_steps(records, records["0"], 0.05)])
if not cuda:  # (accelerate gives fp16 on the CPU no loss scaler: torch's CPU one is the same mechanism)
    trainer.accelerator.scaler, trainer.accelerator.native_amp = torch.amp.GradScaler("cpu"), True
trainer.shard, trainer.seconds = 0, time.perf_counter
trainer.train()
logged = [entry for entry in trainer.state.log_history if "loss" in entry]
result = {"backend": name, "device": backend.device, "model_dtype": str(model.dtype),
          "steps": trainer.state.global_step, "schedule_steps": trainer.lr_scheduler.last_epoch,
          "overflowed_steps": sorted(OVERFLOW), "skipped_steps": records["0"].skipped_steps or [],
          "losses": [entry["loss"] for entry in logged], "loss_scales": [entry["loss_scale"] for entry in logged]}
print(json.dumps(result))
with open(results, "a") as f:
    f.write(json.dumps(result) + "\n")
scales = [65536.0, *result["loss_scales"]]  # (GradScaler's first scale)
halved = [step for step in range(1, len(scales)) if scales[step] == scales[step - 1] / 2]
assert OVERFLOW <= set(result["skipped_steps"]) and halved == result["skipped_steps"], (halved, result)
assert [not math.isfinite(loss) for loss in result["losses"]] == [entry["step"] in OVERFLOW for entry in logged]
assert result["steps"] == result["schedule_steps"] == STEPS, "the schedule lags the steps"
print(f"fp16 with loss scaling ({name}): skipped steps {result['skipped_steps']} counted, their losses "
      "logged as inf, the schedule on the step count")
PY
  done
}

# QLoRA with each backend, both on the data of one bucket: each run killed once a checkpoint is
# named, resumed and exported (see pipeline); after the peft one, the export's logits check on
# its outputs with the base partly offloaded to RAM. Smoke: 16-bit (no CUDA).
qlora() {
  local backend block=run
  for backend in $BACKENDS; do
    echo "== QLoRA, $backend"
    BLOCK=$block pipeline "qlora-$backend" BUCKET_NAME=s3://proof/qlora "TRAIN_BACKEND=$backend" \
      "RUN_NAME=qlora-$backend" "LOAD_IN_4BIT=$([ "$SMOKE" = 1 ] && echo 0 || echo 1)" MAX_STEPS=4 SAVE_STEPS=2 \
      LEARNING_RATE=1e-3
    block=dotrain  # the first run imported and pretokenized the data
    if [ "$backend" = peft ]; then
      offloaded_check qlora-peft
    fi
  done
}

# offloaded_check RUN: the export's logits check on RUN's lora_model/ and fused/, the GPU capped
# at 300 MiB so that most of the base (the 0.5B shape's 1 GB) is offloaded to RAM.
offloaded_check() {
  echo "== the logits check of $1's export, the base partly offloaded to RAM"
  run_settings "$1" BUCKET_NAME=s3://proof/qlora "RUN_NAME=$1"
  env "${RUN[@]}" "$PYTHON" - "$WORK/inputs/model" "$WORK/$1/check" <<'PY'
import json, os, sys

import torch

from common import (DATA_SETTINGS, Setting, done_prefix, model_ready_location, open_bucket,
                    parse_settings, read_manifest)
from training import export

model_dir, local = sys.argv[1:]
settings = parse_settings("", [Setting("MODEL_NAME"), Setting("DATASET_NAME"), *DATA_SETTINGS], [])
bucket = open_bucket(settings)
prefix = done_prefix(settings.model_name, settings.dataset_name, os.environ["RUN_NAME"])
for folder in ("lora_model", "fused"):
    os.makedirs(f"{local}/{folder}")
    for path in bucket.fs.ls(bucket.path(f"{prefix}/{folder}"), detail=False):
        name = path.rsplit("/", 1)[-1]
        bucket.download(f"{prefix}/{folder}/{name}", f"{local}/{folder}/{name}")
data_prefix = model_ready_location(bucket, settings)
examples, _ = export.check_examples(bucket, data_prefix, read_manifest(bucket, data_prefix), None)  # held-out rows
cap = {0: "300MiB", "cpu": "64GiB"} if torch.cuda.is_available() else {"cpu": "8GiB"}  # (smoke: no GPU)
check, _ = export.check_logits(model_dir, f"{local}/lora_model", f"{local}/fused", examples, max_memory=cap)
print(json.dumps(check))
assert "cpu" in check.get("devices", []) or not torch.cuda.is_available(), check
print("the logits check passed with the base offloaded to RAM")
PY
}

# The 8B shape's peak GPU memory in 4-bit with each backend: Llama-3.1-8B's config (hidden 4096,
# 32 layers, MLP 14336, vocabulary 128256, 32 heads, 8 KV heads), random bf16 weights written
# once (~16 GB), the tiny tokenizer; two optimizer steps at the step's defaults (batch 2 of
# 4096 packed tokens, LoRA r 16 on every projection, gradient checkpointing, 8-bit AdamW).
# A line each in $OUT/peak8b.json. Smoke: a tiny Llama, not in 4-bit, nothing measured.
peak8b() {
  echo "== writing the 8B shape"
  "$PYTHON" - "$WORK/llama8b" <<'PY'
import sys, time

import torch

sys.path[:0] = [".", "demo"]
import synthetic
from transformers import AutoModelForCausalLM, LlamaConfig

began, out = time.time(), sys.argv[1]
cuda = torch.cuda.is_available()
tokenizer = synthetic.make_tokenizer(out)
shape = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=128256,
             num_attention_heads=32, num_key_value_heads=8) if cuda else \
    dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=1024, num_attention_heads=4,
         num_key_value_heads=2)
config = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
torch.manual_seed(0)
with torch.device("cuda" if cuda else "cpu"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(out, max_shard_size="5GB")
print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters written in {time.time() - began:.0f} s")
PY
  local backend
  for backend in $BACKENDS; do
    echo "== the 8B shape in 4-bit, $backend"
    "$PYTHON" - "$backend" "$WORK/llama8b" "$WORK/peak8b-$backend" "$OUT/peak8b.json" <<'PY'
import importlib.util, json, sys, time
from types import SimpleNamespace

import torch

name, model_dir, work, results = sys.argv[1:]
cuda = torch.cuda.is_available()
if name == "unsloth":
    import unsloth  # noqa: F401 - before transformers, trl and peft, which it patches
sys.path[:0] = ["."]
import datasets
import dotrain
from training.processes import Ranks
from training.shards import prepare

began, length = time.time(), 4096 if cuda else 64
settings = SimpleNamespace(seed=3407, lora_r=16, lora_alpha=16, lora_dropout=0.0, lora_targets="all-linear",
                           learning_rate=2e-4, lr_scheduler="linear", batch_size=2, grad_accum=1,
                           warmup_steps=0, weight_decay=0.01, max_seq_length=length, packing=True,
                           save_steps=10**9, logging_steps=1, report_to="none")
optim = "adamw_8bit" if cuda and importlib.util.find_spec("bitsandbytes") else "adamw_torch"
backend = dotrain.Backend(name, "cuda" if cuda else "cpu", "bfloat16" if cuda else "float32", optim,
                          load_in_4bit=cuda)
backend.trainer_class = dotrain.shard_trainer_class(backend)
model, tokenizer = dotrain.load_for_training(settings, backend, model_dir, Ranks())
loaded = time.time()
weights = torch.cuda.memory_allocated() if cuda else None
generator = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (4, length), generator=generator).tolist()
rows = prepare(datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}), True, length)
trainer = dotrain.make_trainer(settings, backend, model, tokenizer, rows, SimpleNamespace(trainer=work), 2)
trainer.shard, trainer.seconds = 0, time.perf_counter
if cuda:
    torch.cuda.reset_peak_memory_stats()
trainer.train()
peaks = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else (None, None)
gib = lambda value: None if value is None else round(value / 2**30, 2)  # noqa: E731
result = {"backend": name, "gpu": torch.cuda.get_device_name() if cuda else None,
          "load_in_4bit": backend.load_in_4bit, "optim": optim, "tokens_per_step": 2 * length,
          "layers": model.config.num_hidden_layers, "vocab_size": model.config.vocab_size,
          "weights_gib": gib(weights), "peak_allocated_gib": gib(peaks[0]), "peak_reserved_gib": gib(peaks[1]),
          "embeddings_dtype": str(model.get_input_embeddings().weight.dtype),
          "output_layer_dtype": str(model.get_output_embeddings().weight.dtype),
          "load_seconds": round(loaded - began), "train_seconds": round(time.time() - loaded)}
print(json.dumps(result))
with open(results, "a") as f:
    f.write(json.dumps(result) + "\n")
if cuda:  # the embeddings and output layer stay 16-bit on the 4-bit base (not float32)
    assert result["embeddings_dtype"] == result["output_layer_dtype"] == "torch.bfloat16", result
PY
  done
}

gpu_train() {
  "$PYTHON" bench/gpu_train.py ${GPU_TRAIN_ARGS:---configs peft_packed,unsloth_packed --budget 190} \
    --output "$OUT/gpu_train.json"
}

# The run block activates $VENV: here, one whose python is $PYTHON.
mkdir -p "$WORK/venv/bin"
printf '#!/bin/sh\nexec %s "$@"\n' "$PYTHON" > "$WORK/venv/bin/python"
chmod +x "$WORK/venv/bin/python"
echo "PATH=\"$WORK/venv/bin:\$PATH\"" > "$WORK/venv/bin/activate"

echo "== gpu_proof $(date '+%F %T'), OUT=$OUT, PROOF_BUDGET=${PROOF_BUDGET}s, GPU_PROOF_SMOKE=$SMOKE"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  part install setup.log 90 install_wheels
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
  note install skipped "no wheels in $WHEELS"
fi
part versions setup.log 45 versions
part s3 setup.log 45 start_s3
part inputs setup.log 90 make_inputs
if [ "$SMOKE" = 1 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  UNSLOTH_RUN+=(TRAIN_BACKEND=peft)  # no CUDA: the same lines, trained with peft
  BACKENDS=peft
fi
for name in ${PARTS:-unsloth peft gpu_train fp16 qlora peak8b}; do
  case "$SMOKE $name" in
    *" unsloth") part unsloth unsloth.log 200 "pipeline unsloth ${UNSLOTH_RUN[*]@Q}" ;;
    *" peft") part peft peft.log 150 "pipeline peft ${PEFT_RUN[*]@Q}" ;;
    *" fp16") part fp16 fp16.log 150 fp16 ;;
    *" qlora") part qlora qlora.log 360 qlora ;;
    *" peak8b") part peak8b peak8b.log 300 peak8b ;;
    "1 "*) note "$name" skipped "GPU_PROOF_SMOKE=1" ;;
    *" gpu_train") part gpu_train gpu_train.log "${GPU_TRAIN_LIMIT:-200}" gpu_train ;;
  esac
done
echo "== summary: ${SECONDS}s in all; logs in $OUT"
cat "$OUT/summary.txt"
