"""Whether a run fits its GPU: its peak GPU memory estimated from the model's config.json and
the settings, checked before the model is downloaded, so that a run that cannot fit (an 8B
16-bit run on a 16 GB T4, where resources.ordered or a recovery may land it) stops in one line
instead of downloading the model and running out of memory.

The estimate, in bytes. T = BATCH_SIZE x MAX_SEQ_LENGTH tokens a batch; H, I, L, V the model's
hidden size, MLP size, layers and vocabulary; P its parameters; r = LORA_R:

    weights      P x 2 (16-bit). LOAD_IN_4BIT: the blocks' linear weights x NF4_BYTES, the rest
                 (embeddings, output layer, norms) x 2: both backends keep them 16-bit
                 (dotrain.load_for_training does not cast them to float32)
    LoRA         r x (inputs + outputs) of every linear projection of the blocks (all-linear),
                 x (4 bytes of weight + 4 of gradient + AdamW's two moments: 2 in 8-bit, 8 in
                 float32)
    activations  one layer's working set, recomputed in the backward pass (gradient
                 checkpointing): T x (6H + 5I) x 2; with peft also each layer's kept input,
                 L x T x H x 2 (unsloth offloads those to host memory)
    logits       T x V x LOGIT_BYTES with peft's loss: the 16-bit logits, their float32 copy,
                 the float32 log-probabilities and their gradient, not all alive at once;
                 nothing with a fused, chunked loss (unsloth's; `fused_loss` for others)
    CUDA         CUDA_BYTES: the context and the kernels' workspaces

Calibrated on the one measurement there is (bench/results/gpu_train.json: Qwen2.5-0.5B on an
H200, batch 2 x 4,096 tokens packed, r 16, 8-bit AdamW): torch's peak was 1.5 GiB with unsloth
and 15.4 GiB with peft; this estimate, without CUDA_BYTES (outside torch's count), says 1.46
and 15.7. It is an estimate: the check refuses a run only when it is clearly over
(REFUSE_ABOVE x the GPU's memory), and CHECK_MEMORY=0 skips it.
"""

from types import SimpleNamespace

from common import UserError, log, model_prefix

GIB = 2**30
NF4_BYTES = 0.55  # a 4-bit weight with its double-quantized scales (4.13 bits), and some margin
LOGIT_BYTES = 12
CUDA_BYTES = 0.75 * GIB
REFUSE_ABOVE = 1.1
# allatonce.yaml's resources.ordered, in its order, with the memory torch reports (GiB).
GPUS = {"L4": 22, "A10G": 22, "T4": 15, "L40S": 44, "A100": 39, "A100-80GB": 79, "H100": 79}


def model_config(bucket, model_name):
    """The model's config.json from the bucket (the one file needed before the download)."""
    import json

    return json.loads(bucket.get(f"{model_prefix(model_name)}/config.json") or "null")


def model_shape(config):
    """The sizes the estimate needs, from a decoder's config.json (a multimodal model's
    text_config); None where they are not there."""
    config = config.get("text_config", config)
    try:
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        shape = SimpleNamespace(hidden=hidden, mlp=config["intermediate_size"],
                                layers=config["num_hidden_layers"], vocab=config["vocab_size"],
                                heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
                                head=config.get("head_dim") or hidden // heads,
                                experts=config.get("num_local_experts") or config.get("num_experts") or 1,
                                tied=config.get("tie_word_embeddings", False))
    except (KeyError, TypeError):
        return None
    return shape


def estimate(shape, settings, backend, optim, fused_loss=False):
    """The run's peak GPU memory in bytes, by part (the formula is in this module's docstring).
    backend: unsloth or peft; optim: adamw_8bit or adamw_torch."""
    h, i, layers, vocab = shape.hidden, shape.mlp, shape.layers, shape.vocab
    q, kv = shape.heads * shape.head, shape.kv_heads * shape.head
    linear = [(h, q), (h, kv), (h, kv), (q, h)] + [(h, i), (h, i), (i, h)] * shape.experts
    blocks = layers * sum(a * b for a, b in linear)
    rest = vocab * h * (1 if shape.tied else 2) + (2 * layers + 1) * h
    unsloth = backend == "unsloth"
    if settings.load_in_4bit:
        weights = blocks * NF4_BYTES + rest * 2
    else:
        weights = (blocks + rest) * 2
    lora = settings.lora_r * layers * sum(a + b for a, b in linear) \
        * (4 + 4 + (2 if optim == "adamw_8bit" else 8))
    tokens = settings.batch_size * settings.max_seq_length
    activations = tokens * (6 * h + 5 * i) * 2 + (0 if unsloth else layers * tokens * h * 2)
    logits = 0 if unsloth or fused_loss else tokens * vocab * LOGIT_BYTES
    return {"weights": weights, "LoRA and optimizer": lora, "activations": activations,
            "logits": logits, "CUDA": CUDA_BYTES}


def check_fits(config, settings, backend, optim, gpu_name, gpu_bytes, fused_loss=False):
    """Log the estimate, or refuse in one line a run estimated above REFUSE_ABOVE x the GPU's
    memory, naming what would fit: LOAD_IN_4BIT=1, a smaller BATCH_SIZE, a bigger GPU."""
    shape = config and model_shape(config)
    if shape is None:
        log("the model's config.json does not give its sizes: its GPU memory is not estimated")
        return
    parts = estimate(shape, settings, backend, optim, fused_loss)
    need = sum(parts.values())
    if need <= REFUSE_ABOVE * gpu_bytes:
        log(f"GPU memory: about {need / GIB:.1f} GiB needed (an estimate) of the "
            f"{gpu_bytes / GIB:.1f} GiB of the {gpu_name}")
        return

    def needs(**change):
        changed = SimpleNamespace(**{**vars(settings), **change})
        return sum(estimate(shape, changed, backend, optim, fused_loss).values())

    fixes = []
    if not settings.load_in_4bit and needs(load_in_4bit=True) <= gpu_bytes:
        fixes.append(f"LOAD_IN_4BIT=1 (about {needs(load_in_4bit=True) / GIB:.1f} GiB)")
    smaller = [b for b in range(settings.batch_size - 1, 0, -1) if needs(batch_size=b) <= gpu_bytes]
    if smaller:
        fixes.append(f"BATCH_SIZE={smaller[0]} (about {needs(batch_size=smaller[0]) / GIB:.1f} GiB; "
                     "raise GRAD_ACCUM to keep the effective batch)")
    bigger = [name for name, memory in GPUS.items() if memory * GIB >= need]
    if bigger:
        fixes.append(f"a GPU with more memory (launch with --gpus {bigger[0]}:1; {', '.join(bigger)} "
                     "have enough)")
    detail = ", ".join(f"{name} {size / GIB:.1f}" for name, size in parts.items())
    raise UserError(f"this run needs about {need / GIB:.1f} GiB of GPU memory (an estimate: "
                    f"{detail}) and the {gpu_name} has {gpu_bytes / GIB:.1f} GiB: use "
                    f"{' or '.join(fixes) or 'a smaller MAX_SEQ_LENGTH'}, or CHECK_MEMORY=0 to "
                    "try anyway")
