"""fused/: the adapter merged into the base's own weights files, one file at a time, so that host
memory holds one weights file and the adapter whatever the model's size. Every merged weight is
W + scale * B @ A computed in float32 and rounded once to W's dtype, and is checked as written;
an adapter that does not fit the base, or uses a LoRA feature the merge would not honour, is
refused in one line.
"""

import contextlib
import ctypes
import json
import math
import os
import shutil

from common import UserError, log, short

# LoRA features a merge of scale * B @ A into the base's weights would not honour
UNMERGED_FEATURES = ("use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                     "modules_to_save", "trainable_token_indices", "layer_replication",
                     "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora",
                     "velora_config", "monteclora_config", "megatron_config")


def fuse(model_dir, lora_dir, fused_dir, tokenizer, generation):
    """fused/: the base's files with the adapter merged into its weights, one weights file at a
    time (memory: one weights file and the adapter, whatever the model's size). Each merged
    weight is W + scale * B @ A in float32, rounded once to W's dtype, and checked as written;
    every adapter pair goes into exactly one weight. The base's other files are copied, but
    config.json says use_cache (an unsloth-trained run must not turn it off), and the tokenizer
    and generation config are those given. The merge's figures."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = weights_files(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter, scale = read_adapter(model_dir, lora_dir, files, device)
    with contextlib.suppress(OSError):  # (not glibc)
        # glibc serves freed blocks under 32 MB again from its heap, where tensors of one file
        # after another fragment it and host memory creeps up: give every block over 1 MB a
        # mapping of its own, returned to the system when freed (M_MMAP_THRESHOLD)
        ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)
    os.makedirs(fused_dir)
    applied, worst, changed, elements = [], 0.0, 0, 0
    for name in files:
        # pread, not mmap: pages of the mapped file would stay resident with the copies
        with safe_open(os.path.join(model_dir, name), "pt", backend="pread") as f:
            metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
        for key in tensors.keys() & adapter.keys():
            tensors[key] = merged_weight(tensors[key], *adapter[key], scale).to("cpu", tensors[key].dtype)
            applied.append(key)
        save_file(tensors, os.path.join(fused_dir, name), metadata)
        del tensors
        file_worst, file_changed, file_elements = check_merged_file(model_dir, fused_dir, name, adapter, scale)
        worst, changed, elements = max(worst, file_worst), changed + file_changed, elements + file_elements
    if sorted(applied) != sorted(adapter):
        raise UserError(f"the adapter's {len(adapter)} pairs were merged {len(applied)} times into "
                        f"{len(set(applied))} weights of {model_dir}, not once each: its weights "
                        "files list a weight twice; nothing was published")
    copy_other_files(model_dir, fused_dir, files, tokenizer)
    tokenizer.save_pretrained(fused_dir)
    generation.save_pretrained(fused_dir)
    log(f"fused/: {len(applied)} weights of {len(files)} files merged with scale {scale:g} on "
        f"{device}, each within {worst:.2f} of half an ulp of W + scale * B @ A; the merge changed "
        f"{changed / elements:.1%} of their values (the rest of the update rounds away in their dtype)")
    return {"files": len(files), "merged_weights": len(applied), "scale": scale, "device": device,
            "max_error_in_half_ulps": worst, "changed_fraction": changed / elements}


def weights_files(model_dir):
    """The base's safetensors weights files: those its index lists, or model.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.exists(os.path.join(model_dir, "model.safetensors")):
        return ["model.safetensors"]
    raise UserError(f"{model_dir} has no model.safetensors (or model.safetensors.index.json): "
                    "fused/ is merged from safetensors weights; import a model published as safetensors")


