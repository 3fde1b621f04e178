"""allatonce.yaml's run block on two nodes at once (two bash processes on this machine, as
SkyPilot runs it on each node), each with two training processes (torchrun, DDP on the CPU
with gloo, as two GPUs a node would run, with gradient checkpointing as on GPUs)."""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import time
from types import SimpleNamespace

import boto3
from conftest import FAKE_KEY_ID, FAKE_SECRET, ROOT, TEST_BUCKET, bucket_objects, descendants

from demo import run as demo

DONE = f"done/{demo.MODEL_NAME}/{demo.DATASET_NAME}"
POINTER = f"checkpoints/{demo.MODEL_NAME}/{demo.DATASET_NAME}/latest.json"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GPUS = 2  # training processes on each node


def start_nodes(env, tmp_path, nodes=2):
    """The run block on every node at once, to its end; each node has its own disk (work and
    model cache). Their outputs."""
    procs = launch_nodes(env, tmp_path, nodes)
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {rank}:\n{output[-6000:]}"
    return outputs


def launch_nodes(env, tmp_path, nodes):
    port = str(free_port())
    procs = []
    for rank in range(nodes):
        node = {**env, "WORK_DIR": str(tmp_path / f"node{rank}" / "work"),
                "MODEL_CACHE_DIR": str(tmp_path / f"node{rank}" / "model-cache"),
                "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NUM_NODES": str(nodes),
                "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * nodes),
                "SKYPILOT_NUM_GPUS_PER_NODE": str(GPUS), "TRAIN_PORT": port}
        procs.append(subprocess.Popen(["bash", "-c", demo.yaml.safe_load(demo.TASK.read_text())["run"]],
                                      cwd=ROOT, env=node, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def kill_nodes_when(env, tmp_path, condition, nodes=2):
    """Start every node, SIGKILL each one's processes (torchrun's workers too) as soon as
    latest.json satisfies `condition`; the pointer they were killed at, and their outputs."""
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)
    procs = launch_nodes(env, tmp_path, nodes)
    deadline = time.time() + 600
    while time.time() < deadline and all(proc.poll() is None for proc in procs):
        try:
            pointer = json.loads(client.get_object(Bucket=TEST_BUCKET, Key=POINTER)["Body"].read())
        except client.exceptions.NoSuchKey:
            pointer = None
        if pointer and condition(pointer):
            for proc in procs:
                for pid in [*descendants(proc.pid), proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            outputs = [proc.communicate()[0] for proc in procs]
            # (the run may have named a later checkpoint before the kill landed)
            return json.loads(client.get_object(Bucket=TEST_BUCKET, Key=POINTER)["Body"].read()), outputs
        time.sleep(0.2)
    raise AssertionError("the nodes finished (or hung) before the condition: "
                         + "".join((proc.communicate()[0] or "")[-3000:] for proc in procs))


def test_two_nodes_share_the_work_train_each_sequence_once_resume_and_a_rerun_writes_nothing(
        s3, proxy, tmp_path):
    inputs = demo.make_inputs(tmp_path / "inputs", rows=160)
    env = demo.demo_env(s3["AWS_ENDPOINT_URL_S3"], s3["BUCKET_NAME"], inputs, tmp_path,
                        SHARD_SIZE="50", MAX_SEQ_LENGTH="128", GRAD_ACCUM="1", OMP_NUM_THREADS="1",
                        WAIT_TIMEOUT="300", SAVE_STEPS="1", EVAL_ROWS="8", GRADIENT_CHECKPOINTING="1")
    world = 2 * GPUS
    # Both nodes killed inside the second shard, then launched again: they resume there.
    killed_at, outputs = kill_nodes_when(env, tmp_path, lambda pointer: pointer["shard"] == 1
                                         and pointer["steps_into_shard"] > 0)
    assert "node 1 of 2" in outputs[1]  # pretokenize gave node 1 its share
    assert "backend: peft on cpu, float32, adamw_torch, attention: sdpa, gradient checkpointing" in outputs[0]
    outputs = start_nodes(env, tmp_path)
    assert f"resuming at step {killed_at['step']}: shard {killed_at['shard']}" in outputs[0]

    objects = bucket_objects(s3)
    done = json.loads(objects[f"{DONE}/_manifest.json"])
    assert done["complete"] and done["rows"] == 160 - 8
    metrics = json.loads(objects[f"{DONE}/metrics.json"])
    assert metrics["world_size"] == world
    for index, shard in enumerate(metrics["shards"]):
        # dotrain checked that the ranks' sequences were disjoint and covered the shard (what
        # the resumed run had left of it); here: every rank trained, on all of it, in the
        # planned number of steps
        resumed = killed_at["steps_into_shard"] * 2 * 1 * world if index == killed_at["shard"] else 0
        assert shard["sequences_before_resume"] == resumed
        assert sum(shard["sequences_by_rank"]) + resumed == shard["sequences"]
        assert len(shard["sequences_by_rank"]) == world
        assert shard["steps"] == math.ceil(math.ceil(shard["sequences"] / 2) / world)
        assert shard["storage_wait_s"] >= 0
    assert all(sum(shard["sequences_by_rank"][rank] for shard in metrics["shards"]) > 0
               for rank in range(world))  # every process trained
    assert [entry["step"] for entry in metrics["steps"]] == list(range(1, done["total_steps"] + 1))
    # each node prepared each shard once for its two processes, and measured its scratch disk
    for output in outputs:
        for shard in metrics["shards"][1:]:
            assert output.count(f"prepared {shard['path']}") == 1, output[-3000:]
    assert set(metrics["work_dir_peak_bytes"]) == {"node 0", "node 1"}
    # every process's RNG state reached the bucket, node 1's from node 1
    checkpoint = POINTER.rsplit("/", 1)[0] + "/" + json.loads(objects[POINTER])["checkpoint"]
    assert {f"rng_state_{rank}.pth" for rank in range(world)} <= {
        key.rsplit("/", 1)[1] for key in objects if key.startswith(checkpoint + "/")}
    assert len(metrics["evaluations"]) >= 2

    import torch
    from transformers import AutoModelForCausalLM

    fused = demo.copy_fused(s3["AWS_ENDPOINT_URL_S3"], s3["BUCKET_NAME"], tmp_path / "fused")
    model = AutoModelForCausalLM.from_pretrained(fused)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()

    start_nodes({**env, "AWS_ENDPOINT_URL_S3": proxy.url}, tmp_path)
    assert proxy.writes() == []
    assert bucket_objects(s3) == objects


def test_the_ranks_share_a_shard_in_batches_once_and_make_the_planned_steps():
    from training.processes import Ranks, rank_batches
    from training.shards import optimizer_steps

    settings = SimpleNamespace(batch_size=2, grad_accum=3)
    for world in (1, 2, 3):
        for sequences in (1, 2, 5, 6, 7, 13, 40):
            batches = [rank_batches(sequences, settings.batch_size, Ranks(rank, 0, world))
                       for rank in range(world)]
            served = [index for mine in batches for batch in mine for index in batch if index < sequences]
            assert sorted(served) == list(range(sequences))  # each once
            assert all(len(batch) <= settings.batch_size for mine in batches for batch in mine)
            assert len({len(mine) for mine in batches}) == 1  # the same steps on every rank
            assert math.ceil(len(batches[0]) / settings.grad_accum) == optimizer_steps(
                sequences, settings, world)
