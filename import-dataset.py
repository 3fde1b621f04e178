"""Step 1: stream a dataset into the bucket as Parquet shards, raw, then standardized.

    raw/<DATASET_NAME>/shard-NNNNN.parquet           the source's rows, unchanged
    standardized/<DATASET_NAME>/shard-NNNNN.parquet  conversations, tools, source_row (below)
    standardized/<DATASET_NAME>/_rejected/...        every dropped or altered row, with its reason

A standardized row: `conversations`, a list of turns {role (system, user, assistant or tool),
content, weight (1: an assistant turn trained on; 0: context), tool_calls (the assistant's
calls, JSON text, or null), tool_call_id (the call a tool turn answers, or null)}; `tools`, the
functions the conversation may call (JSON text, or null); `source_row`, its raw row's number.

The source is streamed: memory is set by one row group, never by the shard or the
dataset. Shards are committed one by one; a rerun continues after the last one.
"""

import contextlib
import inspect
import json
import os

os.environ.setdefault("USE_TORCH", "0")  # datasets would import torch (250 MB) for nothing here

from common import (MAX_REJECT_SETTING, Setting, UserError, abort_stale_uploads, fingerprint,
                    hub_errors, in_order, log, manifest_fingerprint, open_bucket, parquet_writer,
                    parse_settings, raw_prefix, read_manifest, read_row_groups, resume_or_start,
                    row_group_sizes, run, sha256_file, shard_name, standardized_prefix,
                    with_rebuild, write_manifest)

FORMATS = ("auto", "sharegpt", "openai", "alpaca", "prompt_completion")
SETTINGS = [
    Setting("DATASET_NAME", help="name of the dataset in bucket paths, e.g. mlabonne/FineTome-100k",
            required=True),
    Setting("DATASET_SOURCE", help="Hub id, local file/directory/glob of json, jsonl, parquet or "
            "csv, or s3:// URL of such files (default: DATASET_NAME)"),
    Setting("DATASET_CONFIG", help="Hub dataset configuration"),
    Setting("DATASET_SPLIT", "train", "split to import"),
    Setting("DATASET_REVISION", help="Hub branch, tag or commit (pinned to the commit it resolves to)"),
    Setting("HF_TOKEN", help="Hugging Face token, for gated or private datasets", secret=True),
    Setting("SHARD_SIZE", 5_000_000, "rows per shard", int, minimum=1),
    Setting("FORMAT", "auto", "source format (auto: told from the columns)", choices=FORMATS),
    MAX_REJECT_SETTING,
    Setting("NUM_PROC", os.cpu_count(), "CPU cores to standardize with", int, minimum=1),
]
ROW_GROUP_ROWS = 2_000  # rows held in memory at once, and rows per Parquet row group
FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class Rejected(Exception):
    """A row that cannot become a training conversation; the message is the reason."""


def main():
    settings = parse_settings(__doc__, SETTINGS)
    bucket = open_bucket(settings)
    for prefix in (raw_prefix(settings.dataset_name), standardized_prefix(settings.dataset_name)):
        abort_stale_uploads(bucket, prefix)
    previous = read_manifest(bucket, raw_prefix(settings.dataset_name))
    source = Source(settings, bucket, previous and previous["inputs"])
    raw = import_raw(settings, bucket, source)
    standardize(settings, bucket, raw)


# ---------------------------------------------------------------- the source


