"""A user's second run: FORCE replaces only what other inputs made, and only once; REBUILD
remakes an output from the same inputs once per launch; a plan with no checkpoint is replaced
freely; RUN_NAME keeps runs side by side, also runs with other data settings; one launch at a
time trains a run. Through the real steps, on the local S3 server."""

import json
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone

import boto3
import pytest
from conftest import (FAKE_KEY_ID, FAKE_SECRET, ROOT, TEST_BUCKET, bucket_objects,
                      model_ready_prefix, run_step, start_step)

import common

sys.path.insert(0, str(ROOT / "demo"))
MODEL, DATASET = "tiny/qwen2", "synthetic/colors"
STEPS = ("import-dataset.py", "import-model.py", "pretokenize.py", "dotrain.py")
TRAINING = {"MAX_SEQ_LENGTH": "128", "BATCH_SIZE": "2", "GRAD_ACCUM": "1", "WARMUP_STEPS": "1",
            "LEARNING_RATE": "1e-3", "LORA_R": "4", "SAVE_STEPS": "2", "MAX_STEPS": "6",
            "NUM_PROC": "1", "SAMPLE_PROMPT": "The car is red. What color is the car?",
            "OMP_NUM_THREADS": "1", "SHARD_SIZE": "20", "EVAL_ROWS": "4"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from synthetic import conversations, make_model, make_tokenizer

    tmp = tmp_path_factory.mktemp("second-run")
    dataset = tmp / "chat.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in conversations(40, seed=4)))
    make_tokenizer(tmp / "tokenizer")
    return {"DATASET_SOURCE": str(dataset), "MODEL_SOURCE": make_model(tmp / "model", tmp / "tokenizer")}


@pytest.fixture
def env(proxy, sources, tmp_path):
    """Settings of every step, through the recording proxy."""
    return {**proxy.env, **sources, **TRAINING, "MODEL_NAME": MODEL, "DATASET_NAME": DATASET,
            "MODEL_CACHE_DIR": str(tmp_path / "cache"), "WORK_DIR": str(tmp_path / "work")}


def run_pipeline(env):
    return [run_step(step, env) for step in STEPS]


def written(proxy):
    """The keys the steps wrote (PUT, POST, DELETE) since the proxy was last cleared."""
    prefix = f"/{TEST_BUCKET}/"
    return sorted({path.split("?")[0][len(prefix):] for _, path in proxy.writes()
                   if path.startswith(prefix)})


def get_json(env, key):
    """An object of the test bucket as JSON, or None (read while a step may be deleting)."""
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)
    try:
        return json.loads(client.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def run_key(kind, run, name):
    return f"{kind}/{MODEL}/{DATASET}" + (f"/{run}" if run else "") + f"/{name}"


def done_manifest(env, run=None):
    return get_json(env, run_key("done", run, "_manifest.json"))


def pointer(env, run=None):
    return get_json(env, run_key("checkpoints", run, "latest.json"))


def kill_dotrain_when(env, condition, timeout=300):
    """Start dotrain.py and SIGKILL it as soon as condition() holds; its output."""
    process = start_step("dotrain.py", env)
    output = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline and not condition():
        time.sleep(0.05)
    process.kill()
    process.wait()
    reader.join()
    assert process.returncode == -9, f"not killed ({process.returncode}):\n{''.join(output)}"
    return "".join(output)


def test_force_replaces_only_the_outputs_made_from_other_inputs_and_a_recovery_resumes(env, proxy):
    run_pipeline(env)
    first = done_manifest(env)
    assert first["inputs"]["batch_size"] == 2

    # Lower BATCH_SIZE with FORCE=1, as after an out-of-memory error: only training is redone.
    # Killed after a checkpoint of the new run; the recovery, FORCE=1 still set, continues it.
    changed = {**env, "BATCH_SIZE": "1", "FORCE": "1"}
    proxy.clear()
    for step in STEPS[:3]:
        assert "nothing to do" in run_step(step, changed).stdout
    plan = run_key("checkpoints", None, "_manifest.json")
    kill_dotrain_when(changed, lambda: (get_json(env, plan) or {}).get("inputs", {}).get("batch_size")
                      == 1 and (pointer(env) or {}).get("step", 0) >= 2)
    killed_at = pointer(env)["step"]
    assert get_json(env, run_key("checkpoints", None, "lease.json"))  # kept by FORCE, left by the kill
    resumed = run_step("dotrain.py", changed)
    assert f"resuming at step {killed_at}" in resumed.stdout
    assert not [key for key in written(proxy)
                if key.startswith(("raw/", "standardized/", "models/", "model-ready/"))]
    second = done_manifest(env)
    assert second["complete"] and second["inputs"]["batch_size"] == 1
    assert second["total_steps"] == 6

    # A rerun with FORCE=1 and the same settings finds the work done: nothing is written.
    proxy.clear()
    for step in STEPS:
        assert "nothing to do" in run_step(step, changed).stdout
    assert written(proxy) == []

    # Without FORCE, changed settings over finished training are refused in one line.
    refused = run_step("dotrain.py", {**env, "LORA_R": "8"}, check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("error: ")
    assert "lora_r: 4 -> 8" in refused.stderr and "FORCE=1" in refused.stderr


def test_a_plan_without_a_checkpoint_is_replaced_without_asking(env, proxy):
    for step in STEPS[:3]:
        run_step(step, env)
    plan = run_key("checkpoints", None, "_manifest.json")
    kill_dotrain_when({**env, "SAVE_STEPS": "1000"}, lambda: get_json(env, plan) is not None)
    assert pointer(env) is None
    result = run_step("dotrain.py", {**env, "LEARNING_RATE": "2e-3"})
    assert "replacing" in result.stdout and "other inputs" in result.stdout
    assert done_manifest(env)["inputs"]["learning_rate"] == 2e-3


def test_rebuild_remakes_a_damaged_output_once_per_launch(env, proxy):
    for step in STEPS[:2]:
        run_step(step, env)
    damaged = f"standardized/{DATASET}/shard-00001.parquet"
    good = bucket_objects(env)[damaged]
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)
    client.put_object(Bucket=TEST_BUCKET, Key=damaged, Body=b"not parquet " * 100)
    failed = run_step("pretokenize.py", env, check=False)
    assert failed.returncode == 1 and "REBUILD=import-dataset" in failed.stderr.splitlines()[-1]
    # FORCE does not remake what was made from the same inputs.
    assert "nothing to do" in run_step("import-dataset.py", {**env, "FORCE": "1"}).stdout

    launch = {**env, "REBUILD": "import-dataset", "SKYPILOT_TASK_ID": "launch-1"}
    proxy.clear()
    run_step("import-dataset.py", launch)
    assert damaged in written(proxy) and bucket_objects(env)[damaged] == good
    # The same launch again (a managed job's recovery, another node): nothing is rebuilt twice.
    proxy.clear()
    assert "nothing to do" in run_step("import-dataset.py", launch).stdout
    assert written(proxy) == []
    # What reads the rebuilt output does not see other inputs: it was remade the same.
    run_step("pretokenize.py", env)
    unknown = run_step("import-dataset.py", {**env, "REBUILD": "import"}, check=False)
    assert unknown.returncode == 1 and "REBUILD names no step import" in unknown.stderr


def test_runs_side_by_side_and_pretokenize_rebuilt_by_two_nodes(env, proxy):
    for step in STEPS[:3]:
        run_step(step, env)
    run_step("dotrain.py", {**env, "RUN_NAME": "lr-1e-3"})
    run_step("dotrain.py", {**env, "RUN_NAME": "lr-2e-3", "LEARNING_RATE": "2e-3"})
    run_step("dotrain.py", env)  # the unnamed run, whose prefix holds the named ones
    assert done_manifest(env, "lr-1e-3")["inputs"]["learning_rate"] == 1e-3
    assert done_manifest(env, "lr-2e-3")["inputs"]["learning_rate"] == 2e-3
    # Replacing the unnamed run leaves the named ones alone.
    run_step("dotrain.py", {**env, "LORA_R": "8", "FORCE": "1"})
    objects = bucket_objects(env)
    for run in ("lr-1e-3", "lr-2e-3"):
        assert json.loads(objects[f"done/{MODEL}/{DATASET}/{run}/_manifest.json"])["complete"]
        assert f"done/{MODEL}/{DATASET}/{run}/fused/config.json" in objects
        assert pointer(env, run)["step"] == 6
    refused = run_step("dotrain.py", {**env, "RUN_NAME": "fused"}, check=False)
    assert refused.returncode == 1 and "RUN_NAME='fused'" in refused.stderr

    # REBUILD=pretokenize on two nodes of one launch: each remakes its own shards, the same bytes.
    before = {k: v for k, v in bucket_objects(env).items() if k.startswith("model-ready/")}
    launch = {**env, "REBUILD": "pretokenize", "SKYPILOT_TASK_ID": "launch-2", "SKYPILOT_NUM_NODES": "2"}
    nodes = [start_step("pretokenize.py", {**launch, "SKYPILOT_NODE_RANK": str(rank)}) for rank in (0, 1)]
    for node in nodes:
        output = node.communicate(timeout=300)[0]
        assert node.returncode == 0, output
    after = {k: v for k, v in bucket_objects(env).items() if k.startswith("model-ready/")}
    manifest = f"{model_ready_prefix(env)}/_manifest.json"
    assert json.loads(after[manifest])["inputs"]["rebuild"] == "launch-2"
    assert {k: v for k, v in after.items() if "/_" not in k} == {k: v for k, v in before.items() if "/_" not in k}
    assert "nothing to do" in run_step("dotrain.py", {**env, "LORA_R": "8"}).stdout  # still valid


def test_runs_with_other_data_settings_keep_their_data_and_force_in_one_spares_the_other(env, proxy):
    """A sweep over MAX_SEQ_LENGTH: each run's model-ready data sits in a folder of its own,
    made beside the other's without FORCE; pretokenize and training with FORCE=1 in one run
    delete nothing the other trained on: the other resumes from its checkpoint and finishes."""
    for step in STEPS[:2]:
        run_step(step, env)
    long, short = {**env, "RUN_NAME": "seq-128"}, {**env, "RUN_NAME": "seq-96", "MAX_SEQ_LENGTH": "96"}
    run_step("pretokenize.py", long)
    run_step("pretokenize.py", short)
    kill_dotrain_when(long, lambda: (pointer(env, "seq-128") or {}).get("step", 0) >= 2)
    killed_at = pointer(env, "seq-128")["step"]
    for step in ("pretokenize.py", "dotrain.py"):
        run_step(step, {**short, "FORCE": "1"})
    resumed = run_step("dotrain.py", long)
    assert f"resuming at step {killed_at}" in resumed.stdout
    data = {run: model_ready_prefix(settings) for run, settings in (("seq-128", long), ("seq-96", short))}
    assert data["seq-128"] != data["seq-96"]
    for run, length in (("seq-128", 128), ("seq-96", 96)):
        made_from = get_json(env, f"{data[run]}/_manifest.json")
        assert made_from["complete"] and made_from["max_seq_length"] == length
        done = done_manifest(env, run)
        assert done["complete"] and done["inputs"]["max_seq_length"] == length
        assert done["inputs"]["model_ready"] == common.manifest_fingerprint(made_from)


def test_one_launch_at_a_time_trains_a_run(env, proxy):
    """A second launch of a run is refused in one line while the first holds a live lease; a
    lease its launch left long ago is taken over; a recovery of the same managed job (the same
    SKYPILOT_TASK_ID) takes its own lease back at once and resumes."""
    for step in STEPS[:3]:
        run_step(step, env)
    lease = run_key("checkpoints", None, "lease.json")
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)
    client.put_object(Bucket=TEST_BUCKET, Key=lease, Body=json.dumps(
        {"holder": "gone-host pid 7", "task": "job-0", "renewed": "2020-01-01T00:00:00+00:00"}).encode())
    first = {**env, "SKYPILOT_TASK_ID": "job-1"}
    process = start_step("dotrain.py", first)
    output = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None and (get_json(env, lease) or {}).get("task") != "job-1":
        time.sleep(0.05)
    process.send_signal(signal.SIGSTOP)  # holding its lease, as one busy training
    try:
        held = get_json(env, lease)
        assert held and held["task"] == "job-1", "".join(output)
        second = run_step("dotrain.py", {**env, "SKYPILOT_TASK_ID": "job-2"}, check=False)
        assert second.returncode == 1 and len(second.stderr.splitlines()) == 1
        assert second.stderr.startswith(f"error: another launch is training this run: s3://{TEST_BUCKET}/"
                                        f"{lease} is held by {held['holder']} (SKYPILOT_TASK_ID job-1)")
    finally:
        process.send_signal(signal.SIGCONT)
    while process.poll() is None and (pointer(env) or {}).get("step", 0) < 2:
        time.sleep(0.05)
    process.kill()
    process.wait()
    reader.join()
    assert process.returncode == -9, "".join(output)
    assert "from gone-host pid 7 (SKYPILOT_TASK_ID job-0), renewed" in "".join(output)  # stale
    killed_at = pointer(env)["step"]

    # Preempted on another machine, its lease as fresh as a moment ago: the managed job's
    # recovery (its SKYPILOT_TASK_ID) takes it back at once, resumes and releases it at the end.
    client.put_object(Bucket=TEST_BUCKET, Key=lease, Body=json.dumps(
        {"holder": "spot-host pid 9", "machine": "spot-host 1", "pid": 9, "task": "job-1",
         "renewed": datetime.now(timezone.utc).isoformat()}).encode())
    recovered = run_step("dotrain.py", first)
    assert "this job's own" in recovered.stdout and f"resuming at step {killed_at}" in recovered.stdout
    assert done_manifest(env)["complete"] and get_json(env, lease) is None  # released at the end


