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
# 7. the peft backend in fp16 with loss scaling (T4, V100), forced on this GPU;
# 8. QLoRA (LOAD_IN_4BIT=1) with each backend, on the data of 4 and 5 (RUN_NAME=qlora).
#
# PARTS="gpu_train peft ..." runs only those of 4 to 8, in that order (1 to 3 always run);
# EXTRA_SETTINGS="MAX_STEPS=4 ..." changes the runs' settings; KILL=0 runs them once, unkilled.
# GPU_TRAIN_ARGS="--budget 360" replaces 6's arguments, GPU_TRAIN_LIMIT=400 its seconds (200).
#
# Each part runs on its own with a time limit, all of them within PROOF_BUDGET seconds: a part
# that fails prints the tail of its log and the next one runs. Results go to $OUT (default
# ./gpu-proof-out): summary.txt (a line per part: passed/FAILED/skipped, seconds), setup.log,
# moto.log, unsloth.log, peft.log, gpu_train.log, gpu_train.json, extra.log (7 and 8).
#
# GPU_PROOF_SMOKE=1: the tiny model and tokenizer of demo/synthetic.py and fewer rows; the
# unsloth part trains with peft where there is no CUDA; no 6, 7 or 8.
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
    "$(declare -f); $(declare -p SETTINGS UNSLOTH_RUN PEFT_RUN CHECK_DONE); RUN=(); set -euo pipefail; $4" >> "$log" 2>&1
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
  local driver
  driver=$(nvidia_driver)
  echo "setup's torch for this driver (${driver:-none}): $(cuda_line "$driver")"
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
    RUN+=("BUCKET_NAME=$WORK/buckets/${name#qlora-}")
  fi
  mkdir -p "$WORK/$name"
}

# pipeline NAME SETTINGS...: allatonce.yaml's run block, killed once a checkpoint is named in
# latest.json, then run again (it resumes) to the end; then the done manifest is checked.
pipeline() {
  local name=$1
  shift
  run_settings "$name" "$@"
  "$PYTHON" -c 'import yaml; print(yaml.safe_load(open("allatonce.yaml"))["run"])' > "$WORK/run.sh"
  [ "${KILL:-1}" = 1 ] && env "${RUN[@]}" "$PYTHON" - <<'PY'
import json, os, signal, subprocess, sys, time
from common import checkpoints_prefix, open_bucket, parse_settings

bucket = open_bucket(parse_settings("", [], []))
key = checkpoints_prefix(os.environ["MODEL_NAME"], os.environ["DATASET_NAME"]) + "/latest.json"
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

# The done manifest of the run in the environment: complete, trained where expected, the merge
# check passed, the fused model generated.
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
check = done["check"]
assert check["distance_over_effect"] <= check["tolerance"], "the merge check failed"
assert isinstance(done["sample"]["completion"], str), "the fused model generated nothing"
print("done manifest complete, merge check passed, the fused model generated")
'

# dotrain.py with LOAD_IN_4BIT=1 on the data the two runs above left, as runs of their own
# (RUN_NAME): QLoRA with unsloth, then with transformers + peft + bitsandbytes; fused/ is the
# adapter merged into the original 16-bit files.
qlora() {
  local backend
  for backend in unsloth peft; do
    run_settings "qlora-$backend" "BUCKET_NAME=s3://proof/$backend" "TRAIN_BACKEND=$backend" \
      RUN_NAME=qlora LOAD_IN_4BIT=1 MAX_STEPS=12 SAVE_STEPS=6 LEARNING_RATE=1e-3
    echo "== QLoRA, $backend"
    env "${RUN[@]}" "$PYTHON" import-dataset.py  # (nothing to do after the pipeline parts)
    env "${RUN[@]}" "$PYTHON" import-model.py
    env "${RUN[@]}" "$PYTHON" pretokenize.py
    env "${RUN[@]}" "$PYTHON" dotrain.py
    env "${RUN[@]}" "$PYTHON" -c "$CHECK_DONE"
  done
}

# The peft backend in fp16 with loss scaling, as on a T4 or V100, forced on this GPU: the
# schedule stays on the step count through the steps the loss scaler skips.
fp16() {
  "$PYTHON" - "$WORK/inputs/model" "$WORK/fp16" <<'PY'
import importlib.util, json, math, sys, time
from pathlib import Path
from types import SimpleNamespace

sys.path[:0] = [".", "bench"]
import datasets
import dotrain, gpu_train
from training.processes import Ranks
from training.shards import prepare

model_dir, work = sys.argv[1], Path(sys.argv[2])
work.mkdir(parents=True)
settings = SimpleNamespace(seed=3407, lora_r=16, lora_alpha=16, lora_dropout=0.0, lora_targets="all-linear",
                           learning_rate=2e-4, lr_scheduler="linear", batch_size=2, grad_accum=4,
                           warmup_steps=5, weight_decay=0.01, max_seq_length=4096, packing=True,
                           save_steps=10**9, logging_steps=1, report_to="none")
ranks = Ranks()
optim = "adamw_8bit" if importlib.util.find_spec("bitsandbytes") else "adamw_torch"
backend = dotrain.Backend("peft", "cuda", "float16", optim)
backend.trainer_class = dotrain.shard_trainer_class(backend, ranks)
model, tokenizer = dotrain.load_for_training(settings, backend, model_dir, ranks)
gpu_train.make_rows(work / "rows.parquet", 400)
rows = prepare(datasets.Dataset.from_parquet(str(work / "rows.parquet")), True, 4096)
trainer = dotrain.make_trainer(settings, backend, model, tokenizer, rows, SimpleNamespace(trainer=str(work)),
                               max_steps=20)
trainer.shard, trainer.seconds = 0, time.perf_counter
trainer.train()
scale = trainer.accelerator.scaler.get_scale()
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(json.dumps({"steps": trainer.state.global_step, "schedule_steps": trainer.lr_scheduler.last_epoch,
                  "loss_scale": scale, "skipped_steps": round(math.log2(65536 / scale)), "losses": losses,
                  "model_dtype": str(model.dtype)}))
assert trainer.lr_scheduler.last_epoch == trainer.state.global_step, "the schedule lags the steps"
assert all(math.isfinite(loss) for loss in losses), losses
print("fp16 with loss scaling: the schedule is on the step count")
PY
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
fi
for name in ${PARTS:-unsloth peft gpu_train fp16 qlora}; do
  case "$SMOKE $name" in
    *" unsloth") part unsloth unsloth.log 200 "pipeline unsloth ${UNSLOTH_RUN[*]@Q}" ;;
    *" peft") part peft peft.log 150 "pipeline peft ${PEFT_RUN[*]@Q}" ;;
    "1 "*) note "$name" skipped "GPU_PROOF_SMOKE=1" ;;
    *" gpu_train") part gpu_train gpu_train.log "${GPU_TRAIN_LIMIT:-200}" gpu_train ;;
    *" fp16") part fp16 extra.log 60 fp16 ;;
    *" qlora") part qlora extra.log 150 qlora ;;
  esac
done
echo "== summary: ${SECONDS}s in all; logs in $OUT"
cat "$OUT/summary.txt"
