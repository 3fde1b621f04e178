"""What a run reports: metrics.json (every logged step, every evaluation, each unit's summary),
loss.png, the line that sums up the evaluation, and REPORT_TO's trackers (tensorboard, Weights &
Biases), all read from the trainer's own log history.
"""

import importlib.util
import json
import os

from common import UserError, fingerprint
from training.shards import units
from training.speed import summary

STEP_KEYS = ("step", "shard", "loss", "learning_rate", "grad_norm", "tokens_per_second",
             "num_input_tokens_seen", "seconds", "shapes", "loss_scale")  # (loss_scale: fp16's)


def read_log(checkpoint):
    """A checkpoint's trainer log: the entries of the logged steps, the evaluations, the tokens
    seen and how the run trained (training.speed.describe, the last entry)."""
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        state = json.load(f)
    steps = [{key: entry.get(key) for key in STEP_KEYS} for entry in state["log_history"] if "loss" in entry]
    evaluations = [{"step": entry["step"], "eval_loss": entry["eval_loss"]}
                   for entry in state["log_history"] if "eval_loss" in entry]
    speed = next((entry["speed"] for entry in reversed(state["log_history"]) if "speed" in entry), None)
    return steps, evaluations, state.get("num_input_tokens_seen"), speed


def evaluation_summary(evaluations, rows):
    return (f"evaluation loss on {rows} held-out rows: {evaluations[0]['eval_loss']:.4f} before "
            f"training, {evaluations[-1]['eval_loss']:.4f} after")


def run_metrics(checkpoint, plan, pointer):
    """Loss, learning rate and tokens/s of every logging step, the evaluation loss of every
    evaluation, and a summary of each unit (a shard in an epoch): its loss, the seconds training
    waited on storage (shard downloads, checkpoint uploads) and, under DDP, the sequences each
    rank trained on; the optimizer steps fp16's loss scaler skipped; the most bytes the scratch
    directory held on each node; the run's speed (training.speed.summary)."""
    steps, evaluations, tokens_seen, speed = read_log(checkpoint)
    shards = []
    for number, (epoch, index, start, steps_of_unit) in enumerate(units(plan)):
        end = min(start + steps_of_unit, plan.total_steps)
        if start >= plan.total_steps:
            break
        logged = [entry for entry in steps if start < entry["step"] <= end]
        shards.append({**plan.shards[index], "epoch": epoch, "first_step": start + 1,
                       "last_step": end, "partial": end < start + steps_of_unit,
                       "mean_loss": sum(e["loss"] for e in logged) / len(logged) if logged else None,
                       **(plan.shards_io or {}).get(str(number), {})})
    return {"steps": steps, "evaluations": evaluations, "shards": shards,
            "total_steps": plan.total_steps, "epochs": plan.epochs, "tokens_seen": tokens_seen,
            "trained_tokens": sum(shard["trained_tokens"] or 0 for shard in shards),
            "training_seconds": pointer["seconds"], "backend": pointer["backend"],
            "device": pointer["device"], "world_size": plan.world_size or 1,
            "skipped_steps": sum(len(shard.get("skipped_steps", [])) for shard in shards),
            "work_dir_peak_bytes": plan.work_dir_peak_bytes, "speed": summary(steps, speed)}


def plot_loss(metrics, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([e["step"] for e in metrics["steps"]], [e["loss"] for e in metrics["steps"]], lw=1,
            label="training loss")
    if metrics["evaluations"]:
        ax.plot([e["step"] for e in metrics["evaluations"]], [e["eval_loss"] for e in metrics["evaluations"]],
                "o-", lw=1.5, label="evaluation loss (held-out rows)")
    for shard in metrics["shards"][1:]:
        ax.axvline(shard["first_step"] - 0.5, color="grey", ls=":", lw=0.8)
    ax.set(xlabel="optimizer step (dotted: shard boundaries)", ylabel="loss per trained token",
           title="training and evaluation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def set_up_reporting(settings, checkpoints_url, inputs, trainer_dir):
    """REPORT_TO's setup: tensorboard's event files go with the checkpoints (Uploads), and a
    Weights & Biases run goes to WANDB_PROJECT and stays one run across a managed job's
    recoveries."""
    if settings.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(trainer_dir, "tensorboard")
    if settings.report_to != "wandb":
        return
    if importlib.util.find_spec("wandb") is None:
        raise UserError("REPORT_TO=wandb needs the wandb package: pip install wandb (allatonce.yaml's "
                        "setup installs it when REPORT_TO=wandb)")
    if not os.environ.get("WANDB_API_KEY"):
        raise UserError("REPORT_TO=wandb needs WANDB_API_KEY: give it as a secret "
                        "(--secret WANDB_API_KEY, or in .secrets)")
    os.environ["WANDB_PROJECT"] = settings.wandb_project
    os.environ.setdefault("WANDB_RUN_ID", fingerprint([checkpoints_url, inputs])[:16])
    os.environ.setdefault("WANDB_RESUME", "allow")
    os.environ.setdefault("WANDB_NAME", settings.run_name or f"{settings.model_name} {settings.dataset_name}")
