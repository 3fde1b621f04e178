"""What dotrain.py does on a GPU node, decided from what the node has: the backend, the
precision and the optimizer for each GPU; never a silent CPU run beside a GPU torch cannot use;
the learning-rate schedule kept on the step count when fp16's loss scaler skips a step."""

import sys

import pytest
from conftest import ROOT, run_step

import common
import dotrain

sys.path.insert(0, str(ROOT / "demo"))
T4, V100, A10G, L4, A100, H100 = (7, 5), (7, 0), (8, 6), (8, 9), (8, 0), (9, 0)

DECISIONS = [  # (TRAIN_BACKEND, capability, unsloth, bitsandbytes, processes, measured faster)
    #             -> backend, dtype, optimizer
    ("auto", None, False, False, 1, None, ("peft", "float32", "adamw_torch")),
    ("auto", None, True, True, 1, None, ("peft", "float32", "adamw_torch")),  # no CUDA: no unsloth, no 8-bit
    ("peft", None, False, False, 2, None, ("peft", "float32", "adamw_torch")),
    ("auto", T4, True, True, 1, None, ("unsloth", "float16", "adamw_8bit")),  # T4: no native bf16
    ("auto", V100, False, True, 1, None, ("peft", "float16", "adamw_8bit")),
    ("peft", T4, True, False, 1, None, ("peft", "float16", "adamw_torch")),
    ("auto", A10G, True, True, 1, None, ("unsloth", "bfloat16", "adamw_8bit")),
    ("auto", L4, False, True, 1, None, ("peft", "bfloat16", "adamw_8bit")),
    ("auto", A100, True, True, 4, None, ("peft", "bfloat16", "adamw_8bit")),  # several GPUs: DDP, peft
    ("peft", H100, True, True, 1, None, ("peft", "bfloat16", "adamw_8bit")),
    ("unsloth", H100, True, False, 1, None, ("unsloth", "bfloat16", "adamw_torch")),
    ("auto", H100, False, False, 8, None, ("peft", "bfloat16", "adamw_torch")),
    # the GPU benchmark measured the two backends at the model's size (training.speed.measured_faster)
    ("auto", H100, True, True, 1, "peft", ("peft", "bfloat16", "adamw_8bit")),
    ("auto", L4, True, True, 1, "unsloth", ("unsloth", "bfloat16", "adamw_8bit")),
    ("auto", L4, False, True, 1, "unsloth", ("peft", "bfloat16", "adamw_8bit")),  # not installed
    ("unsloth", H100, True, True, 1, "peft", ("unsloth", "bfloat16", "adamw_8bit")),  # asked for
]


@pytest.mark.parametrize("train_backend, capability, has_unsloth, has_bnb, world, faster, decided", DECISIONS)
def test_backend_precision_and_optimizer_by_the_gpus_capabilities(train_backend, capability, has_unsloth,
                                                                  has_bnb, world, faster, decided):
    assert dotrain.decide(train_backend, capability, has_unsloth, has_bnb, world, False, faster) == decided
    if capability is not None and has_bnb:  # 4-bit: the same decision on a 4-bit base
        assert dotrain.decide(train_backend, capability, has_unsloth, has_bnb, world, True, faster) == decided


@pytest.fixture(scope="module")
def trained_inputs(tmp_path_factory):
    """A local bucket with what steps 1 to 3 make of a few synthetic conversations."""
    import json

    from synthetic import conversations, make_model, make_tokenizer

    tmp = tmp_path_factory.mktemp("gpu-node")
    (tmp / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in conversations(30, seed=5)))
    make_tokenizer(tmp / "tokenizer")
    env = {"BUCKET_NAME": f"file://{tmp / 'bucket'}", "MODEL_NAME": "tiny/m", "DATASET_NAME": "d",
           "MODEL_CACHE_DIR": str(tmp / "cache"), "WORK_DIR": str(tmp / "work"), "EVAL_ROWS": "3",
           "MAX_SEQ_LENGTH": "128", "NUM_PROC": "1", "MAX_STEPS": "2", "OMP_NUM_THREADS": "1",
           # an adapter strong enough in 2 steps for the 16-bit fused model to hold it
           "LEARNING_RATE": "1e-2", "WARMUP_STEPS": "0"}
    run_step("import-dataset.py", {**env, "DATASET_SOURCE": str(tmp / "chat.jsonl")})
    run_step("import-model.py", {**env, "MODEL_SOURCE": make_model(tmp / "model", tmp / "tokenizer")})
    run_step("pretokenize.py", env)
    return env, tmp


def test_a_gpu_that_torch_cannot_use_is_an_error_not_a_cpu_run(trained_inputs, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine's torch can use its GPU")
    env, _ = trained_inputs
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text('#!/bin/sh\necho "NVIDIA L4, 535.183.01"\n')  # a 535 driver
    (bin_ / "nvidia-smi").chmod(0o755)
    gpu_node = {**env, "PATH": f"{bin_}:/usr/bin:/bin"}
    refused = run_step("dotrain.py", gpu_node, check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: this machine has an NVIDIA GPU (NVIDIA L4, driver 535.183.01) and torch "
        f"{torch.__version__}, built for {f'CUDA {torch.version.cuda}' if torch.version.cuda else 'no CUDA'}, "
        "cannot use it: install the torch build for this driver (allatonce.yaml's setup picks it: "
        "see torch-for-driver.sh), or set TRAIN_DEVICE=cpu to train on the CPU")
    assert "training" not in refused.stdout
    # Asked for explicitly, the CPU trains.
    trained = run_step("dotrain.py", {**gpu_node, "TRAIN_DEVICE": "cpu"})
    assert "backend: peft on cpu, float32" in trained.stdout


def test_the_schedule_stays_on_the_step_count_when_fp16_skips_a_step():
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments, get_linear_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10)
    state, keep = TrainerState(), dotrain.KeepScheduleOnStep()
    for step in range(1, 7):
        optimizer.step()
        if step != 3:  # the loss scaler skipped step 3: transformers did not step the schedule
            schedule.step()
        state.global_step = step
        keep.on_step_end(TrainingArguments("unused"), state, TrainerControl(), lr_scheduler=schedule)
        assert schedule.last_epoch == step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0 * (10 - 6) / (10 - 2))
