"""What dotrain.py does on a GPU node, decided from what the node has: the backend, the
precision and the optimizer for each GPU; never a silent CPU run beside a GPU torch cannot use;
the learning-rate schedule kept on the step count when fp16's loss scaler skips a step."""

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT, fixture_path, run_step

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
    # the GPU benchmark measured the two backends at the model's size (training.speed.measured_faster,
    # consulted on GPUs of compute capability 8.0+ only: MEASURED_DECISIONS)
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


MEASURED_DECISIONS = [  # (TRAIN_BACKEND, capability, processes, model) -> the backend measured
    #                       faster that decides, what the log says of the measurements
    ("auto", H100, 1, "qwen2.5-0.5b", "peft", "peft trained "),  # bench/results/gpu_train.json
    ("auto", A10G, 1, "qwen2.5-0.5b", "peft", "peft trained "),
    # fp16 and other attention kernels than the measured GPU's: unsloth when it is installed
    ("auto", T4, 1, "qwen2.5-0.5b", None, "the GPU benchmark measured a GPU of compute capability 8.0 or "
     "more and this one is 7.5, where training runs in float16 with other attention kernels: its figures "
     "do not decide here: unsloth when it is installed"),
    ("auto", V100, 1, "qwen2.5-0.5b", None, "the GPU benchmark measured a GPU of compute capability 8.0 "
     "or more and this one is 7.0"),
    ("auto", H100, 1, "no sizes", None, "config.json gives no sizes: unsloth when it is installed"),
    ("auto", H100, 4, "qwen2.5-0.5b", None, None),  # DDP: peft
    ("peft", H100, 1, "qwen2.5-0.5b", None, None),  # asked for
    ("auto", None, 1, "qwen2.5-0.5b", None, None),  # no GPU
]


@pytest.mark.parametrize("train_backend, capability, world, model, faster, why", MEASURED_DECISIONS)
def test_the_gpu_benchmark_decides_auto_on_one_bf16_gpu_only(train_backend, capability, world, model,
                                                             faster, why):
    """backend_choice, which the memory check and choose_backend share: decide() with what this
    machine has installed, fed the backend measured faster where the measurements apply."""
    config = json.loads(fixture_path("tokenizers", model, "config.json").read_text()) \
        if model != "no sizes" else {"model_type": "custom"}
    settings = SimpleNamespace(train_backend=train_backend, load_in_4bit=False, packing=True)
    name, dtype, optim, said = dotrain.backend_choice(settings, capability, world, config)
    has_unsloth, has_bnb = (importlib.util.find_spec(package) is not None
                            for package in ("unsloth", "bitsandbytes"))
    assert (name, dtype, optim) == dotrain.decide(train_backend, capability, has_unsloth, has_bnb, world,
                                                  False, faster)
    assert said is None if why is None else said.startswith(why)


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


# ---------------------------------------------------------------- fp16's loss scaler


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from synthetic import make_model, make_tokenizer

    out = tmp_path_factory.mktemp("tiny")
    make_tokenizer(out / "tokenizer")
    return make_model(out / "model", out / "tokenizer")


def tiny_trainer(backend, model_dir, output_dir, max_steps, callbacks=(), save_steps=1000):
    """dotrain's trainer of the tiny model on max_steps rows of 16 tokens, one row a step."""
    from types import SimpleNamespace

    import datasets
    from transformers import AutoTokenizer

    from training.processes import Ranks

    settings = SimpleNamespace(seed=0, batch_size=1, grad_accum=1, learning_rate=1e-3, warmup_steps=0,
                               weight_decay=0.0, max_seq_length=64, packing=False, save_steps=save_steps,
                               logging_steps=1, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                               lora_targets="all-linear", lr_scheduler="linear", report_to="none")
    model, _ = dotrain.load_for_training(settings, backend, str(model_dir), Ranks())
    ids = [[5 + (row + k) % 40 for k in range(16)] for row in range(max_steps)]
    rows = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    trainer = dotrain.make_trainer(settings, backend, model, AutoTokenizer.from_pretrained(model_dir),
                                   rows, SimpleNamespace(trainer=str(output_dir)), max_steps, callbacks)
    trainer.shard, trainer.seconds = 0, lambda: 0.0
    return trainer


