"""The training runs of MODEL_NAME on DATASET_NAME, side by side (a sweep's results).

    python -m training.runs        (from the repository root, with the launch's settings:
                                    set -a; . ./.env; . ./.secrets; set +a)

One line per run: the unnamed run (no RUN_NAME) directly under done/<MODEL_NAME>/<DATASET_NAME>/
and checkpoints/<MODEL_NAME>/<DATASET_NAME>/, each named run in a folder of its own there.
Columns: whether its done manifest says complete, its optimizer steps (a run still training:
the step of its latest checkpoint out of the planned total), its evaluation loss before and
after training, and the settings in which the runs differ (from each run's recorded inputs).
"""

import json

from common import (DATASET_NAME_SETTING, MODEL_NAME_SETTING, UserError, checkpoints_prefix,
                    done_prefix, open_bucket, parse_settings, read_manifest, run, short)
from training.checkpoints import POINTER, owned_by_unnamed_run

SETTINGS = [MODEL_NAME_SETTING, DATASET_NAME_SETTING]
UNNAMED = "(unnamed)"


def main():
    settings = parse_settings(__doc__, SETTINGS)
    bucket = open_bucket(settings)
    model, dataset = settings.model_name, settings.dataset_name
    runs = [describe(bucket, model, dataset, name) for name in run_names(bucket, model, dataset)]
    if not runs:
        raise UserError(f"no training run under {bucket.url(done_prefix(model, dataset))} or "
                        f"{bucket.url(checkpoints_prefix(model, dataset))}: check MODEL_NAME and "
                        "DATASET_NAME, or launch allatonce.yaml first")
    print(f"{len(runs)} run(s) of {model} on {dataset} in {bucket}")
    print(table(runs))


def run_names(bucket, model, dataset):
    """None for the unnamed run, if it wrote anything, then the named runs' folders, sorted."""
    names, unnamed = set(), False
    for prefix in (done_prefix(model, dataset), checkpoints_prefix(model, dataset)):
        for entry in listing(bucket, prefix):
            if owned_by_unnamed_run(entry):
                unnamed = True
            else:
                names.add(entry)
    return ([None] if unnamed else []) + sorted(names)


def listing(bucket, prefix):
    """The names directly under a prefix (none when it does not exist)."""
    try:
        names = [path.rstrip("/").rsplit("/", 1)[-1]
                 for path in bucket.fs.ls(bucket.path(prefix), detail=False)]
    except FileNotFoundError:
        return []
    return [name for name in names if not name.startswith(".")]  # a local bucket's temporary files


def describe(bucket, model, dataset, name):
    """What the run's done manifest, or else its plan and latest checkpoint, say."""
    done = read_manifest(bucket, done_prefix(model, dataset, name)) or {}
    checkpoints = checkpoints_prefix(model, dataset, name)
    plan = read_manifest(bucket, checkpoints) or {}
    pointer = json.loads(bucket.get(f"{checkpoints}/{POINTER}") or "{}")
    total = done.get("total_steps") or plan.get("total_steps")
    steps = str(total) if done.get("complete") else f"{pointer.get('step', 0)}/{total or '?'}"
    loss = done.get("eval_loss")
    return {"run": name or UNNAMED, "complete": "yes" if done.get("complete") else "no",
            "steps": steps,
            "eval loss": f"{loss['before']:.4f} -> {loss['after']:.4f}" if loss else "-",
            "inputs": done.get("inputs") or plan.get("inputs") or {}}


def table(runs):
    """Aligned columns: the runs' state, then every recorded input whose value differs."""
    keys = sorted({key for r in runs for key in r["inputs"]})
    differing = [key for key in keys if len({json.dumps(r["inputs"].get(key)) for r in runs}) > 1]
    header = ["run", "complete", "steps", "eval loss", *differing]
    rows = [[r["run"], r["complete"], r["steps"], r["eval loss"],
             *(cell(r["inputs"].get(key)) for key in differing)] for r in runs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def cell(value):
    return "-" if value is None else short(value, 16)


if __name__ == "__main__":
    run(main)
