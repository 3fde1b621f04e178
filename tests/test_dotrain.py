"""dotrain.py on a tiny Qwen2 model with random weights and three small model-ready shards."""

import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from conftest import (FAKE_KEY_ID, FAKE_SECRET, ROOT, TEST_BUCKET, bucket_objects,
                      model_ready_prefix, run_step, start_step, step_env)

from training.speed import SHAPES, length_multiple, model_flops_per_token

sys.path.insert(0, str(ROOT / "demo"))
MODEL, DATASET = "tiny/qwen2", "synthetic/colors"
SHARD_ROWS = (60, 60, 60)
EVAL_ROWS = 12  # held out of training, 4 in each shard
MAX_SEQ_LENGTH = 128
# A learning rate far above the default: the base model is random and a run has ~25 steps.
TRAINING = {"MODEL_NAME": MODEL, "DATASET_NAME": DATASET, "MAX_SEQ_LENGTH": str(MAX_SEQ_LENGTH),
            "EVAL_ROWS": str(EVAL_ROWS),
            "BATCH_SIZE": "2", "GRAD_ACCUM": "2", "WARMUP_STEPS": "2", "LEARNING_RATE": "1e-2",
            "LORA_R": "8", "SAVE_STEPS": "2", "SAMPLE_PROMPT": "The car is red. What color is the car?",
            # on a small shared machine torch's spinning thread pool makes a tiny step 20x slower
            "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- inputs in the bucket


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny ChatML tokenizer and a two-layer Qwen2 with random weights, saved as published."""
    from synthetic import make_model, make_tokenizer

    out = tmp_path_factory.mktemp("tiny")
    make_tokenizer(out / "tokenizer")
    return Path(make_model(out / "model", out / "tokenizer"))


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory):
    """A local bucket holding what steps 1 to 3 make of the synthetic colour conversations
    (three shards) and the tiny model: the directory, and the model-ready manifest."""
    from synthetic import conversations

    work = tmp_path_factory.mktemp("inputs")
    rows = conversations(sum(SHARD_ROWS), seed=10)
    (work / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {"BUCKET_NAME": f"file://{work / 'bucket'}", "MODEL_NAME": MODEL, "DATASET_NAME": DATASET,
           "MODEL_CACHE_DIR": str(work / "cache")}
    steps = [start_step("import-dataset.py", {**env, "SHARD_SIZE": str(SHARD_ROWS[0]),
                                              "DATASET_SOURCE": str(work / "chat.jsonl")}),
             start_step("import-model.py", {**env, "MODEL_SOURCE": str(tiny_model)})]
    for step in steps:
        output = step.communicate(timeout=300)[0]
        assert step.returncode == 0, output
    run_step("pretokenize.py", {**env, **TRAINING, "NUM_PROC": "1"})
    prefix = model_ready_prefix({**env, **TRAINING})
    manifest = json.loads((work / "bucket" / prefix / "_manifest.json").read_text())
    assert [shard["rows"] for shard in manifest["shards"]] == [rows - EVAL_ROWS // 3 for rows in SHARD_ROWS]
    assert manifest["truncated"] == 0  # so every token of every shard is trained
    return work / "bucket", manifest


def copy_inputs(inputs, env):
    """The inputs into the test's bucket: the local directory itself, or the S3 test bucket."""
    root, manifest = inputs
    if env["BUCKET_NAME"].startswith("file://"):
        shutil.copytree(root, env["BUCKET_NAME"][len("file://"):])
        return manifest["shards"]
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)
    for path in root.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            client.upload_file(str(path), TEST_BUCKET, str(path.relative_to(root)))
    return manifest["shards"]


def get_object(env, key):
    url = env["BUCKET_NAME"]
    if url.startswith("file://"):
        path = Path(url[len("file://"):]) / key
        return path.read_bytes() if path.exists() else None
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)
    try:
        return client.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


# ---------------------------------------------------------------- helpers


