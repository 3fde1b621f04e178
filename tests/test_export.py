"""dotrain.py's export: the file-by-file merge and its checks, the logits check, the stop tokens."""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_pretokenize
from conftest import ROOT, fixture_path, model_ready_prefix, run_step, start_step

import common
import pretokenize
from training import export, merge
from training.shards import Plan

sys.path.insert(0, str(ROOT / "demo"))
import synthetic  # noqa: E402

QWEN2_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

MODEL, DATASET = "tiny/learner", "synthetic/colors"
DONE = f"done/{MODEL}/{DATASET}"
# One row per sequence, one sequence per step: enough steps for the tiny model's adapter to
# learn the answers and to stop after them.
TRAINING = {"MODEL_NAME": MODEL, "DATASET_NAME": DATASET, "MAX_SEQ_LENGTH": "128", "PACKING": "0",
            "BATCH_SIZE": "2", "GRAD_ACCUM": "1", "WARMUP_STEPS": "2", "LEARNING_RATE": "1e-2",
            "LORA_R": "8", "SAVE_STEPS": "1000", "OMP_NUM_THREADS": "1", "EVAL_ROWS": "12",
            "SAMPLE_PROMPT": "The car is red. What color is the car?"}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny ChatML tokenizer and two-layer Qwen2 with random weights, saved as published."""
    out = tmp_path_factory.mktemp("tiny")
    synthetic.make_tokenizer(out / "tokenizer")
    return Path(synthetic.make_model(out / "model", out / "tokenizer"))


def make_adapter(model_dir, out, b_std=0.05, seed=0, **lora):
    """A LoRA adapter on the model made by peft, with random (non-zero) B, saved as training
    saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": QWEN2_LINEAR,
                           "task_type": "CAUSAL_LM", **lora})
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, b_std)
    model.save_pretrained(out)
    return model


def fuse(model_dir, lora_dir, fused_dir, tokenizer=None, data=None):
    """merge.fuse as the export calls it."""
    from transformers import AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    data = data or {"inputs": {}}
    generation = export.generation_config(model_dir, tokenizer, export.end_of_turn(data, tokenizer))
    return merge.fuse(str(model_dir), str(lora_dir), str(fused_dir), tokenizer, generation)


def peft_merged(model):
    """peft's own merge, in float32, rounded to the base's bfloat16; and for each adapted weight
    a bound of the float32 error of W + scale * B @ A, computed two ways: 2 (r + 2) eps |terms|."""
    import torch

    float32_error = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            terms = module.base_layer.weight.abs() + module.scaling["default"] * b.abs() @ a.abs()
            float32_error[f"{name.removeprefix('base_model.model.')}.weight"] = \
                (2 * (a.shape[0] + 2) * torch.finfo(torch.float32).eps * terms).detach()
    merged = {name: tensor.to(torch.bfloat16) for name, tensor in model.merge_and_unload().state_dict().items()}
    return merged, float32_error


def within_one_rounding(ours, theirs, float32_error=0):
    """bf16 tensors equal within one rounding of bf16 (an ulp apart), but for the float32 error
    of computing them, which cancellation can make larger than the result's ulp."""
    import torch

    bf16 = torch.finfo(torch.bfloat16)
    allowed = theirs.float().abs() * bf16.eps + bf16.smallest_normal * bf16.eps + float32_error
    return bool(((ours.float() - theirs.float()).abs() <= allowed).all())


def tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def examples_of(model_dir, rows=3, tokens=64, seed=0):
    import torch

    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (tokens,), generator=generator).tolist(), list(range(10, tokens - 1)))
            for _ in range(rows)]


def one_line_error(result):
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, result.stderr
    return result.stderr


# ---------------------------------------------------------------- the merge


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}], ids=["alpha/r", "rslora"])
def test_file_by_file_merge_equals_peft_merge_and_unload(tiny_model, tmp_path, lora):
    adapted = make_adapter(tiny_model, tmp_path / "lora", **lora)
    merge = fuse(tiny_model, tmp_path / "lora", tmp_path / "fused")
    ours, metadata = tensors(tmp_path / "fused" / "model.safetensors")
    base, base_metadata = tensors(tiny_model / "model.safetensors")
    theirs, float32_error = peft_merged(adapted)

    assert metadata == base_metadata and ours.keys() == base.keys()
    assert merge["merged_weights"] == 2 * len(QWEN2_LINEAR) and merge["files"] == 1
    assert merge["scale"] == (16 / 8 ** 0.5 if lora else 16 / 8)
    assert 0 < merge["max_error_in_half_ulps"] <= 1 and merge["changed_fraction"] > 0.9
    changed = [name for name in ours if not (ours[name] == base[name]).all()]
    assert len(changed) == merge["merged_weights"]  # the adapter moved every adapted weight
    for name, tensor in ours.items():
        assert tensor.dtype == base[name].dtype, name
        assert within_one_rounding(tensor, theirs[name], float32_error.get(name, 0)), name
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["use_cache"] is True and config["dtype"] == "bfloat16"


