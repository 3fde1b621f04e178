"""Attention over packed batches: each packed row attends only to itself, and no work grows with
the square of the packed sequence or is set up again for each new batch shape.

TRL's padding-free packing flattens a batch into one sequence whose position ids restart at 0 with
each row (and the padding appended to it, training.speed.length_multiple, has position 0). How the
rows are kept apart:

- transformers + peft on a CUDA GPU of compute capability 8.0 or more: FlexAttention
  (attn_implementation="flex_attention"). transformers 5.17 finds the rows from the position ids
  (masking_utils.find_packed_sequence_indices) and builds one BlockMask a forward from them; the
  kernel, compiled once (torch.compile; shapes turn dynamic at the second length), skips every
  block outside the rows' own squares.
- elsewhere (the CPU, where FlexAttention has no backward; T4, V100): SDPA with the mask that
  transformers builds from the same position ids, a dense [1, 1, L, L] block-diagonal one.
- unsloth 2026.10.9 takes no attn_implementation on its Llama/Qwen2 path (its FlexAttention is for
  gpt-oss and Gemma): it finds the rows from the position ids itself and attends row by row, with
  flash-attn's varlen kernel when flash-attn is installed, else torch's varlen flash kernel (torch
  2.12+ built with flash attention, on compute capability 8.0+, one call a layer; not with
  UNSLOTH_TORCH_VARLEN=0), else xformers' block-diagonal kernel (xformers comes with unsloth)
  when it imports, else one SDPA call per run of rows of one length. It builds a dense mask for
  these batches only with UNSLOTH_SDPA_PACKED_SEGMENTS=0.

With PACKING=0 the batches are padded at their end, with a mask: transformers takes it with
either attention; unsloth drops it in training (attention is causal and the padding comes last:
no real token sees it) and runs its kernel for unpacked rows.

A process that runs attention on CUDA turns cuDNN's SDPA off first (avoid_cudnn_attention): on
Hopper (H100, H200) with torch 2.11+ and cuDNN 9.15+ SDPA prefers it, and it builds an execution
plan for each new shape (hundreds of ms, per thread, never evicted), which batches of changing
lengths, unsloth's per-row calls, and the export's evaluation and logits check pay again and
again. SDPA then runs flash attention, or the memory-efficient kernel where there is a mask.
"""


def choose(backend_name, capability, packing):
    """The attention this run trains with on a GPU of this compute capability ((major, minor),
    None without CUDA), as metrics.json records it: for peft, the attn_implementation
    load_for_training gives transformers; for unsloth, what unsloth runs."""
    if backend_name == "unsloth":
        return unsloth_attention(capability, packing)
    return "flex_attention" if capability and capability >= (8, 0) else "sdpa"


def avoid_cudnn_attention():
    """Turn cuDNN's SDPA off for this whole process, on CUDA (the module's docstring says why):
    once, before anything runs attention."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def unsloth_attention(capability, packing):
    """What unsloth runs here, by its own decisions (unsloth.utils.attention_dispatch): its
    kernel (select_attention_backend); for SDPA on packed batches, torch's varlen flash kernel
    where unsloth loaded it (_TORCH_VARLEN_ATTN) and the GPU takes it, else one call per run of
    rows of one length, or one call with a dense mask (_SDPA_PACKED_SEGMENTS off); with
    PACKING=0, its kernel for padded batches."""
    from unsloth.utils import attention_dispatch as unsloth

    chosen = unsloth.select_attention_backend(use_varlen=packing)
    if not packing:
        return f"unsloth {chosen}, padded batches"
    if chosen != unsloth.SDPA:
        return f"unsloth {chosen}"
    if not unsloth._SDPA_PACKED_SEGMENTS:
        return "unsloth sdpa with a dense mask"
    if unsloth._TORCH_VARLEN_ATTN is not None and capability >= (8, 0):
        return "unsloth torch varlen flash"
    return "unsloth sdpa row by row"