def kill_when(env, work_dir, condition, timeout=300):
    """Start dotrain.py, SIGKILL it as soon as latest.json satisfies `condition`; return the
    pointer it was killed at and the most shard folders seen on local disk at once."""
    process = start_step("dotrain.py", env)
    output = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    shards_dir = work_dir / MODEL / DATASET / "shards"
    most_shards, deadline = 0, time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if shards_dir.exists():
            most_shards = max(most_shards, len(list(shards_dir.iterdir())))
        pointer = json.loads(get_object(env, f"checkpoints/{MODEL}/{DATASET}/latest.json") or "null")
        if pointer and condition(pointer):
            process.kill()
            break
        time.sleep(0.05)
    process.wait()
    reader.join()
    assert process.returncode == -9, f"not killed ({process.returncode}):\n{''.join(output)}"
    return json.loads(get_object(env, f"checkpoints/{MODEL}/{DATASET}/latest.json")), most_shards


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    """The metrics and adapter of a run that nothing interrupts, on a local bucket."""
    work = tmp_path_factory.mktemp("uninterrupted")
    env = {"BUCKET_NAME": f"file://{work / 'bucket'}", **TRAINING, "WORK_DIR": str(work / "work"),
           "MODEL_CACHE_DIR": str(work / "cache")}
    copy_inputs(inputs, env)
    run_step("dotrain.py", env)
    done = work / "bucket" / "done" / MODEL / DATASET
    return json.loads((done / "metrics.json").read_text()), done / "lora_model"


def download_prefix(env, prefix, out):
    for key, data in bucket_objects(env).items():
        if key.startswith(prefix + "/"):
            path = out / key[len(prefix) + 1:]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return out


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


# ---------------------------------------------------------------- tests