def test_several_weights_files_merge_file_by_file_with_the_same_index(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(
        sharded, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(sharded)
    shutil.copy(tiny_model / "generation_config.json", sharded)
    files = sorted(path.name for path in sharded.glob("*.safetensors"))
    assert len(files) > 3
    adapted = make_adapter(sharded, tmp_path / "lora")
    merge = fuse(sharded, tmp_path / "lora", tmp_path / "fused")
    theirs, float32_error = peft_merged(adapted)

    assert merge["files"] == len(files)
    assert sorted(path.name for path in (tmp_path / "fused").glob("*.safetensors")) == files
    index = "model.safetensors.index.json"
    assert (tmp_path / "fused" / index).read_bytes() == (sharded / index).read_bytes()
    merged = 0
    for name in files:
        ours, metadata = tensors(tmp_path / "fused" / name)
        base, base_metadata = tensors(sharded / name)
        assert ours.keys() == base.keys() and metadata == base_metadata
        merged += sum(not torch.equal(ours[key], base[key]) for key in ours)
        assert all(within_one_rounding(ours[key], theirs[key], float32_error.get(key, 0)) for key in ours)
    assert merged == merge["merged_weights"] == 2 * len(QWEN2_LINEAR)
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").state_dict()
    assert fused.keys() == theirs.keys()


def test_a_model_without_safetensors_weights_is_refused(tiny_model, tmp_path):
    shutil.copytree(tiny_model, tmp_path / "model", ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(common.UserError, match="has no model.safetensors"):
        merge.weights_files(str(tmp_path / "model"))


@pytest.mark.parametrize("lora, message", [
    ({"use_dora": True}, "uses use_dora, which the merge into fused/ does not support"),
    ({"bias": "lora_only"}, "uses bias='lora_only', which the merge"),
])
def test_adapter_features_the_merge_cannot_honour_are_refused(tiny_model, tmp_path, lora, message):
    make_adapter(tiny_model, tmp_path / "lora", **lora)
    with pytest.raises(common.UserError, match=message) as refused:
        fuse(tiny_model, tmp_path / "lora", tmp_path / "fused")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("change, message", [
    ("rename", "its keys were renamed"), ("drop", "1 missing keys"), ("add", "1 unexpected keys")])
def test_adapter_keys_must_match_the_base(tiny_model, tmp_path, change, message):
    import torch
    from safetensors.torch import load_file, save_file

    make_adapter(tiny_model, tmp_path / "lora")
    path = tmp_path / "lora" / "adapter_model.safetensors"
    weights = load_file(path)
    if change == "rename":
        weights = {key.replace(".layers.", ".blocks."): value for key, value in weights.items()}
    elif change == "drop":
        del weights["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    else:
        weights["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
    save_file(weights, path)
    with pytest.raises(common.UserError, match=message) as refused:
        fuse(tiny_model, tmp_path / "lora", tmp_path / "fused")
    assert "\n" not in str(refused.value) and "does not fit" in str(refused.value)


# ---------------------------------------------------------------- the logits check


def test_logits_check_passes_a_correct_merge_and_fails_a_wrong_one(tiny_model, tmp_path):
    make_adapter(tiny_model, tmp_path / "lora", b_std=0.05)
    fuse(tiny_model, tmp_path / "lora", tmp_path / "fused")
    examples = examples_of(tiny_model)
    check, fused = export.check_logits(str(tiny_model), str(tmp_path / "lora"), str(tmp_path / "fused"),
                                        examples)
    assert check["dtype"] == "bfloat16" and check["device"] == "cpu"
    assert check["effect_over_base"] > export.EFFECT_FLOOR
    assert check["distance_over_effect"] < export.LOGITS_TOLERANCE / 4

    # fused/ holds half the adapter's update of what lora_model/ now says: the check fails.
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 32}))
    with pytest.raises(common.UserError, match="the fused model's logits differ from base"):
        export.check_logits(str(tiny_model), str(tmp_path / "lora"), str(tmp_path / "fused"), examples)


def test_logits_check_fails_an_adapter_peft_loads_with_missing_keys(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    make_adapter(tiny_model, tmp_path / "lora")
    fuse(tiny_model, tmp_path / "lora", tmp_path / "fused")
    path = tmp_path / "lora" / "adapter_model.safetensors"
    # 2 layers x 3 MLP projections x (A, B) renamed
    save_file({key.replace("mlp", "feed_forward"): value for key, value in load_file(path).items()}, path)
    with pytest.raises(common.UserError, match="peft loads the adapter .* with 12 missing keys"):
        export.check_logits(str(tiny_model), str(tmp_path / "lora"), str(tmp_path / "fused"),
                             examples_of(tiny_model))


def test_logits_check_fails_an_adapter_too_weak_for_16_bit_weights(tiny_model, tmp_path):
    # Its update is mostly under half an ulp of the weights: merged, it rounds away.
    make_adapter(tiny_model, tmp_path / "lora", b_std=3e-5)
    merge = fuse(tiny_model, tmp_path / "lora", tmp_path / "fused")
    assert merge["changed_fraction"] < 0.5
    with pytest.raises(common.UserError, match="the adapter is too weak for the base's bfloat16 weights"):
        export.check_logits(str(tiny_model), str(tmp_path / "lora"), str(tmp_path / "fused"),
                             examples_of(tiny_model))


def test_logits_check_fails_an_adapter_of_zeros(tiny_model, tmp_path):
    make_adapter(tiny_model, tmp_path / "lora", b_std=0.0)
    fuse(tiny_model, tmp_path / "lora", tmp_path / "fused")
    with pytest.raises(common.UserError, match="the adapter changes nothing"):
        export.check_logits(str(tiny_model), str(tmp_path / "lora"), str(tmp_path / "fused"),
                             examples_of(tiny_model))


def test_logits_check_on_a_base_partly_offloaded(tiny_model, tmp_path):
    """A base that does not fit the GPU: device_map="auto" keeps part of it in RAM (on a GPU node)
    or on disk. Given the offload hooks' empty weights, peft would make the adapter on `meta`
    (and fail to dispatch it): the check loads it beside the weights themselves, and refuses in
    one line a base that would go to disk (here, where the CPU is the only device, any part
    beyond `max_memory`)."""
    make_adapter(tiny_model, tmp_path / "lora", b_std=0.05)
    fuse(tiny_model, tmp_path / "lora", tmp_path / "fused")
    examples = examples_of(tiny_model)
    paths = str(tiny_model), str(tmp_path / "lora"), str(tmp_path / "fused")
    check, _ = export.check_logits(*paths, examples, max_memory={"cpu": 2**30})  # it fits
    assert check["distance_over_effect"] < export.LOGITS_TOLERANCE / 4

    # The base as device_map="auto" leaves it on a GPU node, part of it offloaded to RAM: each
    # weight on `meta` in the model, its values in the offload hooks (accelerate moves them to
    # the GPU as each module runs; here the CPU is that device too).
    import torch
    from accelerate import cpu_offload
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = export.logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                                        tmp_path / "lora"), examples)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    cpu_offload(base, execution_device=torch.device("cpu"))
    base.hf_device_map = {"model": "cpu", "lm_head": "cpu"}
    assert {parameter.device.type for parameter in base.parameters()} == {"meta"}
    adapted = export.with_adapter(base, tmp_path / "lora")
    assert {p.device.type for name, p in adapted.named_parameters() if "lora_" in name} == {"cpu"}
    assert torch.equal(export.logits(adapted, examples), reference)

    three_quarters = (tiny_model / "model.safetensors").stat().st_size * 3 // 4
    with pytest.raises(common.UserError, match="part of it would go to disk") as refused:
        export.check_logits(*paths, examples, max_memory={"cpu": three_quarters})
    assert "\n" not in str(refused.value) and "a rerun only exports" in str(refused.value)


def write_rows(path, rows):
    pq.write_table(pa.table({
        "input_ids": pa.array([ids for ids, _ in rows], pa.list_(pa.int32())),
        "labels": pa.array([labels for _, labels in rows], pa.list_(pa.int32())),
        "source_row": pa.array(range(100, 100 + len(rows)), pa.int64()),
        "length": pa.array([len(ids) for ids, _ in rows], pa.int32())}), path)


def test_checked_rows_are_held_out_rows_when_the_manifest_lists_them(tmp_path):
    settings = SimpleNamespace(model_name="m", dataset_name="d", bucket_name=str(tmp_path / "bucket"))
    bucket = common.Bucket(settings)
    folder = tmp_path / "bucket" / common.model_ready_prefix("m", "d", {})
    (folder / "eval").mkdir(parents=True)
    prompt = list(range(1, 200))  # a long prompt: the window starts shortly before the answer
    answer = [7, 8, 9, 10]
    row = (prompt + answer, [-100] * len(prompt) + answer)
    write_rows(folder / "eval" / "part-0.parquet", [row, ([1, 2, 3], [-100, -100, -100])])
    write_rows(folder / "eval" / "part-1.parquet", [row, row])
    (folder / "shard-00000").mkdir()
    write_rows(folder / "shard-00000" / "part-00000.parquet", [row] * 4)
    plan = Plan(inputs={}, shards=[{"path": "shard-00000", "steps": 2}], total_steps=2)
    shards = [{"path": "shard-00000", "parts": [{"path": "shard-00000/part-00000.parquet", "rows": 4}]}]
    data = {"shards": shards,
            "eval": [{"path": "eval/part-0.parquet", "rows": 2}, {"path": "eval/part-1.parquet", "rows": 2}]}

    examples, rows = export.check_examples(bucket, common.model_ready_prefix("m", "d", {}), data, plan)
    assert rows == {"held_out": True, "paths": ["eval/part-0.parquet", "eval/part-1.parquet"],
                    "source_rows": [100, 100, 101], "positions": 3 * len(answer)}
    for ids, positions in examples:
        assert len(ids) <= export.CHECK_TOKENS and ids[-len(answer):] == answer
        assert [ids[t + 1] for t in positions] == answer  # each position predicts a trained token

    for without in ({"shards": shards}, {"shards": shards, "eval": []}):
        examples, rows = export.check_examples(bucket, common.model_ready_prefix("m", "d", {}), without, plan)
        assert rows == {"held_out": False, "paths": ["shard-00000/part-00000.parquet"],
                        "source_rows": [100, 101, 102], "positions": 3 * len(answer)}


# ---------------------------------------------------------------- stop tokens


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return synthetic.make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("from_manifest", [True, False], ids=["manifest", "template"])
@pytest.mark.parametrize("template", ["qwen2.5", "llama3-style", "gemma-style", "chatml"])
def test_fused_and_lora_model_stop_at_the_templates_end_of_turn(template, from_manifest, tiny_model,
                                                                 tiny_tokenizer, tmp_path):
    from transformers import GenerationConfig

    if template == "qwen2.5":
        fixture_path("tokenizers", "qwen2.5-0.5b")
    tokenizer = test_pretokenize.tokenizer_for(template, tiny_tokenizer)
    labelled = pretokenize.Labeller(tokenizer, 64).end_of_turn  # what the manifest holds
    assert labelled == test_pretokenize.TEMPLATES[template][0]
    base = tmp_path / "base"  # the tiny model's weights, this template's tokenizer
    shutil.copytree(tiny_model, base)
    tokenizer.save_pretrained(base)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(base)
    make_adapter(base, tmp_path / "checkpoint")
    data = {"inputs": {}, **({"end_of_turn": labelled} if from_manifest else {})}

    fuse(base, tmp_path / "checkpoint", tmp_path / "fused", tokenizer, data)
    generation = export.generation_config(str(base), tokenizer, export.end_of_turn(data, tokenizer))
    export.save_adapter(str(tmp_path / "checkpoint"), str(tmp_path / "lora_model"), "m", tokenizer, generation)
    end_of_turn = tokenizer.convert_tokens_to_ids(labelled)
    for folder in ("fused", "lora_model"):
        config = GenerationConfig.from_pretrained(tmp_path / folder)
        assert config.eos_token_id == [end_of_turn, tokenizer.eos_token_id], folder
        assert config.stop_strings is None
    assert (tmp_path / "fused" / "chat_template.jinja").read_text() == tokenizer.chat_template


def test_an_end_of_turn_of_several_tokens_stops_as_a_stop_string(tiny_model, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = export.generation_config(str(tiny_model), tokenizer, "</s>")
    assert len(tokenizer.encode("</s>", add_special_tokens=False)) > 1
    assert config.stop_strings == ["</s>"]
    assert config.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    out = capsys.readouterr().out
    assert "'</s>' is" in out and 'vLLM reads only eos_token_id' in out and '"stop": ["</s>"]' in out


# ---------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A local bucket after the four steps on the synthetic conversations and a tiny model that
    can learn them (init_std=0.2), and the step's environment."""
    work = tmp_path_factory.mktemp("trained")
    synthetic.make_tokenizer(work / "tokenizer")
    synthetic.make_model(work / "model", work / "tokenizer", init_std=0.2)
    rows = synthetic.conversations(180, seed=10)
    (work / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {"BUCKET_NAME": f"file://{work / 'bucket'}", **TRAINING, "WORK_DIR": str(work / "work"),
           "MODEL_CACHE_DIR": str(work / "cache")}
    steps = [start_step("import-dataset.py", {**env, "SHARD_SIZE": "60",
                                              "DATASET_SOURCE": str(work / "chat.jsonl")}),
             start_step("import-model.py", {**env, "MODEL_SOURCE": str(work / "model")})]
    for step in steps:
        output = step.communicate(timeout=300)[0]
        assert step.returncode == 0, output
    run_step("pretokenize.py", {**env, "NUM_PROC": "1"})
    run_step("dotrain.py", env)
    return work / "bucket", env


def test_trained_run_exports_a_checked_model_that_stops_at_its_end_of_turn(trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bucket, env = trained
    done = json.loads((bucket / DONE / "_manifest.json").read_text())
    data = json.loads((bucket / model_ready_prefix(env) / "_manifest.json").read_text())
    check = done["check"]
    assert check["merge"]["merged_weights"] == 2 * len(QWEN2_LINEAR)
    assert check["merge"]["max_error_in_half_ulps"] <= 1
    assert check["effect_over_base"] > export.EFFECT_FLOOR
    assert check["distance_over_effect"] <= export.LOGITS_TOLERANCE
    # fused/'s evaluation loss beside the trained model's (which, with LOAD_IN_4BIT, is the
    # 4-bit base's): here the same base, float32 in training and bfloat16 in fused/
    metrics = json.loads((bucket / DONE / "metrics.json").read_text())
    eval_loss = done["eval_loss"]
    assert metrics["eval_loss"] == eval_loss and eval_loss["rows"] == 12
    assert eval_loss["after"] < eval_loss["before"] - 0.5
    assert eval_loss["after_fused"] == pytest.approx(eval_loss["after"], rel=0.01)
    # The first held-out rows: never trained on.
    assert check["rows"]["held_out"] is True
    assert check["rows"]["paths"] == [data["eval"][0]["path"]]
    assert len(check["rows"]["source_rows"]) == export.CHECK_ROWS

    fused_dir = bucket / DONE / "fused"
    tokenizer = AutoTokenizer.from_pretrained(fused_dir)
    fused = AutoModelForCausalLM.from_pretrained(fused_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fused.generation_config.eos_token_id == [end_of_turn, tokenizer.eos_token_id]
    assert json.loads((fused_dir / "config.json").read_text())["use_cache"] is True
    # Greedy answers to questions of the trained kind end with the end of turn, well before
    # the token limit.
    for thing, color in [("bird", "blue"), ("lamp", "white"), ("river", "green"), ("door", "black")]:
        question = f"The {thing} is {color}. What color is the {thing}?"
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                            add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            out = fused.generate(input_ids=torch.tensor([ids]), max_new_tokens=40, do_sample=False)
        answer = out[0, len(ids):].tolist()
        assert end_of_turn in answer, tokenizer.decode(answer)
        assert answer.index(end_of_turn) < 20, tokenizer.decode(answer)


@pytest.mark.parametrize("change, message", [
    ("rename", "does not fit"), ("zeros", "the adapter changes nothing")])
def test_a_broken_adapter_fails_the_export_in_one_line(trained, tmp_path, change, message):
    import torch
    from safetensors.torch import load_file, save_file

    bucket, env = trained
    copy = tmp_path / "bucket"
    shutil.copytree(bucket, copy)
    shutil.rmtree(copy / DONE)
    env = {**env, "BUCKET_NAME": f"file://{copy}", "WORK_DIR": str(tmp_path / "work")}
    pointer = json.loads((copy / f"checkpoints/{MODEL}/{DATASET}/latest.json").read_text())
    path = copy / f"checkpoints/{MODEL}/{DATASET}/{pointer['checkpoint']}/adapter_model.safetensors"
    weights = load_file(path)
    if change == "rename":
        weights = {key.replace("self_attn", "attention"): value for key, value in weights.items()}
    else:
        weights = {key: torch.zeros_like(value) for key, value in weights.items()}
    save_file(weights, path)

    assert message in one_line_error(run_step("dotrain.py", env, check=False))
    manifest = copy / DONE / "_manifest.json"
    assert not manifest.exists() or not json.loads(manifest.read_text())["complete"]