class Source:
    """What to stream: files, each known by its content (an s3:// object by its ETag, a local
    file by its sha256), or a Hub split pinned to a commit.

    A Hub source reuses the commit recorded by an earlier import of the same split, so a
    resumed or finished import needs neither the Hub nor the dataset to still be there."""

    def __init__(self, settings, bucket, previous_inputs):
        self.settings, self.bucket = settings, bucket
        self.name = settings.dataset_source or settings.dataset_name
        if self.name.startswith("s3://"):
            pattern = self.name[len("s3://"):].rstrip("/")
            found = bucket.fs.glob(pattern if _has_ext(pattern) else pattern + "/**", detail=True)
            files = [{"path": "s3://" + f, "size": info["size"], "etag": info["ETag"].strip('"')}
                     for f, info in sorted(found.items()) if info["type"] == "file" and _has_ext(f)]
        elif os.path.exists(self.name) or any(c in self.name for c in "*?[") \
                or _looks_like_path(self.name):
            files = [{"path": f, "size": os.path.getsize(f), "sha256": sha256_file(f)}
                     for f in sorted(_local_files(self.name))]
        else:
            self.files = None
            self.inputs = {"source": self.name, "config": settings.dataset_config,
                           "split": settings.dataset_split}
            previous = {k: v for k, v in (previous_inputs or {}).items() if k in self.inputs}
            revision = settings.dataset_revision
            if revision is None and previous == self.inputs:
                revision = previous_inputs["revision"]
            elif revision is None or len(revision) != 40:
                revision = resolve_hub_revision(self.name, revision)
            self.inputs["revision"] = revision
            return
        self.files = [f["path"] for f in files]
        if not self.files:
            raise UserError(f"no json, jsonl, parquet or csv files at {self.name}: fix DATASET_SOURCE")
        self.kinds = {FILE_TYPES[_has_ext(f)] for f in self.files}
        if len(self.kinds) > 1:
            raise UserError(f"{self.name} mixes file types ({', '.join(sorted(self.kinds))}): "
                            "point DATASET_SOURCE at one kind")
        self.inputs = {"source": self.name, "files": files}

    def stream(self):
        """The split as a datasets IterableDataset (nothing is downloaded up front)."""
        import datasets

        if self.files is None:
            return datasets.load_dataset(self.name, self.settings.dataset_config,
                                         split=self.settings.dataset_split,
                                         revision=self.inputs["revision"], streaming=True,
                                         token=os.environ.get("HF_TOKEN") or None)
        options = self.bucket.storage_options if self.files[0].startswith("s3://") else None
        return datasets.load_dataset(next(iter(self.kinds)), data_files=self.files, split="train",
                                     streaming=True, storage_options=options)


def resolve_hub_revision(repo_id, revision):
    from huggingface_hub import HfApi

    with hub_errors("dataset", repo_id, revision):
        return HfApi(token=os.environ.get("HF_TOKEN") or None).dataset_info(
            repo_id, revision=revision).sha


def _has_ext(path):
    ext = os.path.splitext(path)[1].lower()
    return ext if ext in FILE_TYPES else None


def _looks_like_path(name):
    return name.startswith(("/", "./", "../", "~", "file://")) or _has_ext(name)


def _local_files(name):
    import glob

    name = os.path.expanduser(name.removeprefix("file://"))
    if os.path.isdir(name):
        return [f for f in glob.glob(f"{name}/**/*", recursive=True) if _has_ext(f)]
    files = [f for f in glob.glob(name) if _has_ext(f)]
    if not files and not os.path.exists(name):
        raise UserError(f"no such file: {name}: fix DATASET_SOURCE")
    return files


# ---------------------------------------------------------------- raw copy


def import_raw(settings, bucket, source):
    """Copy the source into raw shards of SHARD_SIZE rows; resume after the last committed one."""
    from tqdm import tqdm

    prefix = raw_prefix(settings.dataset_name)
    inputs = with_rebuild({"step": "raw/1", **source.inputs, "shard_size": settings.shard_size},
                          settings, "import-dataset")
    manifest = resume_or_start(bucket, prefix, inputs, settings.force)
    if manifest["complete"]:
        log(f"{bucket.url(prefix)} is complete ({manifest['rows']} rows): nothing to do")
        return manifest
    stream = source.stream().with_format("arrow")  # batches as Arrow tables, no Python rows
    resume = manifest.get("resume") or {"state": None, "skip": 0}
    if resume["state"] is not None:
        stream.load_state_dict(resume["state"])
        log(f"resuming {bucket.url(prefix)} after {len(manifest['shards'])} shards "
            f"({manifest['rows']} rows)")

    def commit(rows):
        manifest["shards"].append({"path": shard_name(len(manifest["shards"])), "rows": rows})
        manifest["rows"] += rows
        manifest["resume"] = dict(resume)
        write_manifest(bucket, prefix, manifest)
        log(f"raw shard {manifest['shards'][-1]['path']}: {rows} rows committed")

    progress = tqdm(desc="raw", unit=" rows", initial=manifest["rows"], dynamic_ncols=True)
    shard = contextlib.ExitStack()
    writer, rows = None, 0
    batches = stream.iter(batch_size=ROW_GROUP_ROWS)
    while True:
        # The resume point of a shard boundary inside a batch is: the stream's state before
        # the batch, plus how many of the batch's rows are already in committed shards.
        resume = {"state": stream.state_dict(), "skip": resume["skip"]}
        table = next(batches, None)
        if table is None:
            break
        table = table.slice(resume["skip"])
        while table.num_rows:
            if writer is None:
                key = f"{prefix}/{shard_name(len(manifest['shards']))}"
                writer = shard.enter_context(parquet_writer(bucket, key, table.schema))
            take = min(table.num_rows, settings.shard_size - rows)
            writer.write_table(same_schema(table.slice(0, take), writer.schema, manifest["rows"] + rows))
            table, rows, resume["skip"] = table.slice(take), rows + take, resume["skip"] + take
            progress.update(take)
            if rows == settings.shard_size:
                shard.close()
                commit(rows)
                writer, rows = None, 0
        resume["skip"] = 0
    if writer is not None:
        shard.close()
        commit(rows)
    progress.close()
    if manifest["rows"] == 0:
        raise UserError(f"{source.name} has no rows: check DATASET_SOURCE and "
                        "DATASET_SPLIT")
    manifest["complete"] = True
    del manifest["resume"]
    write_manifest(bucket, prefix, manifest)
    log(f"{bucket.url(prefix)} complete: {manifest['rows']} rows in {len(manifest['shards'])} shards")
    return manifest


