"""python -m training.runs: a sweep's runs side by side, read from the manifests dotrain.py
writes (written here by hand, in dotrain's shapes: no training)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, step_env

import dotrain
from common import checkpoints_prefix, done_prefix, open_bucket, parse_settings, write_manifest

MODEL, DATASET = "Qwen/Qwen2.5-0.5B", "mlabonne/FineTome-100k"
MODEL_MANIFEST = {"complete": True, "shards": [{"path": "model.safetensors", "sha256": "ab" * 32}]}
DATA_MANIFEST = {"complete": True, "inputs": {"step": "pretokenize"}, "rows": 800, "eval_rows": 200,
                 "shards": [{"path": "shard-00000", "rows": 800, "tokens": 640000}]}


@pytest.fixture(params=["local", "s3"])
def bucket_env(request, monkeypatch):
    env = request.getfixturevalue("local_bucket" if request.param == "local" else "s3")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def inputs_of(*flags):
    """A run's recorded inputs, as dotrain.py computes them from its settings."""
    argv = ["--model-name", MODEL, "--dataset-name", DATASET, *flags]
    settings = parse_settings("", dotrain.SETTINGS, argv)
    return json.loads(json.dumps(dotrain.run_inputs(settings, MODEL_MANIFEST, DATA_MANIFEST)))


def plan(inputs, complete):
    """checkpoints/.../_manifest.json as train() writes it."""
    return {"complete": complete, "inputs": inputs, "rows": 800, "epochs": 1, "total_steps": 400,
            "world_size": 1, "optim": "adamw_8bit",
            "shards": [{"path": "shard-00000", "rows": 800, "sequences": 3200, "steps": 400,
                        "tokens": 640000, "trained_tokens": 500000}]}


def pointer(step):
    """latest.json (and checkpoint-N/_checkpoint.json) as the checkpoint upload writes it."""
    return {"step": step, "checkpoint": f"checkpoint-{step}", "epoch": 0, "shard": 0,
            "steps_into_shard": step, "total_steps": 400, "seconds": 61.5, "backend": "unsloth",
            "device": "cuda", "shards_io": {"0": {"storage_wait_s": 0.1}},
            "files": ["adapter_model.safetensors", "trainer_state.json"]}


def write_training(bucket, run, inputs, step):
    prefix = checkpoints_prefix(MODEL, DATASET, run)
    write_manifest(bucket, prefix, plan(inputs, complete=step == 400))
    for key in (f"checkpoint-{step}/_checkpoint.json", "latest.json"):
        bucket.put(f"{prefix}/{key}", json.dumps(pointer(step), indent=1).encode())
    bucket.put(f"{prefix}/checkpoint-{step}/adapter_model.safetensors", b"weights")


def write_done(bucket, run, inputs, after):
    """done/.../ as export() leaves it."""
    prefix = done_prefix(MODEL, DATASET, run)
    for key in ("lora_model/adapter_config.json", "fused/config.json", "metrics.json", "loss.png",
                "tensorboard/events.out"):
        bucket.put(f"{prefix}/{key}", b"{}")
    write_manifest(bucket, prefix, {
        "complete": True, "inputs": inputs, "shards": [], "rows": 800, "total_steps": 400,
        "tokens_seen": 640000, "backend": "unsloth", "check": {"rows": 3},
        "eval_loss": {"before": 1.5, "after": after, "rows": 200},
        "sample": {"prompt": "Hi", "completion": "Hello"},
        "outputs": ["lora_model/", "fused/", "metrics.json", "loss.png", "tensorboard/"]})


def runs(env):
    """python -m training.runs from the repository root, as the README shows it."""
    env = step_env({**env, "MODEL_NAME": MODEL, "DATASET_NAME": DATASET})
    return subprocess.run([sys.executable, "-m", "training.runs"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_lists_a_sweep_with_the_settings_that_differ(bucket_env):
    bucket = open_bucket(parse_settings("", [], []))
    unnamed, low, high = (inputs_of("--learning-rate", lr) for lr in ("2e-4", "1e-4", "5e-4"))
    write_training(bucket, None, unnamed, 400)
    write_done(bucket, None, unnamed, 0.9)
    write_training(bucket, "lr-1e-4", low, 400)
    write_done(bucket, "lr-1e-4", low, 1.1)
    write_training(bucket, "lr-5e-4", high, 120)  # still training
    other = done_prefix(MODEL, "someone/else", "lr-9")  # another dataset's run
    write_manifest(bucket, other, {"complete": True, "inputs": unnamed})

    result = runs(bucket_env)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"3 run(s) of {MODEL} on {DATASET} in {bucket}"
    header, *rows = lines[1:]
    assert header.split() == ["run", "complete", "steps", "eval", "loss", "learning_rate"]
    assert [row.split() for row in rows] == [
        ["(unnamed)", "yes", "400", "1.5000", "->", "0.9000", "0.0002"],
        ["lr-1e-4", "yes", "400", "1.5000", "->", "1.1000", "0.0001"],
        ["lr-5e-4", "no", "120/400", "-", "0.0005"]]
    for column in ("complete", "steps", "eval loss", "learning_rate"):  # aligned
        start = header.index(column)
        assert all(row[start - 2:start] == "  " and row[start] != " " for row in rows), column
    readme = (ROOT / "README.md").read_text()  # the README shows this very output
    sample = readme.split("python -m training.runs\n```\n\n```\n", 1)[1].split("```", 1)[0]
    assert sample == result.stdout.replace(str(bucket), "s3://mybucket")


def test_a_named_run_alone_and_a_run_with_no_checkpoint_yet(bucket_env):
    bucket = open_bucket(parse_settings("", [], []))
    write_manifest(bucket, checkpoints_prefix(MODEL, DATASET, "r16"),
                   plan(inputs_of("--lora-r", "16"), complete=False))
    write_training(bucket, "r64", inputs_of("--lora-r", "64"), 400)
    write_done(bucket, "r64", inputs_of("--lora-r", "64"), 0.8)

    result = runs(bucket_env)

    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()[1:]
    assert header.split() == ["run", "complete", "steps", "eval", "loss", "lora_r"]
    assert [row.split() for row in rows] == [["r16", "no", "0/400", "-", "16"],
                                             ["r64", "yes", "400", "1.5000", "->", "0.8000", "64"]]


def test_no_run_is_one_error_line(bucket_env):
    open_bucket(parse_settings("", [], []))
    result = runs(bucket_env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no training run under ")
    assert len(result.stderr.splitlines()) == 1 and not result.stdout