def read_adapter(model_dir, lora_dir, files, device):
    """{base weight name: (A, B)} of the adapter, on `device`, and its scale. The adapter must
    hold exactly the keys peft expects for its config on this base's architecture (no missing
    module, no unexpected key), each module's weight must be in the base's files, and the
    config may use no feature that a merge of scale * B @ A would not honour."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = LoraConfig.from_pretrained(lora_dir)
    used = [name for name in UNMERGED_FEATURES if getattr(config, name, None)]
    used += [f"bias={config.bias!r}"] if config.bias != "none" else []
    if config.peft_type != "LORA" or used:
        raise UserError(f"the adapter in {lora_dir} uses {', '.join(used) or config.peft_type}, which "
                        "the merge into fused/ does not support: train a plain LoRA adapter")
    with torch.device("meta"):  # the architecture alone, as peft sees it: no weights loaded
        expected = get_peft_model_state_dict(PeftModel(AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model_dir)), config), save_embedding_layers=False).keys()
    weights = load_file(os.path.join(lora_dir, "adapter_model.safetensors"), device=device)
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise UserError(f"the adapter in {lora_dir} does not fit {model_dir}: {len(missing)} missing "
                        f"keys {short(missing)}, {len(unexpected)} unexpected keys "
                        f"{short(unexpected)}; it was trained on another model or its keys were renamed")
    names = set()
    for name in files:
        with safe_open(os.path.join(model_dir, name), "pt") as f:
            names.update(f.keys())
    adapter = {}
    for key in weights:
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            adapter[f"{module}.weight"] = (weights[key].float(),
                                           weights[key.replace(".lora_A.", ".lora_B.")].float())
    unmatched = sorted(adapter.keys() - names)
    if unmatched:
        raise UserError(f"the base's weights files in {model_dir} have no weight {short(unmatched)} "
                        "for the adapter: this model's files name its weights otherwise than its "
                        "modules, which the merge does not support")
    return adapter, config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def merged_weight(weight, a, b, scale):
    """W + scale * B @ A in float32, where A and B are."""
    import torch

    return weight.to(a.device, torch.float32, copy=True).addmm_(b, a, alpha=scale)


def check_merged_file(model_dir, fused_dir, name, adapter, scale):
    """That the fused file holds the base file's tensors, names and metadata, unchanged but for
    the adapted weights, each within one rounding of its dtype (half an ulp, relative) of
    W + scale * B @ A in float32. The largest error, in half ulps, and how many elements of
    the adapted weights the merge changed, of how many."""
    import torch
    from safetensors import safe_open

    worst, changed, elements = 0.0, 0, 0
    with safe_open(os.path.join(model_dir, name), "pt", backend="pread") as base, \
            safe_open(os.path.join(fused_dir, name), "pt", backend="pread") as fused:
        same = sorted(base.keys()) == sorted(fused.keys()) and base.metadata() == fused.metadata()
        for key in base.keys() if same else ():
            weight, written = base.get_tensor(key), fused.get_tensor(key)
            same = written.dtype == weight.dtype and written.shape == weight.shape
            if not same:
                break
            if key not in adapter:
                same = torch.equal(written, weight)
                if not same:
                    break
                continue
            changed += int(torch.count_nonzero(written != weight))
            elements += weight.numel()
            exact = merged_weight(weight, *adapter[key], scale)
            error = written.to(exact.device, torch.float32).sub_(exact).abs_()
            finfo = torch.finfo(weight.dtype)
            half_ulp = exact.abs_().mul_(finfo.eps / 2).add_(finfo.smallest_normal * finfo.eps / 2)
            worst = max(worst, error.div_(half_ulp).max().item())
    if not same or worst > 1:
        raise UserError(f"fused/{name} is not what the merge should have written ("
                        + (f"a merged weight is {worst:.3g} half ulps from W + scale * B @ A" if same
                           else "its tensors, names or metadata differ from the base's")
                        + "): the merge or the disk went wrong; nothing was published")
    return worst, changed, elements


def copy_other_files(model_dir, fused_dir, files, tokenizer):
    """The base's files that are neither weights, tokenizer nor generation config, as they are;
    config.json with use_cache on."""
    from transformers.tokenization_utils_base import (ADDED_TOKENS_FILE, SPECIAL_TOKENS_MAP_FILE,
                                                      TOKENIZER_CONFIG_FILE)

    tokenizer_files = {*tokenizer.vocab_files_names.values(),
                       ADDED_TOKENS_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE,
                       "chat_template.jinja", "chat_template.json"}
    for name in sorted(os.listdir(model_dir)):
        source = os.path.join(model_dir, name)
        if name.startswith(".") or not os.path.isfile(source) or name in files \
                or name in tokenizer_files or name == "generation_config.json":
            continue
        if name.endswith(".safetensors"):
            log(f"not copied to fused/: {name}, weights that the index does not list (unmerged)")
        elif name == "config.json":
            with open(source) as f:
                config = json.load(f)
            with open(os.path.join(fused_dir, name), "w") as f:
                json.dump({**config, "use_cache": True}, f, indent=2, sort_keys=True)
        else:
            shutil.copy(source, fused_dir)