def test_a_lease_is_renewed_until_it_is_released(tmp_path):
    from types import SimpleNamespace

    from common import Bucket, UserError
    from training.lease import Lease

    bucket = Bucket(SimpleNamespace(bucket_name=str(tmp_path / "bucket")))
    lease = Lease(bucket, "checkpoints/run", "job-1", seconds=0.3)
    lease.take()
    taken = json.loads(bucket.get(lease.key))
    renewing = threading.Thread(target=lease.renew)
    renewing.start()
    deadline = time.time() + 60
    while json.loads(bucket.get(lease.key))["renewed"] == taken["renewed"] and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(UserError, match="another launch is training this run"):
        Lease(bucket, "checkpoints/run", "job-2", seconds=60).take()
    lease.release()
    renewing.join()
    assert bucket.get(lease.key) is None


def test_a_lease_write_sent_again_after_its_first_landed_is_this_launchs(tmp_path, monkeypatch):
    """The storage client sends a PUT again when its reply is lost (a read timeout): if the first
    attempt landed, the retry fails its condition on the record that attempt wrote. Renewing and
    taking the lease find their own record there and go on."""
    from types import SimpleNamespace

    from common import Bucket
    from training.lease import Lease

    bucket = Bucket(SimpleNamespace(bucket_name=str(tmp_path / "bucket")))
    lease = Lease(bucket, "checkpoints/run", None, seconds=0.3)
    lease.take()
    taken = json.loads(bucket.get(lease.key))
    put = bucket.put

    def sent_twice(key, data, **condition):
        put(key, data, **condition)  # landed, its reply lost
        return put(key, data, **condition)

    monkeypatch.setattr(bucket, "put", sent_twice)
    stops = []
    monkeypatch.setattr(os, "_exit", lambda code: stops.append(code) or sys.exit(code))
    renewing = threading.Thread(target=lease.renew)
    renewing.start()
    deadline = time.time() + 60
    while renewing.is_alive() and json.loads(bucket.get(lease.key))["renewed"] == taken["renewed"] \
            and time.time() < deadline:
        time.sleep(0.01)
    assert stops == [] and json.loads(bucket.get(lease.key))["renewed"] != taken["renewed"]
    lease.release()
    renewing.join()
    assert bucket.get(lease.key) is None  # released: it went on with its record's ETag

    again = Lease(bucket, "checkpoints/run", None, seconds=60)
    again.take()
    assert json.loads(bucket.get(again.key))["take"] == again.take_id
    again.release()
    assert bucket.get(again.key) is None


