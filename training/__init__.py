"""dotrain.py's machinery, one concern a module, so that dotrain.py reads as the training story.

    processes.py    the training processes: ranks, what rank 0 tells the others, each rank's
                    batches of a shard and the check that they shared it exactly, the scratch disk
    shards.py       the plan (optimizer steps from the rows' lengths) and each shard prepared for
                    training, one ahead, in a process of its own
    checkpoints.py  the checkpoint protocol in the bucket: uploads, the pointer, whole checkpoints,
                    resuming, when to save (SAVE_STEPS, SAVE_MINUTES)
    lease.py        one launch at a time trains a run: the lease under its checkpoints
    precision.py    fp16's skipped optimizer steps (counted, logged, bounded) and what a resume on
                    another kind of GPU may change
    fit.py          whether a run fits its GPU: the memory estimate, checked before the download
    export.py       lora_model/ and fused/ from the last checkpoint, checked, then the done manifest
    merge.py        the adapter merged into the base one weights file at a time, every weight checked
    report.py       what a run reports: metrics.json, loss.png, its summary lines, REPORT_TO
    speed.py        how fast a run trains: model FLOPs, MFU, batch lengths, real tokens, the
                    backend measured faster at a model's size
    attention.py    what keeps packed rows apart, per backend and device
    runs.py         `python -m training.runs`: a sweep's runs side by side, read from the bucket

None of them imports a step; heavy libraries (torch, transformers, trl, peft) are imported inside
the functions that use them, so that dotrain.py decides when (unsloth must come first).
"""