def same_schema(table, schema, first_row):
    """Batches of a JSON source may type a column differently (an all-null batch, say)."""
    if table.schema.equals(schema, check_metadata=False):
        return table
    try:
        return table.cast(schema)
    except Exception:  # noqa: BLE001 - pyarrow raises several kinds here
        raise UserError(f"the source's columns change type near row {first_row} "
                        f"({table.schema} vs {schema}): give it one schema, e.g. convert it "
                        "to Parquet") from None


# ---------------------------------------------------------------- standardization


ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant", "function_call": "assistant",
    "observation": "tool", "tool": "tool", "function": "tool",
    "developer": "system",
}


def detect_format(columns):
    if "conversations" in columns or "conversation" in columns:
        return "sharegpt"
    if "messages" in columns:
        return "openai"
    if "instruction" in columns and ("output" in columns or "response" in columns):
        return "alpaca"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    raise UserError(f"cannot tell the chat format from the columns {sorted(columns)}: set FORMAT "
                    f"({', '.join(FORMATS[1:])}) or extend to_conversation() in import-dataset.py")


def to_conversation(row, fmt):
    """One source row as turns {role, content, ...}. Edit this to teach the bundle a new format."""
    if fmt == "sharegpt":
        turns = [{**t, "role": t.get("from", t.get("role")), "content": t.get("value", t.get("content"))}
                 for t in messages_of(row.get("conversations") or row.get("conversation"))]
    elif fmt == "openai":
        turns = [{**m, "content": text_of(m.get("content"))} for m in messages_of(row.get("messages"))]
    elif fmt == "alpaca":
        prompt, extra = row.get("instruction"), row.get("input")
        if isinstance(prompt, str) and isinstance(extra, str) and extra:
            prompt = f"{prompt}\n\n{extra}"
        turns = [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": row.get("output", row.get("response"))}]
    else:  # prompt_completion: each side a string or a list of messages
        turns = as_turns(row.get("prompt"), "user") + as_turns(row.get("completion"), "assistant")
    if row.get("system") and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, {"role": "system", "content": row["system"]})
    return turns


def as_turns(value, role):
    if isinstance(value, list):
        return [{**m, "content": text_of(m.get("content"))} for m in messages_of(value)]
    return [{"role": role, "content": value}]


def messages_of(value):
    """A row's messages, each a dict. A JSON source whose messages differ in shape (tool calls,
    weights, nulls) comes back from the raw shard with each message as JSON text."""
    value = from_json(value)
    if value is None:
        return []
    if not isinstance(value, list):
        raise Rejected("messages are not a list")
    found = [from_json(m) for m in value]
    if not all(isinstance(m, dict) for m in found):
        raise Rejected("a message is not an object")
    return found