def test_killed_run_resumes_to_the_same_end_and_outputs_load(s3, proxy, inputs, uninterrupted,
                                                             tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    shards = copy_inputs(inputs, s3)
    env = {**s3, **TRAINING, "WORK_DIR": str(tmp_path / "work"),
           "MODEL_CACHE_DIR": str(tmp_path / "cache")}

    # Killed inside a shard after the first, just after a checkpoint was pointed at. (On a busy
    # machine the run may go on a little between the pointer's update and the kill: killed_at is
    # the pointer the kill left, and a later checkpoint may have begun uploading.)
    killed_at, most_shards = kill_when(
        env, tmp_path / "work", lambda pointer: pointer["shard"] >= 1 and pointer["steps_into_shard"] >= 2)
    plan = json.loads(get_object(env, f"checkpoints/{MODEL}/{DATASET}/_manifest.json"))
    steps = [shard["steps"] for shard in plan["shards"]]
    assert sum(steps[:1]) < killed_at["step"]
    assert most_shards <= 2  # the shard being trained and the next one
    assert get_object(env, f"done/{MODEL}/{DATASET}/_manifest.json") is None

    # The checkpoint before the last stays until a later one is named. As a reader in another
    # region may: latest.json names a checkpoint not whole here; the rerun takes the newest
    # whole one (the one before it, or one that finished after it and was not named yet).
    checkpoints = f"checkpoints/{MODEL}/{DATASET}"
    objects = bucket_objects(s3)
    whole = sorted(int(key.split("/checkpoint-")[1].split("/")[0]) for key in objects
                   if key.startswith(f"{checkpoints}/checkpoint-") and key.endswith("/_checkpoint.json"))
    assert killed_at["step"] in whole and min(whole) < killed_at["step"]
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                 aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET).delete_object(
        Bucket=TEST_BUCKET, Key=f"{checkpoints}/checkpoint-{killed_at['step']}/_checkpoint.json")
    resumed_at = max(step for step in whole if step != killed_at["step"])
    resumed_shard = next(index for index in range(len(steps)) if resumed_at < sum(steps[:index + 1]))
    result = run_step("dotrain.py", env)
    assert (f"latest.json names checkpoint-{killed_at['step']}, which is not whole in the bucket: "
            f"resuming from checkpoint-{resumed_at}, the newest whole one") in result.stdout
    assert f"resuming at step {resumed_at}: shard {resumed_shard}" in result.stdout
    assert not any(f"shard {index} (" in result.stdout for index in range(resumed_shard))

    # The same steps, losses and adapter as a run that was never interrupted.
    reference, reference_lora = uninterrupted
    metrics = json.loads(get_object(env, f"done/{MODEL}/{DATASET}/metrics.json"))
    assert [e["loss"] for e in metrics["steps"]] == pytest.approx([e["loss"] for e in reference["steps"]],
                                                                 abs=1e-4)
    adapter = load_file(download_prefix(s3, f"done/{MODEL}/{DATASET}/lora_model", tmp_path / "lora")
                        / "adapter_model.safetensors")
    for name, weight in load_file(reference_lora / "adapter_model.safetensors").items():
        torch.testing.assert_close(adapter[name], weight, atol=1e-5, rtol=1e-4)

    # Every step once, each on the shard the plan gives it; every shard's tokens seen once.
    done = json.loads(get_object(env, f"done/{MODEL}/{DATASET}/_manifest.json"))
    total = sum(steps)
    assert done["complete"] and done["total_steps"] == total == plan["total_steps"]
    assert [entry["step"] for entry in metrics["steps"]] == list(range(1, total + 1))
    bounds = [sum(steps[:i]) for i in range(len(steps) + 1)]
    assert [entry["shard"] for entry in metrics["steps"]] == \
        [i for i in range(len(steps)) for _ in range(bounds[i], bounds[i + 1])]
    assert metrics["tokens_seen"] == sum(shard["tokens"] for shard in shards)
    assert [shard["path"] for shard in done["shards"]] == [shard["path"] for shard in shards]
    assert done["rows"] == sum(SHARD_ROWS) - EVAL_ROWS
    # Steps per shard as the trainer counts them: packed sequences / (batch * accumulation).
    for shard, entry in zip(done["shards"], shards):
        assert shard["steps"] == math.ceil(math.ceil(shard["sequences"] / 2) / 2)
        assert shard["tokens"] == entry["tokens"]  # no token cut
    # What training waited on storage, by shard: shard downloads, checkpoint uploads.
    assert all(shard["storage_wait_s"] >= 0 for shard in metrics["shards"])
    losses = [entry["loss"] for entry in metrics["steps"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    objects = bucket_objects(s3)
    # Older checkpoints removed, but for the one before the last (a stale latest.json names it)
    kept = {key.split("/checkpoint-")[1].split("/")[0] for key in objects if "/checkpoint-" in key}
    assert len(kept) == 2 and str(total) in kept
    assert f"done/{MODEL}/{DATASET}/loss.png" in objects
    assert not (tmp_path / "work" / MODEL / DATASET).exists()

    # Both outputs load; fused equals base + adapter within the stated tolerance of the
    # adapter's effect, here in float32.
    lora = tmp_path / "lora"
    fused_dir = download_prefix(s3, f"done/{MODEL}/{DATASET}/fused", tmp_path / "fused")
    ids = AutoTokenizer.from_pretrained(lora)("<|im_start|>user\nThe bird is blue. What color is "
                                              "the bird?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), lora)
    reference = logits(adapted, ids)
    with adapted.disable_adapter():
        effect = (reference - logits(adapted, ids)).square().mean().sqrt().item()
    fused = AutoModelForCausalLM.from_pretrained(fused_dir, dtype=torch.float32)
    distance = (logits(fused, ids) - reference).square().mean().sqrt().item()
    assert distance <= done["check"]["tolerance"] * effect
    assert done["check"]["distance_over_effect"] <= done["check"]["tolerance"]
    assert distance < effect / 10  # the check can fail
    assert json.loads((fused_dir / "config.json").read_text())["use_cache"] is True
    assert json.loads((fused_dir / "config.json").read_text())["dtype"] == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(fused_dir)
    stops = GenerationConfig.from_pretrained(fused_dir).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops and tokenizer.eos_token_id in stops
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert done["sample"]["prompt"] == TRAINING["SAMPLE_PROMPT"]

    # A rerun of finished work writes nothing; changed settings are refused, also without writes.
    proxied = {**env, **proxy.env}
    proxy.clear()
    assert "nothing to do" in run_step("dotrain.py", proxied).stdout
    changed = run_step("dotrain.py", {**proxied, "LORA_R": "4"}, check=False)
    assert changed.returncode == 1 and changed.stderr.startswith("error: ")
    assert "lora_r: 8 -> 4" in changed.stderr and len(changed.stderr.splitlines()) == 1
    lease = f"/{TEST_BUCKET}/checkpoints/{MODEL}/{DATASET}/lease.json"
    assert proxy.writes() == [("PUT", lease), ("DELETE", lease)]  # taken, then given back


def test_epochs_cosine_schedule_evaluations_and_tensorboard(local_bucket, inputs, tmp_path):
    from safetensors.torch import load_file

    copy_inputs(inputs, local_bucket)
    env = {**local_bucket, **TRAINING, "NUM_EPOCHS": "2", "LR_SCHEDULER": "cosine", "SAVE_STEPS": "10",
           "REPORT_TO": "tensorboard", "WORK_DIR": str(tmp_path / "work"),
           "MODEL_CACHE_DIR": str(tmp_path / "cache")}
    result = run_step("dotrain.py", env)
    done = json.loads(get_object(env, f"done/{MODEL}/{DATASET}/_manifest.json"))
    metrics = json.loads(get_object(env, f"done/{MODEL}/{DATASET}/metrics.json"))
    epoch_steps = sum(shard["steps"] for shard in done["shards"][:3])
    total = done["total_steps"]
    assert total == 2 * epoch_steps and metrics["epochs"] == 2
    assert [(s["epoch"], s["path"]) for s in metrics["shards"]] == \
        [(e, f"shard-0000{i}") for e in (0, 1) for i in range(3)]
    assert [e["step"] for e in metrics["steps"]] == list(range(1, total + 1))
    # cosine after 2 warmup steps; the rate logged at a step is the one it trained with
    for entry in metrics["steps"][2:]:
        progress = (entry["step"] - 1 - 2) / (total - 2)
        assert entry["learning_rate"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-4)
    # evaluated before the first step, at every checkpoint (every 10 steps, each shard's end)
    # and at the end; the held-out rows were never trained on and their loss went down
    evaluated = [e["step"] for e in metrics["evaluations"]]
    ends = sorted({s["last_step"] for s in metrics["shards"]} | set(range(10, total, 10)))
    assert evaluated == [0, *ends]
    losses = [e["eval_loss"] for e in metrics["evaluations"]]
    assert losses[-1] < losses[0] - 0.2, losses
    assert f"evaluation loss on {EVAL_ROWS} held-out rows: {losses[0]:.4f} before training, " \
           f"{losses[-1]:.4f} after" in result.stdout
    events = [key for key in bucket_objects(env) if key.startswith(f"done/{MODEL}/{DATASET}/tensorboard/")]
    assert events and all("events.out.tfevents" in key for key in events)
    # every linear projection of the blocks adapted (peft's all-linear), none other
    adapter = load_file(Path(env["BUCKET_NAME"][len("file://"):]) / "done" / MODEL / DATASET / "lora_model"
                        / "adapter_model.safetensors")
    adapted = {key.split(".")[-3] for key in adapter}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert metrics["work_dir_peak_bytes"]["node 0"] > 0
    # the run's speed: the median tokens/s of its logged steps, the model FLOPs of a token (for the
    # positions the data's rows attend to, counted by the plan), no MFU without a GPU, the few
    # batch shapes it met, its attention
    speed = metrics["speed"]
    bucket = Path(env["BUCKET_NAME"][len("file://"):])
    config = json.loads((bucket / "models" / MODEL / "config.json").read_text())
    first_epoch = [shard for shard in done["shards"] if shard["epoch"] == 0]
    context = sum(shard["attended"] for shard in first_epoch) / sum(shard["tokens"] for shard in first_epoch)
    assert speed["model_flops_per_token"] == pytest.approx(model_flops_per_token(config, context))
    assert speed["tokens_per_second"] == pytest.approx(
        statistics.median(e["tokens_per_second"] for e in metrics["steps"]), abs=0.05)
    assert 1 <= speed["distinct_shapes"] <= 2 * MAX_SEQ_LENGTH // length_multiple(SimpleNamespace(
        max_seq_length=MAX_SEQ_LENGTH, batch_size=2, packing=True)) <= SHAPES
    assert (speed["attention"], speed["gpu"], speed["gpus"], speed["mfu"]) == ("sdpa", None, 1, None)
    assert "'seconds_left': 0," in result.stdout  # the time left, at every logged step


def test_save_minutes_saves_between_save_steps_and_the_run_resumes(local_bucket, inputs, tmp_path):
    """SAVE_MINUTES so small that every optimizer step qualifies (a step takes longer than 60
    nanoseconds), SAVE_STEPS out of reach: a checkpoint, and an evaluation, after every step;
    killed after one, the run resumes from it. The GPU memory check is skipped on the CPU."""
    copy_inputs(inputs, local_bucket)
    env = {**local_bucket, **TRAINING, "SAVE_STEPS": "1000", "SAVE_MINUTES": "1e-9",
           "WORK_DIR": str(tmp_path / "work"), "MODEL_CACHE_DIR": str(tmp_path / "cache")}
    killed_at, _ = kill_when(env, tmp_path / "work", lambda pointer: pointer["step"] >= 1)
    total = killed_at["total_steps"]
    result = run_step("dotrain.py", env, "--check-memory", "1")
    assert f"resuming at step {killed_at['step']}" in result.stdout
    assert "GPU memory" not in result.stdout
    saved = [int(line.split("checkpoint ")[1].split("/")[0]) for line in result.stdout.splitlines()
             if " saved to " in line]
    assert saved == list(range(killed_at["step"] + 1, total + 1))
    metrics = json.loads(get_object(env, f"done/{MODEL}/{DATASET}/metrics.json"))
    assert [e["step"] for e in metrics["evaluations"]] == list(range(total + 1))


def test_save_every_asks_for_a_checkpoint_once_the_minutes_have_passed_since_the_last():
    from transformers import TrainerControl
    from training.checkpoints import save_every
    from training.processes import Ranks

    now = [0.0]
    callback = save_every(2, Ranks(), clock=lambda: now[0])
    for minutes, saved_by_steps, asked in [(1, False, False), (2.5, False, True), (3, True, True),
                                           (4.9, False, False), (5.1, False, True)]:
        now[0] = minutes * 60
        control = TrainerControl(should_save=saved_by_steps)
        callback.on_step_end(None, None, control)
        assert control.should_save is asked, minutes
        if control.should_save:
            callback.on_save(None, None, control)
    now[0], control = 10**6, TrainerControl()
    save_every(0, Ranks(), clock=lambda: now[0]).on_step_end(None, None, control)
    assert not control.should_save  # SAVE_MINUTES=0: steps only


def test_wandb_runs_go_to_wandb_project(tmp_path, monkeypatch):
    from training.report import set_up_reporting

    (tmp_path / "wandb").mkdir()  # a package named wandb: REPORT_TO=wandb finds it installed
    (tmp_path / "wandb" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "a-key")
    monkeypatch.setenv("WANDB_PROJECT", "from-the-environment")
    for name in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME"):
        monkeypatch.delenv(name, raising=False)
    settings = SimpleNamespace(report_to="wandb", wandb_project="lr-sweep", run_name="lr-1e-4",
                               model_name=MODEL, dataset_name=DATASET)
    set_up_reporting(settings, "s3://b/checkpoints/run", {"step": "dotrain/2"}, str(tmp_path))
    assert os.environ["WANDB_PROJECT"] == "lr-sweep" and os.environ["WANDB_NAME"] == "lr-1e-4"


def test_an_upload_removes_only_checkpoints_older_than_the_previous_one(tmp_path):
    """Rank 0 uploads checkpoint 3 while node 1 already puts its RNG states into checkpoint 4:
    checkpoint 1 goes, the previous one (2, which an older latest.json names) and 4 stay."""
    from common import Bucket
    from training.checkpoints import Uploads

    bucket = Bucket(SimpleNamespace(bucket_name=f"file://{tmp_path / 'bucket'}"))
    prefix = "checkpoints/run"
    for key in ("checkpoint-1/adapter_model.safetensors", "checkpoint-2/adapter_model.safetensors",
                "checkpoint-4/rng_state_2.pth"):
        bucket.put(f"{prefix}/{key}", b"x")
    local = tmp_path / "trainer" / "checkpoint-3"
    local.mkdir(parents=True)
    (local / "adapter_model.safetensors").write_bytes(b"y")
    work = SimpleNamespace(uploads=str(tmp_path / "uploads"), trainer=str(tmp_path / "trainer"))
    Path(work.uploads).mkdir()
    uploads = Uploads(bucket, prefix, "done/run", work, {"checkpoint": "checkpoint-2"})
    uploads.submit(str(local), {"checkpoint": "checkpoint-3", "step": 3, "total_steps": 9},
                   others=["rng_state_2.pth"])
    uploads.finish()
    objects = bucket_objects({"BUCKET_NAME": f"file://{bucket.root}"})
    assert {key.split("/")[2] for key in objects if key.startswith(prefix + "/checkpoint-")} == \
        {"checkpoint-2", "checkpoint-3", "checkpoint-4"}
    assert f"{prefix}/checkpoint-4/rng_state_2.pth" in objects
    assert json.loads(bucket.get(f"{prefix}/latest.json"))["checkpoint"] == "checkpoint-3"


def test_unpacked_capped_run_on_a_local_bucket(local_bucket, inputs, tmp_path):
    import torch

    copy_inputs(inputs, local_bucket)
    env = {**local_bucket, **TRAINING, "PACKING": "0", "MAX_STEPS": "3",
           "WORK_DIR": str(tmp_path / "work"), "MODEL_CACHE_DIR": str(tmp_path / "cache")}
    if not torch.cuda.is_available():
        refused = run_step("dotrain.py", {**env, "TRAIN_BACKEND": "unsloth"}, check=False)
        assert refused.returncode == 1 and "needs a CUDA GPU" in refused.stderr
    # Data settings pretokenize.py did not run with name data that is not there.
    refused = run_step("dotrain.py", {**env, "EVAL_ROWS": "7"}, check=False)
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
    assert refused.stderr.endswith(" is not complete: run pretokenize.py (with the same "
                                   "MAX_SEQ_LENGTH, CHAT_TEMPLATE, EVAL_ROWS and PART_SIZE) first\n")
    run_step("dotrain.py", env)
    done = json.loads(get_object(env, f"done/{MODEL}/{DATASET}/_manifest.json"))
    assert done["total_steps"] == 3 and done["inputs"]["packing"] is False
    # One row per sequence when not packing: 56 rows (4 held out) -> 28 batches -> 14 steps.
    assert [(s["sequences"], s["steps"], s["partial"]) for s in done["shards"]] == [(56, 14, True)]
    metrics = json.loads(get_object(env, f"done/{MODEL}/{DATASET}/metrics.json"))
    assert [entry["step"] for entry in metrics["steps"]] == [1, 2, 3]
    for name in ("lora_model/adapter_model.safetensors", "fused/model.safetensors", "loss.png"):
        assert get_object(env, f"done/{MODEL}/{DATASET}/{name}") is not None

    # Killed while exporting (before the manifest): the rerun exports again without training.
    manifest = Path(env["BUCKET_NAME"][len("file://"):]) / "done" / MODEL / DATASET / "_manifest.json"
    manifest.unlink()
    result = run_step("dotrain.py", env)
    assert "backend:" not in result.stdout and "checkpoint " not in result.stdout
    assert json.loads(manifest.read_text()) == done


def shard_trainer(inputs, tiny_model, tmp_path, rows, attention="sdpa", **settings):
    """dotrain's model (load_for_training), the first `rows` rows of the first shard packed as
    training packs them (training.shards.prepare) and make_trainer's trainer of them, on the CPU:
    (trainer, model, tokenizer, settings, rows)."""
    import datasets
    import dotrain
    from training.processes import Ranks
    from training.shards import prepare

    root, manifest = inputs
    data = datasets.Dataset.from_parquet(
        str(root / model_ready_prefix({"BUCKET_NAME": f"file://{root}", **TRAINING})
            / manifest["shards"][0]["parts"][0]["path"]),
        cache_dir=str(tmp_path / "cache")).select_columns(["input_ids", "labels"])
    data = data.select(range(min(rows, len(data))))
    settings = SimpleNamespace(**{
        "seed": 0, "batch_size": 2, "grad_accum": 1, "learning_rate": 1e-3, "warmup_steps": 0,
        "weight_decay": 0.0, "max_seq_length": 256, "packing": True, "save_steps": 10**6,
        "logging_steps": 1, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_targets": "all-linear",
        "lr_scheduler": "linear", "report_to": "none", **settings})
    backend = dotrain.Backend("peft", "cpu", "float32", "adamw_torch", attention=attention)
    backend.trainer_class = dotrain.shard_trainer_class(backend)
    model, tokenizer = dotrain.load_for_training(settings, backend, str(tiny_model), Ranks())
    trainer = dotrain.make_trainer(settings, backend, model, tokenizer,
                                   prepare(data, settings.packing, settings.max_seq_length),
                                   SimpleNamespace(trainer=str(tmp_path / "trainer")), max_steps=2)
    return trainer, model, tokenizer, settings, data


def lora_gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def random_lora_b(model):
    """LoRA's B matrices start at 0, which would leave the A matrices without gradients."""
    import torch

    torch.manual_seed(0)
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.05)


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_a_packed_row_sees_only_itself(inputs, tiny_model, tmp_path, attention):
    """The loss and the LoRA gradients of a packed, padded batch (dotrain's model, packing,
    collator and loss) equal those of its rows run one by one: no row sees another, nor the
    padding. For each attention dotrain trains with: SDPA with the dense block-diagonal mask
    transformers builds from the position ids (the CPU, T4, V100), FlexAttention with a document
    BlockMask (CUDA GPUs from compute capability 8.0), whose loss only is compared: it has no
    backward on the CPU."""
    import torch
    from training.speed import real_tokens

    trainer, model, *_ = shard_trainer(inputs, tiny_model, tmp_path, rows=16, attention=attention)
    assert model.config._attn_implementation == attention
    random_lora_b(model)
    batch = next(iter(trainer.get_train_dataloader()))
    end = int(real_tokens(batch))
    assert end < batch["input_ids"].shape[1]  # the batch holds padding
    starts = [int(i) for i in (batch["position_ids"][0, :end] == 0).nonzero().flatten()] + [end]
    assert len(starts) > 3  # several rows share the packed sequences
    trained = int((batch["labels"][:, 1:] != -100).sum())
    backward = attention != "flex_attention"
    with torch.set_grad_enabled(backward):
        model.zero_grad()
        packed = trainer.compute_loss(model, batch, num_items_in_batch=trained)
        if backward:
            packed.backward()
            packed_gradients = lora_gradients(model)
            model.zero_grad()
        alone = 0.0
        for a, b in zip(starts, starts[1:]):
            row = {"input_ids": batch["input_ids"][:, a:b], "labels": batch["labels"][:, a:b]}
            loss = trainer.compute_loss(model, row, num_items_in_batch=trained)
            if backward:
                loss.backward()
            alone += loss.item()
    assert packed.item() == pytest.approx(alone, abs=1e-5)
    if backward:
        for name, gradient in lora_gradients(model).items():
            torch.testing.assert_close(packed_gradients[name], gradient, atol=1e-6, rtol=1e-4)


