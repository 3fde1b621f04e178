"""The whole pipeline under storage faults, SIGKILL at random moments, and two runs at once.

One fault-free reference run of the four steps (s3://test-bucket/ref/) gives the bytes every
other run must reproduce: through a proxy failing 10% of requests (faults/), after kills
(kill-N/), and when each step is launched twice at the same time (twice/). The dataset's first
raw shard and one model file are larger than s3fs's 8 MiB block, so that they are sent as
multipart uploads that a kill can leave open.
"""

import base64
import json
import random
import signal
import sys
import time
from pathlib import Path

import boto3
import pytest
import requests
from conftest import (FAKE_KEY_ID, FAKE_SECRET, ROOT, TEST_BUCKET, create_bucket, run_step,
                      start_step)

sys.path.insert(0, str(ROOT / "demo"))
MODEL, DATASET = "tiny/qwen2", "synthetic/colors"
SHARD_SIZE = 8  # three shards; training takes a few steps on each
PADDING = 2**20  # random bytes in each row of shard 0: 8 MiB of base64, ~9 MB of Parquet
STEPS = ("import-dataset.py", "import-model.py", "pretokenize.py", "dotrain.py")
# Outputs compared byte for byte; dotrain's (checkpoints/, done/) hold times and are compared
# by their step counts.
DATA_PREFIXES = ("raw/", "standardized/", "models/", "model-ready/")
TRAINING = {"MAX_SEQ_LENGTH": "128", "BATCH_SIZE": "2", "GRAD_ACCUM": "1", "WARMUP_STEPS": "1",
            "LEARNING_RATE": "1e-3", "LORA_R": "4", "SAVE_STEPS": "1", "NUM_PROC": "1",
            "SAMPLE_PROMPT": "The car is red. What color is the car?", "OMP_NUM_THREADS": "1",
            "EVAL_ROWS": "3"}
KILLS = 5


def client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)


