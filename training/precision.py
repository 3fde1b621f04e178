"""The run's precision: the optimizer steps that fp16's loss scaler skips (counted in every
checkpoint's pointer, logged, and the run stopped once they are too many), and what a run
resumed on another kind of GPU may change.
"""

from common import UserError, log

# torch's GradScaler starts at a scale of 2^16 and halves it at each step it skips: finding a
# scale that fits the gradients may skip up to 16 steps (down to a scale of 1) at any time of
# the run, before a share of skipped steps means that the model overflows float16.
SCALE_SEARCH_STEPS = 16


def too_many_skipped(skipped, steps, max_fraction):
    """Whether `skipped` of the run's first `steps` optimizer steps are too many: more than
    SCALE_SEARCH_STEPS, and more than `max_fraction` of the steps."""
    return skipped > SCALE_SEARCH_STEPS and skipped > max_fraction * steps


def skipped_steps(records, record, max_fraction):
    """A TrainerCallback for fp16: each optimizer step that the loss scaler skips (its gradients
    overflowed float16; accelerate's optimizer says so) is logged and added to `record`, the
    unit's UnitRecord, which every checkpoint's pointer carries; the run fails in one line once
    the skipped steps of all its units (`records`) are too many (too_many_skipped)."""
    from transformers import TrainerCallback

    class SkippedSteps(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if not optimizer.step_was_skipped:
                return
            step = state.global_step
            record.skipped_steps = [*(record.skipped_steps or []), step]
            skipped = sum(len(unit.skipped_steps or []) for unit in records.values())
            if state.is_world_process_zero:
                log(f"step {step}: the fp16 loss scaler skipped the optimizer step (the gradients "
                    f"overflowed float16), {skipped} skipped so far; loss scale now "
                    f"{optimizer.scaler.get_scale():g}")
            if too_many_skipped(skipped, step, max_fraction):
                raise UserError(
                    f"the fp16 loss scaler skipped {skipped} of the first {step} optimizer steps "
                    f"(their gradients overflowed float16), more than MAX_SKIPPED_FRACTION="
                    f"{max_fraction:g} of them: this model does not train in float16 (a model "
                    "trained in bfloat16 can overflow it); train on a GPU that computes bfloat16 "
                    "(compute capability 8.0 or more, e.g. --gpus L4:1, A10G, A100, H100), or raise "
                    "MAX_SKIPPED_FRACTION")

    return SkippedSteps()


def precision_change(planned, dtype):
    """What a run whose checkpoints were trained in `planned` does on a machine that trains in
    `dtype`: the adapter is float32 whatever the precision, and its optimizer state does not
    depend on it, so a change goes on (the line to log), but for a change to float16, whose
    narrower range a model trained in bfloat16 or float32 may overflow: refused."""
    if planned in (None, dtype):
        return None
    if dtype == "float16":
        raise UserError(f"the checkpoints of this run were trained in {planned} and this GPU computes "
                        "float16 only (no native bfloat16: T4, V100), whose narrower range the model "
                        "may overflow: resume on the kind of GPU the run started on (pin it, e.g. "
                        "--gpus L4:1), or rerun with REBUILD=dotrain to start over in float16")
    return (f"the checkpoints of this run were trained in {planned}: resuming in {dtype} (the "
            "adapter is float32 in both)")