def test_batches_take_few_lengths_and_only_their_real_tokens_count(inputs, tiny_model, tmp_path):
    """Packed batches are padded to a multiple of a length (training.speed.length_multiple), so
    a run meets few shapes; the trainer counts the tokens of the rows, not the padding."""
    from training.speed import SHAPES, length_multiple, real_tokens

    trainer, _, _, settings, rows = shard_trainer(inputs, tiny_model, tmp_path, rows=60, max_seq_length=128)
    batches = list(trainer.get_train_dataloader())
    lengths = {batch["input_ids"].shape[1] for batch in batches}
    multiple = length_multiple(settings)
    assert multiple == 64 and all(length % multiple == 0 for length in lengths)
    assert 1 < len(lengths) <= min(SHAPES, 2 * 128 // multiple)
    assert sum(int(real_tokens(batch)) for batch in batches) == sum(len(ids) for ids in rows["input_ids"])
    assert sum(batch["input_ids"].numel() for batch in batches) > sum(len(ids) for ids in rows["input_ids"])
    trainer.shard, trainer.seconds = 0, lambda: 1.0  # (as dotrain's training sets them)
    trainer.train()  # two steps of one batch
    assert trainer.state.num_input_tokens_seen == sum(int(real_tokens(batch)) for batch in batches[:2])
    assert trainer.shapes == {tuple(batch["input_ids"].shape) for batch in batches[:2]}


def test_evaluation_batched_like_training_equals_row_by_row(inputs, tiny_model, tmp_path):
    """The evaluation loss of rows packed and batched as training batches them equals the mean
    loss a trained token of the rows run one by one; the processes' shares of the rows add up to
    the same number."""
    import dotrain
    import torch
    from training.processes import Ranks

    _, model, tokenizer, settings, rows = shard_trainer(inputs, tiny_model, tmp_path, rows=40)
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(rows["input_ids"], rows["labels"])]
    batches = dotrain.evaluation_batches(rows, settings, tokenizer, Ranks())
    assert 1 < len(batches) < len(rows) / 4 and "position_ids" in batches[0]
    loss_sum = tokens = 0
    with torch.no_grad():
        for row in rows:
            labels = torch.tensor([row["labels"]])
            trained = int((labels[:, 1:] != -100).sum())
            loss_sum += model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * trained
            tokens += trained
    assert dotrain.evaluation_loss(model, batches, Ranks()) == pytest.approx(loss_sum / tokens, abs=1e-5)
    # two processes: each its share, their sums added
    sums = []
    for rank in (0, 1):
        mine = dotrain.evaluation_batches(rows, settings, tokenizer, Ranks(rank, 0, 2))
        trained = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in mine)
        sums.append((dotrain.evaluation_loss(model, mine, Ranks()) * trained, trained))
    assert sum(s for s, _ in sums) / sum(t for _, t in sums) == pytest.approx(loss_sum / tokens, abs=1e-5)
    assert sum(t for _, t in sums) == tokens


