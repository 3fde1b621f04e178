"""Print one table of every benchmark's figure, target and whether it is met, from the results
files in bench/results/ (written by the bench scripts; `make bench` runs them).

    .venv/bin/python bench/table.py [--markdown]
"""

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (for the README)")
    args = parser.parse_args()
    rows = [("benchmark", "figure", "target", "met?")]
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        for row in ROWS.get(path.stem, own_rows)(result):
            rows.append((row["benchmark"], row["figure"], row["target"],
                         {True: "yes", False: "NO", None: "-"}[row["met"]]))
    if args.markdown:
        print("\n".join("| " + " | ".join(row) + " |" for row in [rows[0], ("---",) * 4, *rows[1:]]))
        return
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def own_rows(result):
    """Results that carry their own rows (rerun, transfer)."""
    return result["table"]


def import_memory_rows(result):
    runs, targets = result["runs"], result["targets"]
    ours_n, ours_4n, original_4n = runs["ours_N"], runs["ours_4N"], runs["original_4N"]
    n = result["n"]
    return [
        {"benchmark": f"import-dataset peak RSS, {n:,} -> {4 * n:,} rows",
         "figure": f"{peak(ours_n):.0f} -> {peak(ours_4n):.0f} MB",
         "target": "4N within 1.15x of N", "met": targets["ours_4N_within_1.15x_of_ours_N"]},
        {"benchmark": f"import-dataset peak RSS vs save_to_disk, {4 * n:,} rows",
         "figure": f"{peak(ours_4n):.0f} MB vs {peak(original_4n):.0f} MB",
         "target": "at most 1/4", "met": targets["ours_4N_at_most_quarter_of_original_4N"]},
    ]


def peak(run):
    """All processes' peak memory where measured (peak_mb), else the largest process's."""
    return run.get("peak_mb", run["peak_rss_mb"])


def import_throughput_rows(result):
    rate, ratios, targets, met = (result[k] for k in ("rows_per_s", "ratios", "targets", "met"))
    rows = result["data"]["rows"]
    return [
        {"benchmark": f"import-dataset throughput, NUM_PROC 2 vs 1, {rows:,} rows",
         "figure": f"{rate['num_proc_2']:,} vs {rate['num_proc_1']:,} rows/s "
                   f"({ratios['num_proc_2_vs_1']}x)",
         "target": f">= {targets['num_proc_2_vs_1']}x", "met": met["num_proc_2_vs_1"]},
        {"benchmark": f"import-dataset throughput vs the original method, {rows:,} rows",
         "figure": f"{rate['num_proc_2']:,} vs {rate['original']:,} rows/s "
                   f"({ratios['num_proc_2_vs_original']}x)",
         "target": f">= {targets['num_proc_2_vs_original']}x", "met": met["num_proc_2_vs_original"]},
        *([{"benchmark": "import-dataset phases, NUM_PROC 1 -> 2: raw copy (process start "
                         "included), standardization",
            "figure": f"{phases['num_proc_1']['raw_copy_s']} -> {phases['num_proc_2']['raw_copy_s']} s, "
                      f"{phases['num_proc_1']['standardize_s']} -> {phases['num_proc_2']['standardize_s']} s "
                      f"({ratios['standardize_num_proc_2_vs_1']}x)",
            "target": "-", "met": None}] if (phases := result.get("phases")) else []),
    ]


def pretokenize_rows(result):
    speed, ratios, targets, met = (result[k] for k in ("tokens_per_s", "ratios", "targets", "met"))
    processes = [{"benchmark": "pretokenize throughput, NUM_PROC 2 vs 1",
                  "figure": f"{speed['ours']:,} vs {speed['one_process']:,} tokens/s "
                            f"({ratios['ours_vs_one_process']}x)",
                  "target": f">= {targets['ours_vs_one_process']}x", "met": met["ours_vs_one_process"]}
                 ] if "one_process" in speed else []  # (measured since pretokenize has NUM_PROC processes)
    return processes + [
        {"benchmark": "pretokenize throughput vs the original method",
         "figure": f"{speed['ours']:,} vs {speed['original']:,} tokens/s ({ratios['ours_vs_original']}x)",
         "target": f">= {targets['ours_vs_original']}x", "met": met["ours_vs_original"]},
        {"benchmark": "pretokenize throughput vs tokenizer alone",
         "figure": f"{speed['ours']:,} vs {speed['limit']:,} tokens/s ({ratios['ours_vs_limit']}x)",
         "target": f">= {targets['ours_vs_limit']}x", "met": met["ours_vs_limit"]},
    ]


