"""The export: lora_model/ and fused/ from the run's last checkpoint, checked against each other,
then metrics.json, loss.png and the done manifest, written last. Plain transformers + peft,
whichever backend trained.

    done/<MODEL_NAME>/<DATASET_NAME>[/<RUN_NAME>]/
        lora_model/     the adapter, naming the bucket's model as its base, with the tokenizer
        fused/          the adapter merged into the base's weights files (training/merge.py)
        metrics.json, loss.png, tensorboard/ (REPORT_TO)   (training/report.py)
        _manifest.json  written last, once every check passed

Both outputs carry the chat template the data was rendered with and a generation config that
stops at the chat's end of turn. The logits check compares fused/ with base + adapter on held-out
rows; nothing is published unless every check passes.
"""

import gc
import itertools
import json
import os
import shutil

from common import (NOT_TRAINED, UserError, end_of_turn as chat_end_of_turn, load_chat_tokenizer,
                    log, read_parquet_batches, short, write_manifest)
from training.checkpoints import fetch_checkpoint, resume_point
from training.merge import fuse
from training.report import evaluation_summary, plot_loss, run_metrics
from training.shards import last_trained

EXPORTED_FILES = ["adapter_model.safetensors", "adapter_config.json", "trainer_state.json"]
SAMPLE_TOKENS = 64  # of the sample answer, a smoke test of the fused model
LOSS_POSITIONS = 1024  # logits computed at once for fused/'s evaluation loss
CHECK_ROWS, CHECK_TOKENS = 3, 128  # held-out rows whose logits are compared, and tokens of each
# The logits check (check_logits) compares root mean squares over the trained positions and
# the vocabulary. The adapter must move the logits by more than EFFECT_FLOOR of their size:
# bf16 keeps 8 significant bits, so a logit is only known to 2^-9..2^-8 of itself, and an
# adapter of zeros (or one that did not load) moves them by exactly 0.
EFFECT_FLOOR = 2 ** -8
# fused/ must be within LOGITS_TOLERANCE of that move from base + adapter. Two things keep a
# correct 16-bit merge from it. Rounding: a merged weight moves by at most 2^-8 of its size
# (half an ulp), 2^-9.2 RMS, independently of its neighbours, so each adapted projection's
# output moves by ~2^-9.2 of its size; the unmerged reference rounds its two partial outputs in
# bf16 too: ~2^-8.4 together. Those independent errors add incoherently over the 7 projections
# of L layers (as sqrt(7 L)) while a trained low-rank update adds coherently (as 7 L): for an
# adapter that changes each output by a fraction rho, distance / effect ~ 2^-8.4 / (rho
# sqrt(7 L)), 0.003 / (14 rho) on a 28-layer 7B-class model. Random adapters on the 2-layer
# tiny models in bf16 on CPU, whose updates do not add coherently (0.003 / rho by the same
# count), measure 1.3-2.8 times that count; with that margin a 7B-class adapter passes once
# rho is above ~0.3%, which a few dozen optimizer steps should reach. That is an estimate: no
# 7B model was measured here. Lost update: where the update of a weight is under half its ulp,
# W + update rounds back to W, so a weak adapter's update is partly lost in 16 bits, coherently,
# and fused/ is not what was trained; the check fails it on purpose. Measured on the tiny model
# with random adapters: a merge that changed 59% of the adapted weights lost 37% of the effect
# (0.9 of it away), one that changed 95% lost 2% (0.2 away); the adapters the tests train sit
# at 0.004-0.006. A merge that lost the adapter, scaled it by alpha / sqrt(r) instead of
# alpha / r or put it into another layer is 0.75 of the effect away or more.
LOGITS_TOLERANCE = 0.25