def test_a_lease_is_stale_after_its_holders_lease_seconds(tmp_path):
    """A holder with a longer LEASE_SECONDS renews less often: a launch with the default one
    judges its lease by the holder's, recorded in it."""
    from datetime import timedelta
    from types import SimpleNamespace

    from common import Bucket, UserError
    from training.lease import Lease

    bucket = Bucket(SimpleNamespace(bucket_name=str(tmp_path / "bucket")))
    key = "checkpoints/run/lease.json"

    def held_since(seconds_ago, **fields):
        renewed = (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).isoformat()
        bucket.put(key, json.dumps({"holder": "other-host pid 7", "machine": "other-host 1",
                                    "pid": 7, "task": "job-1", "renewed": renewed, **fields}).encode())

    held_since(1200, seconds=3600)  # renewed every 1,200 s: alive
    with pytest.raises(UserError, match="not been renewed for its LEASE_SECONDS=3600"):
        Lease(bucket, "checkpoints/run", "job-2", seconds=300).take()
    held_since(3600, seconds=3600)
    Lease(bucket, "checkpoints/run", "job-2", seconds=300).take()
    assert json.loads(bucket.get(key))["task"] == "job-2"
    held_since(300)  # a lease that records none: the reader's
    Lease(bucket, "checkpoints/run", "job-3", seconds=300).take()
    assert json.loads(bucket.get(key))["task"] == "job-3"


def test_rebuild_marks_one_launch_outside_skypilot_once():
    """Without SKYPILOT_TASK_ID, the calls of one launch share its mark, also across the
    re-execution of dotrain.py for its export (the environment is kept): a finished rebuild is
    not started again."""
    from types import SimpleNamespace
    from unittest import mock

    settings = SimpleNamespace(rebuild="dotrain", skypilot_task_id=None)
    with mock.patch.dict(os.environ):  # the steps this module runs later are launches of their own
        os.environ.pop("REBUILD_LAUNCH", None)
        first = common.with_rebuild({"step": "dotrain/3"}, settings, "dotrain")
        assert first["rebuild"].startswith("local-")
        assert common.with_rebuild({"step": "dotrain/3"}, settings, "dotrain") == first