def fp16_trainer(model_dir, output_dir, max_steps, overflow_at, callbacks, save_steps=1000):
    """dotrain's trainer in fp16, on the CPU, whose loss overflows (inf) at the steps
    `overflow_at`. accelerate gives fp16 on the CPU no loss scaler: this one gets torch's CPU
    GradScaler, where accelerate gives a CUDA one on a GPU (the same mechanism: a step whose
    gradients are not finite is skipped and the scale halved)."""
    import math

    import torch

    backend = dotrain.Backend("peft", "cpu", "float16", "adamw_torch")

    class Overflowing(dotrain.shard_trainer_class(backend)):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * math.inf if self.state.global_step + 1 in overflow_at else loss

    backend.trainer_class = Overflowing
    trainer = tiny_trainer(backend, model_dir, output_dir, max_steps, callbacks, save_steps)
    trainer.accelerator.scaler, trainer.accelerator.native_amp = torch.amp.GradScaler("cpu"), True
    return trainer


def logged(trainer, key):
    return [entry.get(key) for entry in trainer.state.log_history if "loss" in entry]


def test_fp16_overflow_is_logged_counted_and_carried_across_a_resume(tiny_model, tmp_path, capsys):
    import math

    from training.precision import skipped_steps
    from training.shards import UnitRecord

    # Steps 1-3 (step 2 overflows), saved at step 3 as a checkpoint.
    records = {"0": UnitRecord()}
    first = fp16_trainer(tiny_model, tmp_path, 3, {2}, [skipped_steps(records, records["0"], 0.05)],
                         save_steps=3)
    first.train()
    losses = logged(first, "loss")
    assert math.isinf(losses[1]) and all(math.isfinite(loss) and loss > 0 for loss in losses[::2]), losses
    assert logged(first, "loss_scale") == [65536.0, 32768.0, 32768.0]
    assert records["0"].skipped_steps == [2]
    assert "step 2: the fp16 loss scaler skipped the optimizer step" in capsys.readouterr().out
    pointer = {key: record.as_json() for key, record in records.items()}  # as latest.json holds them

    # Resumed from it (its records from the pointer, the loss scale from the checkpoint) to step
    # 6, step 4 overflowing: the run's skipped steps and the scale go on from where they were.
    records = {key: UnitRecord(**record) for key, record in pointer.items()}
    second = fp16_trainer(tiny_model, tmp_path, 6, {4}, [skipped_steps(records, records["0"], 0.05)])
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    losses = logged(second, "loss")
    assert [math.isfinite(loss) for loss in losses] == [True, False, True, False, True, True], losses
    assert logged(second, "loss_scale")[3:] == [16384.0, 16384.0, 16384.0]
    assert records["0"].skipped_steps == [2, 4]
    assert second.lr_scheduler.last_epoch == second.state.global_step == 6


def test_fp16_fails_the_run_in_one_line_once_too_many_steps_are_skipped(tiny_model, tmp_path):
    from training.precision import SCALE_SEARCH_STEPS, skipped_steps, too_many_skipped
    from training.shards import UnitRecord

    # 16 skipped steps (finding a scale from 2^16) pass however few steps there were; beyond,
    # MAX_SKIPPED_FRACTION of the steps may be skipped.
    assert SCALE_SEARCH_STEPS == 16
    assert not too_many_skipped(16, 16, 0.05) and too_many_skipped(17, 17, 0.05)
    assert not too_many_skipped(50, 1000, 0.05) and too_many_skipped(51, 1000, 0.05)
    assert not too_many_skipped(17, 20, 1.0)

    # Every step from step 2 on overflows: the run stops at the 17th skipped step (step 18).
    records = {"0": UnitRecord(skipped_steps=[]), "1": UnitRecord()}
    trainer = fp16_trainer(tiny_model, tmp_path, 30, set(range(2, 31)),
                           [skipped_steps(records, records["1"], 0.05)])
    with pytest.raises(common.UserError) as failed:
        trainer.train()
    assert trainer.state.global_step == 18 and len(records["1"].skipped_steps) == 17
    assert "\n" not in str(failed.value)
    assert str(failed.value).startswith("the fp16 loss scaler skipped 17 of the first 18 optimizer "
                                        "steps (their gradients overflowed float16), more than "
                                        "MAX_SKIPPED_FRACTION=0.05 of them")


def test_ddp_searches_no_unused_parameters_and_checkpointing_follows_the_setting(tiny_model, tmp_path):
    for checkpointing, expected in ((None, False), (True, True)):  # None: auto, off on the CPU
        backend = dotrain.Backend("peft", "cpu", "float32", "adamw_torch", gradient_checkpointing=checkpointing)
        backend.trainer_class = dotrain.shard_trainer_class(backend)
        trainer = tiny_trainer(backend, tiny_model, tmp_path, 1)
        # (transformers would have DDP search for unused parameters after every backward of a
        # PeftModel: every LoRA weight is used at every step)
        assert trainer.accelerator.ddp_handler.find_unused_parameters is False
        assert trainer.args.gradient_checkpointing is expected
    assert dotrain.Backend("peft", "cuda", "bfloat16", "adamw_8bit").gradient_checkpointing is True


