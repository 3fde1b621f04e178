"""What a run reports of its speed (training.speed): the model FLOPs of a token, the GPUs' peaks
(TRL's table), the MFU and the attention (training.attention); and the backend TRAIN_BACKEND=auto
picks from the GPU benchmark's measurements."""

import json
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT, fixture_path

from training.speed import (attended, describe, matmul_params, measured_faster, mfu, model_flops_per_token,
                            summary)

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 512}  # demo/synthetic.py's model
QWEN_7B = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064}
H100, A10G, T4, V100 = (9, 0), (8, 6), (7, 5), (7, 0)  # compute capabilities
QWEN_1_5B = {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936}


def test_the_model_flops_of_a_token_counted_by_hand():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # A layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate, up and down 3 x 64x128 = 36,864
    # weights; two layers and the output layer (512 x 64): 106,496.
    assert matmul_params(TINY) == 106_496
    # Forward 2 x 106,496 FLOPs, the activations' gradients as much again: 425,984. Attention to
    # 10 positions: 4 heads x 16 x 10 x 2 products x 2 FLOPs forward, x 3 with the backward, x 2
    # layers: 15,360.
    assert model_flops_per_token(TINY, 10) == 425_984 + 15_360
    # The model's own products: the weights of its every nn.Linear, the tied output layer too.
    model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))
    assert sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) == 106_496
    # Qwen2.5-0.5B: the benchmark's earlier count (494,032,768) also held the biases of q, k and v
    # (24 x 1,152) and the norms (49 x 896).
    qwen = json.loads(fixture_path("tokenizers", "qwen2.5-0.5b", "config.json").read_text())
    assert matmul_params(qwen) + 24 * 1_152 + 49 * 896 == 494_032_768