def from_json(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def text_of(content):
    """OpenAI content is a string or a list of typed parts; only text parts are supported."""
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise Rejected("non-text content part")
        return "".join(p.get("text") or "" for p in content)
    return content


def without_nulls(value):
    """Objects without their null members: where a column of objects is stored as a struct,
    Parquet gives every row every key seen in any row, absent ones as null."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def tool_calls_of(value):
    """Assistant tool calls as the chat templates take them, JSON text: [{type, function:
    {name, arguments}, id?}], the arguments an object (OpenAI's files hold them as JSON text)."""
    value = from_json(value)
    if not value:
        return None
    if not isinstance(value, list):
        raise Rejected("tool_calls is not a list")
    calls = []
    for call in map(from_json, value):
        function = from_json(call.get("function", call)) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise Rejected("a tool call without a function name")
        arguments = without_nulls(from_json(function.get("arguments") or {}))
        if not isinstance(arguments, dict):
            raise Rejected("tool call arguments that are not a JSON object")
        calls.append(({"id": call["id"]} if isinstance(call.get("id"), str) else {})
                     | {"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return json.dumps(calls)


def clean(turns, tools=None):
    """Map roles, remove empty turns and turns after the last answer; reject what can't train.

    Returns the conversation, the tools it may call (JSON text) and the list of changes beyond
    renaming roles. An assistant turn is trained unless its `weight` is 0 (OpenAI's files):
    then it is context, as the other roles are."""
    conversation, changes = [], []
    for turn in turns:
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise Rejected(f"unknown role {role!r}")
        role = ROLES[role]
        if content is not None and not isinstance(content, str):
            raise Rejected("non-text value")
        calls = tool_calls_of(turn.get("tool_calls"))
        if calls and role != "assistant":
            raise Rejected(f"tool calls in a {role} turn")
        weight = turn.get("weight")
        if weight not in (None, 0, 1):
            raise Rejected(f"weight {weight!r}, not 0 or 1")
        if weight is not None and role != "assistant":
            changes.append(f"weight of a {role} turn ignored")
        if not calls and (not content or not content.strip()):
            changes.append("empty turn removed")
            continue
        call_id = turn.get("tool_call_id")
        conversation.append({"role": role, "content": content or "",
                             "weight": int(role == "assistant" and weight != 0), "tool_calls": calls,
                             "tool_call_id": call_id if isinstance(call_id, str) else None})
    answered = [i for i, turn in enumerate(conversation) if turn["role"] == "assistant"]
    if not answered:
        raise Rejected("no assistant answer")
    if not any(conversation[i]["weight"] for i in answered):
        raise Rejected("every assistant answer has weight 0")
    if answered[-1] < len(conversation) - 1:
        conversation = conversation[:answered[-1] + 1]
        changes.append("turns after the last answer removed")
    tools = without_nulls(from_json(tools))
    if tools and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise Rejected("tools is not a list of objects")
    return conversation, json.dumps(tools) if tools else None, sorted(set(changes))


def standardized_row(row, fmt):
    """A source row standardized: (conversation, tools, changes), or Rejected with the reason.
    A shape no rule foresaw is rejected with what went wrong rather than ending the import."""
    try:
        return clean(to_conversation(row, fmt), row.get("tools"))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise Rejected(f"cannot convert the row ({type(e).__name__}: {e}): edit "
                       "to_conversation() in import-dataset.py") from None


def standardized_schema():
    import pyarrow as pa

    turn = pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.int8()),
                      ("tool_calls", pa.string()), ("tool_call_id", pa.string())])
    return pa.schema([("conversations", pa.list_(turn)), ("tools", pa.string()),
                      ("source_row", pa.int64())])


def standardize(settings, bucket, raw):
    """Standardize each raw shard into the shard of the same number, listing every reject.

    The raw shards are read row group by row group; the row groups are standardized in NUM_PROC
    processes and written back in order: the same bytes whatever NUM_PROC."""
    prefix = standardized_prefix(settings.dataset_name)
    code = [inspect.getsource(f) for f in (to_conversation, as_turns, messages_of, from_json,
                                           text_of, without_nulls, tool_calls_of, clean,
                                           standardized_row)]
    inputs = with_rebuild({"step": "standardized/2", "raw_manifest": manifest_fingerprint(raw),
                           "format": settings.format, "code": fingerprint([code, ROLES])},
                          settings, "import-dataset")
    manifest = resume_or_start(bucket, prefix, inputs, settings.force)
    if manifest["complete"]:
        log(f"{bucket.url(prefix)} is complete ({manifest['rows']} rows): nothing to do")
        return manifest
    todo = range(len(manifest["shards"]), len(raw["shards"]))
    keys = {index: f"{raw_prefix(settings.dataset_name)}/{raw['shards'][index]['path']}"
            for index in todo}
    sizes = {index: row_group_sizes(bucket, keys[index]) for index in todo}

    def row_groups():
        source_row = sum(shard["rows"] for shard in raw["shards"][:len(manifest["shards"])])
        for index in todo:
            for table in read_row_groups(bucket, keys[index]):
                yield table, source_row, settings.format
                source_row += table.num_rows

    workers = min(settings.num_proc, sum(map(len, sizes.values())))
    with contextlib.closing(in_order(standardize_rows, row_groups(), workers,
                                     preload=["pyarrow"])) as results:
        for index in todo:
            entry = {"path": shard_name(index), "rejected": f"_rejected/{shard_name(index, 'jsonl')}",
                     "rows": 0, "dropped": {}, "altered": {}}
            with parquet_writer(bucket, f"{prefix}/{entry['path']}", standardized_schema()) as writer, \
                    bucket.writer(f"{prefix}/{entry['rejected']}") as rejected:
                for _ in sizes[index]:
                    kept, rejected_lines, counts = next(results)
                    writer.write_table(kept)
                    rejected.write(rejected_lines)
                    entry["rows"] += kept.num_rows
                    for action in ("dropped", "altered"):
                        for change, count in counts[action].items():
                            entry[action][change] = entry[action].get(change, 0) + count
            manifest["shards"].append(entry)
            manifest["rows"] += entry["rows"]
            write_manifest(bucket, prefix, manifest)
            log(f"standardized shard {entry['path']}: {entry['rows']} rows kept, "
                f"{sum(entry['dropped'].values())} dropped, {sum(entry['altered'].values())} altered")

    dropped = {}
    for entry in manifest["shards"]:
        for reason, count in entry["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + count
    total_dropped = raw["rows"] - manifest["rows"]
    manifest["dropped"] = dropped
    if total_dropped > settings.max_reject_fraction * raw["rows"]:
        top = ", ".join(f"{reason} ({count})" for reason, count in
                        sorted(dropped.items(), key=lambda kv: -kv[1])[:3])
        raise UserError(f"{total_dropped} of {raw['rows']} rows dropped, more than "
                        f"MAX_REJECT_FRACTION={settings.max_reject_fraction}: {top}; the list is in "
                        f"{bucket.url(prefix)}/_rejected/ (set FORMAT, fix the source or edit "
                        "to_conversation() in import-dataset.py)")
    manifest["complete"] = True
    write_manifest(bucket, prefix, manifest)
    log(f"{bucket.url(prefix)} complete: {manifest['rows']} of {raw['rows']} rows kept, "
        f"{total_dropped} dropped (listed in _rejected/)")
    return manifest


def standardize_rows(task):
    """One row group of a raw shard (its first row's number, the FORMAT), in a worker process:
    the rows kept as a table, the lines of the rejected list, and how many rows each change
    dropped or altered."""
    import pyarrow as pa

    table, source_row, fmt = task
    if fmt == "auto":
        fmt = detect_format(table.column_names)
    kept = {"conversations": [], "tools": [], "source_row": []}
    lines, counts = [], {"dropped": {}, "altered": {}}
    for row in table.to_pylist():
        try:
            conversation, tools, changes = standardized_row(row, fmt)
        except Rejected as reason:
            changes, conversation = [str(reason)], None
        action = "dropped" if conversation is None else "altered"
        for change in changes:
            counts[action][change] = counts[action].get(change, 0) + 1
        if changes:
            lines.append(json.dumps({"source_row": source_row, "action": action,
                                     "reasons": changes}).encode() + b"\n")
        if conversation is not None:
            kept["conversations"].append(conversation)
            kept["tools"].append(tools)
            kept["source_row"].append(source_row)
        source_row += 1
    return pa.Table.from_pydict(kept, schema=standardized_schema()), b"".join(lines), counts


if __name__ == "__main__":
    run(main)