# ---------------------------------------------------------------- a resume on another kind of GPU


@pytest.mark.parametrize("planned, dtype, outcome", [
    (None, "float16", None),  # a plan from before precisions were recorded
    ("bfloat16", "bfloat16", None),
    ("float16", "bfloat16", "trained in float16: resuming in bfloat16"),
    ("bfloat16", "float32", "trained in bfloat16: resuming in float32"),
    ("float32", "bfloat16", "trained in float32: resuming in bfloat16"),
    ("bfloat16", "float16", "error: the checkpoints of this run were trained in bfloat16 and this GPU "
     "computes float16 only"),
    ("float32", "float16", "error: the checkpoints of this run were trained in float32 and this GPU"),
])
def test_a_resume_in_another_precision_goes_on_unless_it_is_into_float16(planned, dtype, outcome):
    from training.precision import precision_change

    if outcome and outcome.startswith("error: "):
        with pytest.raises(common.UserError, match=outcome.removeprefix("error: ")) as refused:
            precision_change(planned, dtype)
        assert "--gpus L4:1" in str(refused.value) and "REBUILD=dotrain" in str(refused.value)
    else:
        changed = precision_change(planned, dtype)
        assert changed == outcome or outcome in changed


def test_the_plan_records_its_precision_and_a_cpu_resume_of_a_gpu_run_says_so(capsys):
    from types import SimpleNamespace

    from training.processes import Ranks
    from training.shards import Plan

    settings = SimpleNamespace(train_device="auto", train_backend="auto", load_in_4bit=False,
                               gradient_checkpointing="auto", packing=True)
    plan = Plan.from_manifest(Plan({}, optim="adamw_torch", dtype="bfloat16", world_size=1).manifest())
    assert plan.dtype == "bfloat16"
    backend = dotrain.choose_backend(settings, Ranks(), plan, None)  # (no GPU: the model's size is not read)
    assert (backend.device, backend.dtype) == ("cpu", "float32")
    assert "the checkpoints of this run were trained in bfloat16: resuming in float32" in capsys.readouterr().out


# ---------------------------------------------------------------- QLoRA with transformers + peft


def test_a_4bit_run_keeps_its_16_bit_weights_and_trains_float32_adapters(tiny_model, tmp_path):
    """bitsandbytes needs CUDA: what load_for_training and make_trainer do to a 4-bit base
    besides quantizing it, on the 16-bit model marked as TRL finds a 4-bit one (bench/gpu_proof.sh
    trains the 4-bit 8B shape on a GPU)."""
    import torch
    from types import SimpleNamespace

    import datasets
    from transformers import AutoTokenizer

    from training.processes import Ranks

    settings = SimpleNamespace(seed=0, batch_size=1, grad_accum=1, learning_rate=1e-3, warmup_steps=0,
                               weight_decay=0.0, max_seq_length=64, packing=False, save_steps=1000,
                               logging_steps=1, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                               lora_targets="all-linear", lr_scheduler="linear", report_to="none")
    backend = dotrain.Backend("peft", "cpu", "bfloat16", "adamw_torch")
    backend.trainer_class = dotrain.shard_trainer_class(backend)
    adapted, _ = dotrain.load_for_training(settings, backend, str(tiny_model), Ranks())
    adapted.base_model.model.is_loaded_in_4bit = True  # as bitsandbytes marks a 4-bit model
    backend.load_in_4bit = True
    rows = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8]], "labels": [[5, 6, 7, 8]]})
    dotrain.make_trainer(settings, backend, adapted, AutoTokenizer.from_pretrained(tiny_model), rows,
                         SimpleNamespace(trainer=str(tmp_path)), max_steps=1)
    # embeddings, output layer and norms stay 16-bit (peft's prepare_model_for_kbit_training
    # makes every one of them float32), and the base is frozen
    base = {parameter.dtype for parameter in adapted.parameters() if not parameter.requires_grad}
    assert base == {torch.bfloat16}
    trainable = {parameter.dtype for parameter in adapted.parameters() if parameter.requires_grad}
    assert trainable == {torch.float32}  # only the adapters, in float32 (TRL makes them bfloat16)
    assert adapted.get_output_embeddings().weight.dtype == torch.bfloat16