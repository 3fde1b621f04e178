"""training/fit.py: the GPU memory estimate, calibrated on the one measurement there is, the
refusal of a run that cannot fit (the GPU's memory given, as no GPU is here), and the README's
table of model sizes, which must say what the estimate says."""

import json
import re
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, fixture_path

from common import UserError
from training import fit

GIB = 2**30
DEFAULTS = {"load_in_4bit": False, "lora_r": 16, "batch_size": 2, "max_seq_length": 4096}
# The shapes of the models the README's table names, from their published config.json.
SHAPES = {
    "Qwen2.5-3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       vocab_size=151936, num_attention_heads=16, num_key_value_heads=2,
                       tie_word_embeddings=True),
    "Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       vocab_size=152064, num_attention_heads=28, num_key_value_heads=4),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         vocab_size=128256, num_attention_heads=32, num_key_value_heads=8),
    "Qwen2.5-14B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                        vocab_size=152064, num_attention_heads=40, num_key_value_heads=8),
    "Qwen2.5-32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        vocab_size=152064, num_attention_heads=40, num_key_value_heads=8),
    "Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          vocab_size=128256, num_attention_heads=64, num_key_value_heads=8),
}


def settings(**change):
    return SimpleNamespace(**{**DEFAULTS, **change})


def needs(config, backend="unsloth", **change):
    return sum(fit.estimate(fit.model_shape(config), settings(**change), backend, "adamw_8bit").values())


def qwen_05b():
    return json.loads(fixture_path("tokenizers", "qwen2.5-0.5b", "config.json").read_text())


def test_the_estimate_matches_the_measured_peaks_within_a_tenth():
    measured = json.loads((ROOT / "bench" / "results" / "gpu_train.json").read_text())
    assert measured["settings"]["batch_size"] == 2 and measured["settings"]["max_seq_length"] == 4096
    for run in ("unsloth_packed", "peft_packed"):
        peak = measured["runs"][run]["peak_memory_gib"]
        estimated = (needs(qwen_05b(), measured["runs"][run]["backend"]) - fit.CUDA_BYTES) / GIB
        assert estimated == pytest.approx(peak, rel=0.1), run


def test_a_run_that_cannot_fit_is_refused_in_one_line_naming_what_fits(capsys):
    llama = SHAPES["Llama-3.1-8B"]
    with pytest.raises(UserError) as refused:
        fit.check_fits(llama, settings(), "unsloth", "adamw_8bit", "Tesla T4", 15 * GIB)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"this run needs about {needs(llama) / GIB:.1f} GiB of GPU memory "
                              "(an estimate: weights 15.0, ")
    assert "the Tesla T4 has 15.0 GiB: use LOAD_IN_4BIT=1 (about 8.1 GiB) or a GPU with more " \
           "memory (launch with --gpus L4:1; L4, A10G, L40S, A100, A100-80GB, H100 have enough), " \
           "or CHECK_MEMORY=0 to try anyway" in message
    # A smaller batch is named where it fits: peft's logits grow with the batch.
    with pytest.raises(UserError, match=r"use BATCH_SIZE=1 \(about 8\.\d GiB; raise GRAD_ACCUM"):
        fit.check_fits(qwen_05b(), settings(load_in_4bit=True), "peft", "adamw_8bit", "a GPU",
                       10 * GIB)
    # What fits, or is not clearly over, is let through with the estimate logged.
    fit.check_fits(llama, settings(), "unsloth", "adamw_8bit", "NVIDIA L4", 22 * GIB)
    fit.check_fits(llama, settings(load_in_4bit=True), "unsloth", "adamw_8bit", "Tesla T4", 15 * GIB)
    fit.check_fits(llama, settings(), "unsloth", "adamw_8bit", "a GPU", needs(llama) / fit.REFUSE_ABOVE)
    assert "GPU memory: about 17.6 GiB needed (an estimate) of the 22.0 GiB of the NVIDIA L4" in \
        capsys.readouterr().out
    # A fused loss (no full logits) is what lets peft's run fit.
    fit.check_fits(qwen_05b(), settings(), "peft", "adamw_8bit", "Tesla T4", 15 * GIB, fused_loss=True)
    fit.check_fits({"model_type": "unknown"}, settings(), "unsloth", "adamw_8bit", "Tesla T4", GIB)


def test_the_gpus_named_are_those_of_resources_ordered():
    ordered = yaml.safe_load((ROOT / "allatonce.yaml").read_text())["resources"]["ordered"]
    assert list(fit.GPUS) == [entry["accelerators"].split(":")[0] for entry in ordered]


def test_the_readme_table_says_what_the_estimate_says():
    """Each row: a model, then its estimate and the GPU of resources.ordered with the least
    memory that holds it, 16-bit and 4-bit (unsloth, the defaults)."""
    readme = (ROOT / "README.md").read_text()
    rows = {match[1]: match.groups()[1:] for match in re.finditer(
        r"^\| ([\w.-]+) \| ([\d.]+) GiB: ([\w-]+) \| ([\d.]+) GiB: ([\w-]+) \|$", readme, re.M)}
    assert set(rows) == set(SHAPES)
    for model, config in SHAPES.items():
        cells = []
        for four_bit in (False, True):
            need = needs(config, load_in_4bit=four_bit)
            cells += [f"{need / GIB:.1f}", next((gpu for gpu, memory in sorted(
                fit.GPUS.items(), key=lambda item: item[1]) if memory * GIB >= need), "none")]
        assert list(rows[model]) == cells, model