def objects_under(s3, prefix):
    """{key under prefix: bytes} of the test bucket."""
    c, found = client(s3["AWS_ENDPOINT_URL_S3"]), {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=TEST_BUCKET, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            found[item["Key"][len(prefix) + 1:]] = c.get_object(Bucket=TEST_BUCKET,
                                                                Key=item["Key"])["Body"].read()
    return found


def put_objects(s3, prefix, objects):
    c = client(s3["AWS_ENDPOINT_URL_S3"])
    for key, data in objects.items():
        c.put_object(Bucket=TEST_BUCKET, Key=f"{prefix}/{key}", Body=data)


def open_uploads(s3, prefix=""):
    return client(s3["AWS_ENDPOINT_URL_S3"]).list_multipart_uploads(
        Bucket=TEST_BUCKET, Prefix=prefix).get("Uploads", [])


def data_outputs(objects, step=None):
    prefixes = {"import-dataset.py": ("raw/", "standardized/"), "import-model.py": ("models/",),
                "pretokenize.py": ("model-ready/",)}.get(step, DATA_PREFIXES)
    return {k: without_rebuild_mark(k, v) for k, v in objects.items() if k.startswith(prefixes)}


def without_rebuild_mark(key, data):
    """An object as a run without REBUILD makes it: a rebuild makes the same bytes, but for the
    launch id its manifests and markers record with their inputs (when a killed run's kill
    came late and it finished, the next run of the kill loop rebuilds)."""
    if not key.endswith(".json"):
        return data
    made = json.loads(data)
    if "rebuild" not in made.get("inputs", {}):
        return data
    del made["inputs"]["rebuild"]
    return json.dumps(made, indent=1, sort_keys=True).encode()


def step_env(world, prefix, **extra):
    return {**world.s3, "BUCKET_NAME": f"s3://{TEST_BUCKET}/{prefix}", "MODEL_NAME": MODEL,
            "DATASET_NAME": DATASET, "DATASET_SOURCE": str(world.dataset),
            "MODEL_SOURCE": str(world.model), "SHARD_SIZE": str(SHARD_SIZE),
            "MODEL_CACHE_DIR": str(world.tmp / prefix / "cache"),
            "WORK_DIR": str(world.tmp / prefix / "work"), **TRAINING, **extra}


def trained_steps(objects):
    """dotrain's outcome: the done manifest's step count, and the shard of each step trained."""
    done = json.loads(objects[f"done/{MODEL}/{DATASET}/_manifest.json"])
    metrics = json.loads(objects[f"done/{MODEL}/{DATASET}/metrics.json"])
    assert done["complete"]
    return done["total_steps"], [(e["step"], e["shard"]) for e in metrics["steps"]]


class World:
    pass


@pytest.fixture(scope="module")
def world(s3_server, tmp_path_factory):
    """The inputs (a dataset file, a tiny model) and the fault-free reference run in ref/."""
    from synthetic import conversations, make_model, make_tokenizer

    requests.post(f"{s3_server}/moto-api/reset", timeout=30)
    create_bucket(s3_server)
    w = World()
    w.s3 = {"BUCKET_NAME": TEST_BUCKET, "AWS_ENDPOINT_URL_S3": s3_server, "AWS_REGION": "auto",
            "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    w.tmp = tmp_path_factory.mktemp("reliability")
    rng = random.Random(5)
    rows = conversations(3 * SHARD_SIZE, seed=3)
    for row in rows[:SHARD_SIZE]:
        row["id"] = base64.b64encode(rng.randbytes(PADDING)).decode()
    w.dataset = w.tmp / "chat.jsonl"
    w.dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    make_tokenizer(w.tmp / "tokenizer")
    w.model = Path(make_model(w.tmp / "model", w.tmp / "tokenizer"))
    (w.model / "README.md").write_bytes(rng.randbytes(9 * 2**20))  # a multipart upload
    w.seconds = {}
    for step in STEPS:
        began = time.time()
        run_step(step, step_env(w, "ref"))
        w.seconds[step] = time.time() - began
    print("reference run, seconds per step:", {k: round(v, 1) for k, v in w.seconds.items()})
    w.ref = objects_under(w.s3, "ref")
    w.steps = trained_steps(w.ref)
    assert {shard for _, shard in w.steps[1]} == {0, 1, 2}  # training crosses every shard
    return w


# ---------------------------------------------------------------- faults


def test_pipeline_through_faulty_storage_makes_the_same_outputs(world):
    from s3proxy import S3Proxy

    proxy = S3Proxy(int(world.s3["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1]), fault_rate=0.1, seed=7,
                    stall_seconds=3)
    seconds = {}
    try:
        for step in STEPS:
            began = time.time()
            run_step(step, step_env(world, "faults", S3_TIMEOUT="2",
                                    AWS_ENDPOINT_URL_S3=proxy.url))
            seconds[step] = round(time.time() - began, 1)
    finally:
        proxy.close()
    print("through faults, seconds per step:", seconds)
    kinds = {fault for fault, _, _ in proxy.faults}
    print(f"{len(proxy.faults)} faults injected in {len(proxy.requests) + len(proxy.faults)} "
          f"requests: {sorted(kinds)}")
    assert len(kinds) == 4, proxy.faults  # 503, 500, reset and stall all happened
    assert any(method in ("PUT", "POST") for _, method, _ in proxy.faults)
    got = objects_under(world.s3, "faults")
    assert data_outputs(got) == data_outputs(world.ref)
    assert trained_steps(got) == world.steps
    assert open_uploads(world.s3, "faults/") == []


# ---------------------------------------------------------------- crashes


def check_manifests(objects, reference):
    """No complete manifest over a partial output: what a complete manifest lists is there,
    exactly as in the reference run."""
    for key, data in objects.items():
        if not key.endswith("_manifest.json") or key.startswith(("checkpoints/", "done/")):
            continue
        manifest = json.loads(data)
        if manifest.get("complete"):
            assert without_rebuild_mark(key, data) == reference[key], key
            folder = key.rsplit("/", 1)[0]
            for entry in manifest["shards"] + manifest.get("eval", []):
                for listed in entry.get("parts", [entry]):  # model-ready: a shard's parts
                    name = f"{folder}/{listed['path']}"
                    assert objects.get(name) == reference[name], name


def kill_at(env, step, seconds, until=None):
    """Start a step, SIGKILL it after `seconds` (or once until() holds); False if it ended first."""
    process = start_step(step, env)
    deadline = time.time() + seconds
    while process.poll() is None and time.time() < deadline and not (until and until()):
        time.sleep(0 if until else 0.05)
    if process.poll() is not None:
        output = process.communicate()[0]
        assert process.returncode == 0, output
        return False
    process.send_signal(signal.SIGKILL)
    process.communicate()
    return True


def seed_inputs(world, prefix, step):
    """What a step reads, copied from the reference run into prefix."""
    needs = {"pretokenize.py": ("standardized/", "models/"),
             "dotrain.py": ("standardized/", "models/", "model-ready/")}.get(step, ())
    put_objects(world.s3, prefix, {k: v for k, v in world.ref.items() if k.startswith(needs)})


@pytest.mark.parametrize("step", STEPS)
def test_killed_at_random_moments_then_rerun_makes_the_same_outputs(world, step):
    """For the steps that stream large objects, killed while an upload of several parts is
    open; then killed five times at seeded random moments, each run resuming what the one
    before left; then run to the end."""
    rng = random.Random(f"kill {step}")
    prefix = f"kill-{step}"
    seed_inputs(world, prefix, step)
    # Each rerun starts a moment after the kill: no twin runs, so no open upload is young.
    env = step_env(world, prefix, STALE_UPLOAD_SECONDS="0")
    kills = []
    if step in ("import-dataset.py", "import-model.py"):
        # The upload is open for a fraction of a second: REBUILD makes a missed one start over.
        assert any(kill_at({**env, "REBUILD": step[:-3] if attempt else ""}, step, world.seconds[step] * 3,
                           until=lambda: open_uploads(world.s3, prefix + "/"))
                   for attempt in range(5)), f"{step} ended before any multipart upload was seen"
        kills.append(("upload open", True, len(open_uploads(world.s3, prefix + "/"))))
        check_manifests(objects_under(world.s3, prefix), world.ref)
    finished = False
    for _ in range(KILLS):
        # After a run that finished before its kill, REBUILD makes the next one start over.
        moment = rng.uniform(0.5, world.seconds[step])
        finished = not kill_at({**env, "REBUILD": step[:-3] if finished else ""}, step, moment)
        kills.append((round(moment, 2), not finished, len(open_uploads(world.s3, prefix + "/"))))
        check_manifests(objects_under(world.s3, prefix), world.ref)
    print(f"{step}: ran {world.seconds[step]:.1f} s uninterrupted; kills (second, killed, "
          f"open uploads left): {kills}")
    # A run resumed after a late kill may finish before its own kill: most kills land.
    assert sum(killed for _, killed, _ in kills) >= KILLS // 2

    run_step(step, env)
    got = objects_under(world.s3, prefix)
    check_manifests(got, world.ref)
    if step == "dotrain.py":
        assert trained_steps(got) == world.steps  # every step once, each on its shard
        # The last checkpoint, and the one before it (kept for a reader of the pointer before)
        last = world.steps[0]
        kept = {int(k.split("/checkpoint-")[1].split("/")[0]) for k in got if "/checkpoint-" in k}
        assert last in kept and kept <= {last - 1, last}, kept
    else:
        assert data_outputs(got, step) == data_outputs(world.ref, step)
        assert data_outputs(got, step), "no output"
    assert open_uploads(world.s3, prefix + "/") == [], "an upload of a killed run is left open"
    assert not [k for k in got if "/.tmp" in k or k.endswith(".tmp")]


# ---------------------------------------------------------------- two runs at once


def test_each_step_launched_twice_at_once_makes_the_outputs_of_one_run(world):
    env = step_env(world, "twice")
    kept = 0
    for steps in (("import-dataset.py", "import-model.py"), ("pretokenize.py",)):
        processes = [start_step(step, env) for step in steps for _ in range(2)]
        for process in processes:
            output = process.communicate(timeout=300)[0]
            assert process.returncode == 0, output
            assert "Traceback" not in output
            kept += output.count("keeping its manifest") + output.count("another node wrote")
    print(f"manifest writes that found the other run as far along: {kept}")
    got = objects_under(world.s3, "twice")
    assert data_outputs(got) == data_outputs(world.ref)
    assert open_uploads(world.s3, "twice/") == []


def test_a_manifest_never_moves_backwards(s3, monkeypatch):
    """Two writers of one manifest, each conditional on what it last saw (If-Match on the real
    server): a slower one never replaces a manifest that is further along, and one that is
    further along replaces a manifest that is not."""
    from types import SimpleNamespace

    from common import UserError, open_bucket, read_manifest, write_manifest

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    settings = SimpleNamespace(bucket_name=TEST_BUCKET, aws_endpoint_url_s3=s3["AWS_ENDPOINT_URL_S3"],
                               aws_region="auto", s3_timeout=10)
    fast, slow = open_bucket(settings), open_bucket(settings)
    inputs = {"step": "test/1"}

    def manifest(shards, complete=False):
        return {"complete": complete, "inputs": inputs, "rows": shards,
                "shards": [{"path": f"shard-{i}", "rows": 1} for i in range(shards)]}

    assert read_manifest(fast, "out") is None and read_manifest(slow, "out") is None
    write_manifest(fast, "out", manifest(1))
    write_manifest(fast, "out", manifest(2, complete=True))
    assert write_manifest(slow, "out", manifest(1)) == manifest(2, complete=True)
    assert read_manifest(fast, "out") == manifest(2, complete=True)
    # What a retried PUT whose first attempt did land finds: its own manifest, kept.
    assert write_manifest(slow, "out", manifest(2, complete=True)) == manifest(2, complete=True)

    write_manifest(fast, "other", manifest(1))
    assert write_manifest(slow, "other", manifest(2)) == manifest(2)  # further: written over
    assert read_manifest(fast, "other") == manifest(2)

    stranger = open_bucket(settings)
    read_manifest(stranger, "out")
    write_manifest(fast, "out", manifest(3, complete=True))
    with pytest.raises(UserError, match="another run with other settings"):
        write_manifest(stranger, "out", {**manifest(1), "inputs": {"step": "test/2"}})
