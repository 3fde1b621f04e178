"""What a run reports of its speed (training.speed): the model FLOPs of a token, the GPUs' peaks
and the MFU."""

import json

import pytest
from conftest import fixture_path

from training.speed import matmul_params, mfu, model_flops_per_token, peak_flops

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 512}  # demo/synthetic.py's model


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


@pytest.mark.parametrize("gpu, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362.05e12), ("NVIDIA L40", None), ("NVIDIA A10G", 125e12), ("Tesla T4", 65e12),
    ("Tesla V100-SXM2-16GB", 125e12), ("NVIDIA GeForce RTX 4090", None), (None, None),
])
def test_the_peak_of_each_gpu_and_the_mfu(gpu, peak):
    assert peak_flops(gpu) == peak
    assert mfu(1_000, 1e9, peak, gpus=2) == (round(1_000 * 1e9 / (2 * peak), 4) if peak else None)