def export(run, model_dir, plan, inputs, work, held_out):
    """lora_model/ and fused/ from the last checkpoint, checked against each other, fused/'s
    evaluation loss on the `held_out` rows beside the trained model's, metrics, then the done
    manifest."""
    settings, bucket = run.settings, run.bucket
    pointer = resume_point(bucket, run.checkpoints)
    checkpoint = fetch_checkpoint(bucket, run.checkpoints, pointer, work.export, EXPORTED_FILES)
    tokenizer = load_chat_tokenizer(model_dir, run.data["inputs"]["chat_template"])
    generation = generation_config(model_dir, tokenizer, end_of_turn(run.data, tokenizer))
    lora_dir, fused_dir = os.path.join(work.export, "lora_model"), os.path.join(work.export, "fused")
    save_adapter(checkpoint, lora_dir, settings.model_name, tokenizer, generation)
    merge = fuse(model_dir, lora_dir, fused_dir, tokenizer, generation)
    examples, rows = check_examples(bucket, run.data_prefix, run.data, plan)
    check, fused = check_logits(model_dir, lora_dir, fused_dir, examples)
    check.update(merge=merge, rows=rows)
    sample = generate(fused, tokenizer, settings.sample_prompt)
    log(f"sample (greedy, fused model): {settings.sample_prompt!r} -> {sample!r}")
    fused_loss = evaluation_loss(fused, held_out) if held_out else None
    del fused

    metrics = run_metrics(checkpoint, plan, pointer)
    evaluations = metrics["evaluations"]
    # The trained model's loss is the 4-bit base's with LOAD_IN_4BIT; fused/ holds the 16-bit one.
    metrics["eval_loss"] = {"before": evaluations[0]["eval_loss"], "after": evaluations[-1]["eval_loss"],
                            "after_fused": round(fused_loss, 6), "rows": run.data.get("eval_rows")} \
        if evaluations else None
    peaks = metrics["work_dir_peak_bytes"] or {}
    peaks["node 0"] = max(peaks.get("node 0", 0), work.peak_bytes)  # the export's files too
    metrics["work_dir_peak_bytes"] = peaks
    plot_loss(metrics, os.path.join(work.export, "loss.png"))
    for folder in (lora_dir, fused_dir):
        for name in sorted(os.listdir(folder)):
            bucket.upload(os.path.join(folder, name), f"{run.done}/{os.path.basename(folder)}/{name}")
    bucket.put(f"{run.done}/metrics.json", json.dumps(metrics, indent=1).encode())
    bucket.upload(os.path.join(work.export, "loss.png"), f"{run.done}/loss.png")
    write_manifest(bucket, run.done, {
        "complete": True, "inputs": inputs, "shards": metrics["shards"], "rows": plan.rows,
        "total_steps": plan.total_steps, "tokens_seen": metrics["tokens_seen"],
        "backend": pointer["backend"], "check": check,
        "eval_loss": metrics["eval_loss"],
        "sample": {"prompt": settings.sample_prompt, "completion": sample},
        "outputs": ["lora_model/", "fused/", "metrics.json", "loss.png"]
        + (["tensorboard/"] if settings.report_to == "tensorboard" else [])})
    log(f"{bucket.url(run.done)} complete: {plan.total_steps} steps, lora_model/ and fused/")
    if evaluations:
        base = "the 16-bit base, not the 4-bit one it trained on" if settings.load_in_4bit else "the base"
        log(f"{evaluation_summary(evaluations, run.data.get('eval_rows'))}; {fused_loss:.4f} for fused/ "
            f"(the adapter merged into {base})")
    shutil.rmtree(work.root, ignore_errors=True)


def end_of_turn(data, tokenizer):
    """The text that closes each answer, trained after it: what pretokenize.py found (in the
    model-ready manifest), else what the chat template renders after an answer."""
    return data["end_of_turn"] if "end_of_turn" in data else chat_end_of_turn(tokenizer)


def generation_config(model_dir, tokenizer, end_of_turn):
    """The base's generation config, stopping at the chat's end of turn as well as at eos."""
    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # the base has no generation_config.json
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    ids = tokenizer.encode(end_of_turn, add_special_tokens=False) if end_of_turn else []
    stops = ids if len(ids) == 1 else []
    if len(ids) > 1:  # any one of its tokens alone must not stop generation
        log(f"the end of turn {end_of_turn!r} is {len(ids)} tokens, not one: transformers stops at "
            "it as a stop string (stop_strings); vLLM reads only eos_token_id, so requests to the "
            f"served model must send \"stop\": [{json.dumps(end_of_turn)}]")
        config.stop_strings = [end_of_turn]
    eos = config.eos_token_id
    for token in [tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]:
        if token is not None and token not in stops:
            stops.append(token)
    config.eos_token_id = stops
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    return config