def export_memory_rows(result):
    runs, targets, f_mb = result["runs"], result["targets"], result["file_mb"]
    merge_4, merge_8 = runs["merge_4_files"]["peak_rss_mb"], runs["merge_8_files"]["peak_rss_mb"]
    check_4, check_8 = runs["check_4_files"], runs["check_8_files"]
    return [
        {"benchmark": f"export merge peak RSS, 4 -> 8 files of {f_mb} MB",
         "figure": f"{merge_4:.0f} -> {merge_8:.0f} MB",
         "target": "8 files within 1.15x of 4", "met": targets["merge_8_within_1.15x_of_4"]},
        {"benchmark": f"export merge peak RSS vs 2F + 1 GB (F = {f_mb} MB)",
         "figure": f"{max(merge_4, merge_8):.0f} MB vs {2 * f_mb + 1000} MB",
         "target": "at most 2F + 1 GB", "met": targets["merge_at_most_2F_plus_1GB"]},
        {"benchmark": "export logits check peak RSS (CPU: model in bf16), 4 -> 8 files",
         "figure": f"{check_4['peak_rss_mb']:.0f} -> {check_8['peak_rss_mb']:.0f} MB (models of "
                   f"{check_4['model_mb']} -> {check_8['model_mb']} MB)",
         "target": "-", "met": None},
    ]


def gpu_train_rows(result):
    """Figures only: gpu_train measures, it sets no target."""
    gpu = result.get("machine", {}).get("gpu", "GPU")

    def figure(run):
        if "tokens_per_second" not in run:
            return run.get("skipped") or f"error: {run.get('error')}"
        mfu = "MFU -" if run["mfu"] is None else f"MFU {run['mfu']:.1%}"
        return (f"{run['tokens_per_second']:,} tokens/s ({run['seconds_per_step']} s a step of "
                f"{run['tokens_per_step']:,} tokens"
                + (f", {run['fixed_seconds_per_step']} s of it fixed" if "fixed_seconds_per_step" in run else "")
                + f"), peak {run['peak_memory_gib']} GiB, {mfu}"
                + (f" (HFU {run['hfu']:.1%})" if "hfu" in run else "")
                + (f", {run['distinct_shapes']} batch shapes, {run['attention']}" if "attention" in run else "")
                + f", FineTome-100k epoch {run['finetome_epoch_minutes']} min")

    return [{"benchmark": f"train {name} on {gpu}", "figure": figure(run), "target": "-", "met": None}
            for name, run in result["runs"].items()]


def node_disk_rows(result):
    one, two = (result["runs"][f"{n}_a_node"] for n in (1, 2))

    def peaks(run):
        return " / ".join(f"{run['work_dir_peak_bytes'][node] / 2**20:.1f}"
                          for node in sorted(run["work_dir_peak_bytes"]))

    return [{"benchmark": f"a node's scratch-disk peak, 1 -> 2 training processes a node "
                          f"(2 nodes, {result['rows']:,} rows in shards of {result['shard_size']:,})",
             "figure": f"{peaks(one)} -> {peaks(two)} MiB (node 0 / node 1; a model-ready shard "
                       f"{one['model_ready_bytes'] / len(one['sequences_a_shard']) / 2**20:.2f} MiB, "
                       f"fused/ {one['fused_bytes'] / 2**20:.1f} MiB)",
             "target": f"2 within {result['target']}x of 1", "met": result["met"]}]


ROWS = {"import_memory": import_memory_rows, "import_throughput": import_throughput_rows,
        "pretokenize_throughput": pretokenize_rows, "gpu_train": gpu_train_rows,
        "export_memory": export_memory_rows, "node_disk": node_disk_rows}

if __name__ == "__main__":
    main()