def test_sizes_nested_in_a_text_config_or_missing_fail_no_run():
    """A multimodal model's config.json (Gemma 3, which AutoModelForCausalLM loads as
    Gemma3ForConditionalGeneration) gives its decoder's sizes in text_config; a config that gives
    none leaves the FLOPs, the MFU and TRAIN_BACKEND=auto's measurement unknown, and the run goes on."""
    gemma_like = {"model_type": "gemma3", "text_config": TINY,
                  "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27}}
    assert matmul_params(gemma_like) == 106_496
    assert model_flops_per_token(gemma_like, 10) == model_flops_per_token(TINY, 10) == 425_984 + 15_360
    for config in ({"model_type": "custom"}, None):
        assert matmul_params(config) is None and model_flops_per_token(config, 10) is None
        assert measured_faster(config, False, True, H100) == (None, "config.json gives no sizes")
    # what every run reports of its speed, here on the CPU
    backend = SimpleNamespace(device="cpu", attention="sdpa", dtype="float32")
    plan = SimpleNamespace(shards=[{"tokens": 30, "attended": 165}], rows=3)
    entry = describe({"model_type": "custom"}, backend, 1, plan)
    assert (entry["gpu"], entry["peak_flops"], entry["model_flops_per_token"]) == (None, None, None)
    assert mfu(1_000, None, 989e12) is None
    assert summary([{"tokens_per_second": 1_000.0}], {**entry, "peak_flops": 989e12})["mfu"] is None


def test_a_token_attends_to_its_own_rows_positions_counted_when_planning(tmp_path):
    """The FLOPs of a token, in every run's report, for the mean context of the data's rows:
    a row of l tokens attends to l(l + 1) / 2 positions, counted by make_plan from the rows'
    lengths, shard by shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from common import Bucket
    from training.shards import make_plan

    bucket = Bucket(SimpleNamespace(bucket_name=f"file://{tmp_path / 'bucket'}"))
    shards = {"shard-00000": [[1, 2], [3]], "shard-00001": [[4]]}  # the rows' lengths of each part
    data = {"shards": []}
    for shard, parts in shards.items():
        (tmp_path / "bucket" / "ready" / shard).mkdir(parents=True)
        data["shards"].append({"path": shard, "rows": sum(map(len, parts)), "parts": []})
        for k, lengths in enumerate(parts):
            part = {"path": f"{shard}/part-{k:05d}.parquet", "rows": len(lengths)}
            pq.write_table(pa.table({"length": pa.array(lengths, pa.int32())}),
                           tmp_path / "bucket" / "ready" / part["path"])
            data["shards"][-1]["parts"].append(part)
    settings = SimpleNamespace(packing=False, max_seq_length=8, batch_size=1, grad_accum=1, num_epochs=1,
                               max_steps=0)
    plan = make_plan(settings, bucket, "ready", data, {}, 1)
    assert [(shard["tokens"], shard["attended"]) for shard in plan.shards] == [(6, 1 + 3 + 6), (4, 10)]
    assert attended([1, 2, 3, 4]) == 20 / 10  # not (mean length + 1) / 2 = 1.75
    cpu = SimpleNamespace(device="cpu", attention="sdpa", dtype="float32")
    assert describe(TINY, cpu, 1, plan)["model_flops_per_token"] == model_flops_per_token(TINY, 2.0)
    # a plan made before it counted them (a resumed run): no FLOPs, and the run goes on
    for shard in plan.shards:
        del shard["attended"]
    assert describe(TINY, cpu, 1, plan)["model_flops_per_token"] is None


@pytest.mark.parametrize("gpu, dtype, peak", [  # the GPUs allatonce.yaml may get, in their precision
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12), ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100 80GB PCIe", "bfloat16", 312e12), ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA L40S", "bfloat16", 362e12), ("NVIDIA L40", "bfloat16", None), ("NVIDIA A10G", "bfloat16", 125e12),
    ("Tesla T4", "float16", 65e12), ("Tesla V100-SXM2-16GB", "float16", None),  # not in TRL's table
    ("NVIDIA GeForce RTX 4090", "bfloat16", None),
])
def test_the_peak_of_each_gpu_and_the_mfu(gpu, dtype, peak):
    """describe() takes the peak from TRL's table (trl.trainer.utils.get_peak_flops), by the
    GPU's name and the run's precision."""
    from trl.trainer.utils import get_peak_flops

    assert get_peak_flops(gpu, dtype) == peak
    assert mfu(1_000, 1e9, peak, gpus=2) == (round(1_000 * 1e9 / (2 * peak), 4) if peak else None)


def test_auto_picks_the_backend_measured_faster_at_the_models_size(tmp_path):
    qwen = json.loads(fixture_path("tokenizers", "qwen2.5-0.5b", "config.json").read_text())
    small, large = matmul_params(qwen), matmul_params(QWEN_7B)
    results = tmp_path / "gpu_train.json"
    results.write_text(json.dumps({"date": "2026-12-01 10:00:00", "machine": {"gpu": "NVIDIA H100 80GB HBM3"},
                                   "runs": {name: {"backend": backend, "params": params, "packing": True,
                                                   "load_in_4bit": four_bit, **speed}
                                            for name, backend, params, four_bit, speed in [
        ("peft", "peft", small, False, {"tokens_per_second": 40_000}),
        ("unsloth", "unsloth", small, False, {"tokens_per_second": 30_000}),
        ("7b_peft", "peft", large, False, {"tokens_per_second": 5_000}),
        ("7b_unsloth", "unsloth", large, False, {"tokens_per_second": 6_000}),
        ("7b_unsloth_4bit", "unsloth", large, True, {"tokens_per_second": 4_000}),
        ("7b_peft_4bit", "peft", large, True, {"error": "over 120 s"})]}}))
    faster, why = measured_faster(qwen, False, True, H100, results)
    assert faster == "peft"
    assert why.startswith("peft trained 40,000 tokens/s and unsloth 30,000 at 0.49B matmul parameters "
                          "on an NVIDIA H100 80GB HBM3 (2026-12-01, ")
    assert measured_faster(QWEN_7B, False, True, H100, results)[0] == "unsloth"
    assert measured_faster(QWEN_7B, True, True, H100, results)[0] is None  # peft's 4-bit run failed
    assert measured_faster(qwen, False, False, H100, results)[0] is None  # only packed runs measured
    faster, why = measured_faster(QWEN_1_5B, False, True, H100, results)
    assert faster is None and why.startswith("no measurement of both backends within 2x of this "
                                             "model's 1.54B matmul parameters")
    assert measured_faster(qwen, False, True, H100, tmp_path / "absent.json")[0] is None
    # bf16 GPUs other than the benchmark's take its paths; older ones train in fp16 with other
    # attention kernels, which it did not measure
    assert measured_faster(qwen, False, True, A10G, results)[0] == "peft"
    for older in (T4, V100):
        faster, why = measured_faster(qwen, False, True, older, results)
        assert faster is None and why.startswith(f"the GPU benchmark measured a GPU of compute capability "
                                                 f"8.0 or more and this one is {older[0]}.{older[1]}")


def test_the_shipped_measurements_decide_the_default_model():
    """TRAIN_BACKEND=auto on Qwen2.5-0.5B: the backend bench/results/gpu_train.json measured faster."""
    qwen = json.loads(fixture_path("tokenizers", "qwen2.5-0.5b", "config.json").read_text())
    measured = json.loads((ROOT / "bench" / "results" / "gpu_train.json").read_text())
    speeds = {run["backend"]: run["tokens_per_second"] for run in measured["runs"].values()
              if run.get("params") == matmul_params(qwen) and run.get("packing")
              and not run.get("load_in_4bit") and run.get("tokens_per_second")}
    assert set(speeds) == {"peft", "unsloth"}
    assert measured_faster(qwen, False, True, H100)[0] == max(speeds, key=speeds.get)


def test_choosing_the_attention_changes_no_setting_of_the_process():
    """choose() names the attention by the GPU's compute capability; cuDNN's SDPA is turned off
    apart, for the whole process, by avoid_cudnn_attention (on CUDA only)."""
    import torch

    from training.attention import avoid_cudnn_attention, choose

    assert [choose("peft", capability, True) for capability in (H100, A10G, T4, V100, None)] == \
        ["flex_attention", "flex_attention", "sdpa", "sdpa", "sdpa"]
    assert torch.backends.cuda.cudnn_sdp_enabled()
    try:
        avoid_cudnn_attention()
        assert torch.backends.cuda.cudnn_sdp_enabled() is not torch.cuda.is_available()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


@pytest.mark.parametrize("chosen, segments, varlen, capability, packing, label", [
    ("flash_varlen", True, True, H100, True, "unsloth flash_varlen"),  # flash-attn installed
    ("xformers", True, False, T4, True, "unsloth xformers"),
    ("sdpa", True, True, H100, True, "unsloth torch varlen flash"),
    ("sdpa", True, False, H100, True, "unsloth sdpa row by row"),  # UNSLOTH_TORCH_VARLEN=0, say
    ("sdpa", True, True, T4, True, "unsloth sdpa row by row"),
    ("sdpa", False, True, H100, True, "unsloth sdpa with a dense mask"),  # UNSLOTH_SDPA_PACKED_SEGMENTS=0
    ("xformers", True, True, H100, False, "unsloth xformers, padded batches"),  # PACKING=0
])
def test_the_attention_unsloth_runs_is_the_one_it_decides(monkeypatch, chosen, segments, varlen, capability,
                                                          packing, label):
    """unsloth (a CUDA-only package) is not installed here: a stand-in for its module
    unsloth.utils.attention_dispatch (2026.10.9) holds its decisions, as its names say them."""
    import types

    from training.attention import choose

    asked = []

    def select_attention_backend(use_varlen=False, dropout_p=0.0):
        asked.append(use_varlen)
        return chosen

    dispatch = types.ModuleType("unsloth.utils.attention_dispatch")
    dispatch.SDPA, dispatch.select_attention_backend = "sdpa", select_attention_backend
    dispatch._SDPA_PACKED_SEGMENTS = segments
    dispatch._TORCH_VARLEN_ATTN = (lambda *args, **kwargs: None) if varlen else None
    utils = types.ModuleType("unsloth.utils")
    utils.attention_dispatch = dispatch
    for name, module in [("unsloth", types.ModuleType("unsloth")), ("unsloth.utils", utils),
                         ("unsloth.utils.attention_dispatch", dispatch)]:
        monkeypatch.setitem(sys.modules, name, module)
    assert choose("unsloth", capability, packing) == label
    assert asked == [packing]  # the packed (varlen) route only for packed batches


@pytest.mark.parametrize("max_seq_length, batch_size, packing", [
    (4096, 2, True), (4096, 2, False), (128, 2, True), (2000, 1, False), (2000, 2, True), (2003, 1, False)])
def test_padding_to_the_length_multiple_never_passes_the_longest_batch(max_seq_length, batch_size, packing):
    """unsloth cuts input ids past MAX_SEQ_LENGTH and not their labels: a padded batch must never
    be longer than the longest one, and a run meets at most SHAPES lengths."""
    from training.speed import SHAPES, length_multiple

    multiple = length_multiple(SimpleNamespace(max_seq_length=max_seq_length, batch_size=batch_size,
                                               packing=packing))
    longest = max_seq_length * (batch_size if packing else 1)
    padded = {-(-length // multiple) * multiple for length in range(1, longest + 1)}
    assert max(padded) == longest and len(padded) <= SHAPES