FUSED_LOSS = """
import json, sys
from pathlib import Path
from trl import SFTTrainer
from test_dotrain import lora_gradients, random_lora_b, shard_trainer

inputs = (Path(sys.argv[1]), json.loads(sys.argv[2]))
trainer, model, *_ = shard_trainer(inputs, Path(sys.argv[3]), Path(sys.argv[4]), rows=16)
random_lora_b(model)
batch = next(iter(trainer.get_train_dataloader()))
trained = int((batch["labels"][:, 1:] != -100).sum())
plain = trainer.compute_loss(model, dict(batch), num_items_in_batch=trained)  # the CPU's loss
plain.backward()
plain_gradients = lora_gradients(model)
model.zero_grad()
fused = SFTTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=trained)  # CUDA's
fused.backward()
difference = max((plain_gradients[name] - gradient).abs().max().item()
                 for name, gradient in lora_gradients(model).items())
print(json.dumps({"plain": plain.item(), "fused": fused.item(), "gradient_difference": difference}))
"""


def test_the_fused_loss_of_gpus_equals_the_cpus(inputs, tiny_model, tmp_path):
    """On CUDA dotrain's trainer takes TRL's loss, whose fused LM head never holds the logits of
    a whole batch (Triton kernels); on the CPU transformers' loss. The same loss and gradients on
    a packed batch, the kernels run on the CPU by Triton's interpreter (TRITON_INTERPRET=1)."""
    import subprocess

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: pip install -r requirements-dev.txt")
    root, manifest = inputs
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-c", FUSED_LOSS, str(root), json.dumps(manifest),
                             str(tiny_model), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            env={**step_env({}), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
                                 "PYTHONPATH": path}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads(result.stdout.strip().splitlines()[-1])
    assert losses["fused"] == pytest.approx(losses["plain"], abs=1e-5)
    assert losses["gradient_difference"] < 1e-6


@pytest.mark.parametrize("setting, message", [
    ({"LORA_R": "abc"}, "LORA_R (or --lora-r) must be a int, not 'abc'"),
    ({"BATCH_SIZE": "0"}, "BATCH_SIZE (or --batch-size) must be at least 1"),
    ({}, f"models/{MODEL} is not complete: run import-model.py first"),
])
def test_bad_settings_and_missing_inputs_fail_in_one_line(local_bucket, setting, message):
    result = run_step("dotrain.py", {**local_bucket, "MODEL_NAME": MODEL, "DATASET_NAME": DATASET,
                                     **setting}, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert message in result.stderr