def save_adapter(checkpoint, lora_dir, model_name, tokenizer, generation):
    """The checkpoint's adapter, naming the bucket's model as its base, with the tokenizer and
    the generation config."""
    os.makedirs(lora_dir)
    shutil.copy(os.path.join(checkpoint, "adapter_model.safetensors"), lora_dir)
    with open(os.path.join(checkpoint, "adapter_config.json")) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = model_name  # not the local copy it was trained from
    with open(os.path.join(lora_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save_pretrained(lora_dir)
    generation.save_pretrained(lora_dir)


# ---------------------------------------------------------------- the logits check


def check_examples(bucket, prefix, data, plan):
    """The rows whose logits are compared, each cut to CHECK_TOKENS tokens from a little before
    its first trained one, with the positions whose next token is trained: the first CHECK_ROWS
    held-out rows (the model-ready manifest's "eval", never trained on), or without them the
    first rows of the last trained shard. And which rows they are."""
    held_out = bool(data.get("eval"))
    paths = [entry["path"] for entry in data["eval"]] if held_out else \
        [part["path"] for part in data["shards"][last_trained(plan)]["parts"]]

    def candidates():
        for path in paths:
            for batch in read_parquet_batches(bucket, f"{prefix}/{path}", CHECK_ROWS):
                columns = (batch.column(name).to_pylist() for name in ("input_ids", "labels", "source_row"))
                for ids, labels, source_row in zip(*columns):
                    trained = [t for t in range(len(ids)) if labels[t] != NOT_TRAINED]
                    start = max(0, trained[0] - CHECK_TOKENS // 4) if trained else 0
                    ids, labels = ids[start:start + CHECK_TOKENS], labels[start:start + CHECK_TOKENS]
                    positions = [t for t in range(len(ids) - 1) if labels[t + 1] != NOT_TRAINED]
                    if positions:
                        yield path, source_row, (ids, positions)

    chosen = list(itertools.islice(candidates(), CHECK_ROWS))
    if not chosen:
        raise UserError(f"{', '.join(paths)} in {bucket.url(prefix)} hold no trained token to check "
                        "the fused model on: rerun with REBUILD=pretokenize")
    if not held_out:
        log(f"the model-ready manifest lists no held-out rows: the logits are compared on rows "
            f"of {paths[0]}, which training saw")
    examples = [example for _, _, example in chosen]
    return examples, {"held_out": held_out, "paths": list(dict.fromkeys(path for path, _, _ in chosen)),
                      "source_rows": [row for _, row, _ in chosen],
                      "positions": sum(len(positions) for _, positions in examples)}


def check_logits(model_dir, lora_dir, fused_dir, examples, max_memory=None):
    """That fused/ is base + adapter: on the trained positions of `examples` the adapter must
    move the logits by more than EFFECT_FLOOR of their size, and fused/ must be within
    LOGITS_TOLERANCE of that move from base + adapter (root mean squares over positions and
    vocabulary). Runs where the model runs: loaded straight onto the GPUs, what does not fit
    them in RAM (accelerate moves it in as it runs; `max_memory` caps each device, as
    accelerate takes it), or on the CPU in the base's dtype (one model at a time). The figures,
    and the fused model."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # on stderr, before a one-line error
    dispatched = torch.cuda.is_available() or max_memory
    where = {"device_map": "auto", "max_memory": max_memory} if dispatched else {}  # dtype: the checkpoint's
    base = AutoModelForCausalLM.from_pretrained(model_dir, **where)
    devices = sorted({str(device) for device in getattr(base, "hf_device_map", {}).values()})
    adapted = with_adapter(base, lora_dir, max_memory)
    reference = logits(adapted, examples)
    with adapted.disable_adapter():
        without = logits(adapted, examples)
    figures = {"dtype": str(base.dtype).removeprefix("torch."), "device": str(base.device),
               **({"devices": devices} if devices else {}),
               "base_rms": rms(without), "adapter_effect_rms": rms(reference - without)}
    del base, adapted, without
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    fused = AutoModelForCausalLM.from_pretrained(fused_dir, **where)
    figures["fused_distance_rms"] = rms(logits(fused, examples) - reference)
    figures.update(effect_over_base=figures["adapter_effect_rms"] / figures["base_rms"],
                   effect_floor=EFFECT_FLOOR, tolerance=LOGITS_TOLERANCE,
                   distance_over_effect=figures["fused_distance_rms"] / max(figures["adapter_effect_rms"], 1e-30))
    log(f"logits on {len(reference)} trained positions ({figures['dtype']} on {figures['device']}): the "
        f"adapter moves them by {figures['effect_over_base']:.2e} of their size (floor {EFFECT_FLOOR:.2e}); "
        f"fused/ is {figures['distance_over_effect']:.2e} of that move from base + adapter "
        f"(tolerance {LOGITS_TOLERANCE})")
    if not figures["effect_over_base"] > EFFECT_FLOOR:
        raise UserError(f"the adapter changes nothing: it moves the logits by "
                        f"{figures['effect_over_base']:.2e} of their size, less than their 16-bit "
                        f"rounding ({EFFECT_FLOOR:.2e}): training did not change the model "
                        "(LEARNING_RATE, MAX_STEPS?); nothing was published")
    if not figures["distance_over_effect"] <= LOGITS_TOLERANCE:
        raise UserError(f"the fused model's logits differ from base + adapter by "
                        f"{figures['distance_over_effect']:.3g} of the adapter's effect, more than "
                        f"{LOGITS_TOLERANCE}: the merge went wrong, or the adapter is too weak for "
                        f"the base's {figures['dtype']} weights to hold (it moves the logits by "
                        f"{figures['effect_over_base']:.2e} of their size; the update of a weight "
                        "under half its ulp rounds away): train longer or with a higher "
                        "LEARNING_RATE; nothing was published")
    return figures, fused


def with_adapter(base, lora_dir, max_memory=None):
    """`base` with the adapter in lora_dir, which must fit it (PeftModel.from_pretrained only warns
    of missing keys). On a base that device_map="auto" partly offloaded to RAM the adapter is made
    beside the weights themselves, as PeftModel.from_pretrained does, not beside the offload
    hooks' empty ones (on `meta`), and load_adapter dispatches the adapted model again, within
    `max_memory`; a base partly on disk is refused (peft cannot load an adapter beside it)."""
    from accelerate.hooks import remove_hook_from_submodules
    from peft import LoraConfig, PeftModel

    devices = {str(device) for device in getattr(base, "hf_device_map", {}).values()}
    if "disk" in devices:
        raise UserError(f"the export's logits check needs the base model {base.name_or_path} in GPU "
                        "memory and RAM, and part of it would go to disk, beside which peft cannot "
                        "load an adapter: export on a machine with more memory (training is done: "
                        "a rerun only exports); nothing was published")
    if "cpu" in devices:
        remove_hook_from_submodules(base)
    adapted = PeftModel(base, LoraConfig.from_pretrained(lora_dir))
    loaded = adapted.load_adapter(lora_dir, "default", max_memory=max_memory)
    if loaded.missing_keys or loaded.unexpected_keys:
        raise UserError(f"peft loads the adapter in {lora_dir} with {len(loaded.missing_keys)} missing "
                        f"keys {short(loaded.missing_keys)} and {len(loaded.unexpected_keys)} "
                        f"unexpected keys {short(loaded.unexpected_keys)}: it does not fit the base")
    return adapted


def logits(model, examples):
    """The logits at the trained positions of each example, one after the other, in float32."""
    import torch

    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([ids], device=model.device)).logits[0, positions].float()
                          for ids, positions in examples])


def evaluation_loss(model, rows):
    """The model's mean loss per trained token on `rows`, a row at a time, its logits computed
    only at the positions whose next token is trained, LOSS_POSITIONS at a time (the model's
    own forward: logits_to_keep): the export's model holds 16-bit weights, and a row's full
    logits in float32 (its tokens x a vocabulary of 152k) would not fit beside them on the GPUs
    a 4-bit run trains on."""
    import torch
    import torch.nn.functional as F

    loss_sum = tokens = 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device=model.device)
            labels = torch.tensor(row["labels"], device=model.device)
            positions = (labels[1:] != NOT_TRAINED).nonzero().flatten()
            for chunk in positions.split(LOSS_POSITIONS):
                logits = model(input_ids=ids, logits_to_keep=chunk, use_cache=False).logits[0]
                loss_sum += F.cross_entropy(logits.float(), labels[chunk + 1], reduction="sum").item()
            tokens += len(positions)
    return loss_sum / max(tokens, 1)


def rms(values):
    return values.square().mean().sqrt().item()


def generate(model, tokenizer, prompt):
    """A greedy answer, prompted as the model will be served: chat template, its stop tokens
    (and stop strings)."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_dict=False)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=model.device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                             max_new_tokens=SAMPLE_TOKENS, do_sample=False, tokenizer=tokenizer)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
