"""Step 3: render each conversation with the model's chat template, tokenize it, and label
it so that training learns the assistant's answers only.

    model-ready/<MODEL_NAME>/<DATASET_NAME>/<INPUTS>/shard-NNNNN/part-NNNNN.parquet
        each standardized shard in parts of whole row groups (PART_SIZE rows or more):
        input_ids, labels (list<int32>), source_row (int64), length (int32, the tokens of the
        row). labels are -100 except on each assistant answer and the end-of-turn token that
        closes it (<|im_end|> for Qwen), so the model learns to answer and to stop; system and
        user turns and the template's scaffolding are never trained
    .../_eval/shard-NNNNN/part-NNNNN.parquet  the EVAL_ROWS rows held out for evaluation (the
        same columns), never trained on; a part that holds none has no such file
    .../_dropped/shard-NNNNN/part-NNNNN.jsonl every row dropped, with its source_row and reason
    .../_parts/shard-NNNNN/part-NNNNN.json    a finished part's statistics and inputs
    .../_manifest.json     written by whichever node finds every part finished: each shard with
        its parts, the eval files, the end-of-turn text, the totals

<INPUTS> is 12 hex digits of the fingerprint of what the output is made from (the data, the
tokenizer, the data settings: common.model_ready_inputs): the data of other settings sits
beside it, and dotrain.py finds it by the same settings.

The tokenizer comes from the bucket's copy of the model (import-model.py), never from the Hub.
Rows longer than MAX_SEQ_LENGTH tokens are truncated and counted; rows left without a trained
token, or that the chat template refuses, are dropped and listed. More than MAX_REJECT_FRACTION
of the rows dropped (held-out ones included) fails the step before the manifest: the output is
not complete, and a rerun with a higher limit completes it from the parts on record, tokenizing
nothing again. EVAL_ROWS rows (at most a tenth of the dataset), spread evenly over the whole
dataset by their position among the standardized rows, are held out. Row groups are rendered
and tokenized by NUM_PROC worker processes (this one reads and writes) and written in order. On
several SkyPilot nodes, node SKYPILOT_NODE_RANK takes every SKYPILOT_NUM_NODES-th part of all
the shards' parts; each part is committed on its own, so a rerun continues where it stopped and
a finished run writes nothing. The output is the same bytes whatever NUM_PROC and the number of
nodes.
"""

import contextlib
import functools
import json
import os

from common import (DATA_SETTINGS, MAX_REJECT_SETTING, MODEL_CACHE_SETTING, NOT_TRAINED, Conflict,
                    Setting, UserError, abort_stale_uploads, download_model, end_of_turn,
                    in_order, load_chat_tokenizer, log, model_prefix, model_ready_inputs,
                    model_ready_prefix, open_bucket, parquet_writer, parse_settings,
                    read_manifest, read_row_groups, require_complete, row_group_sizes, run,
                    same_inputs, short, standardized_prefix, with_rebuild, write_manifest)

SETTINGS = [
    Setting("MODEL_NAME", help="the model whose tokenizer and template to use, as imported by "
            "import-model.py, e.g. Qwen/Qwen2.5-0.5B", required=True),
    Setting("DATASET_NAME", help="the dataset to tokenize, as imported by import-dataset.py",
            required=True),
    *DATA_SETTINGS,
    MAX_REJECT_SETTING,
    Setting("NUM_PROC", os.cpu_count(), "CPU cores to render and tokenize with (worker "
            "processes)", int, minimum=1),
    MODEL_CACHE_SETTING,
    Setting("SKYPILOT_NODE_RANK", 0, "this node's number (set by SkyPilot)", int, minimum=0),
    Setting("SKYPILOT_NUM_NODES", 1, "how many nodes share the work (set by SkyPilot)", int,
            minimum=1),
]
ANSWER_MARK = "\ue000"  # a private-use character, placed around each answer in a second rendering
# What AutoTokenizer imports (torch with it): imported once, in the workers' fork server.
TOKENIZER_MODULE = "transformers.models.auto.tokenization_auto"
COUNTS = ("rows", "tokens", "trained_tokens", "truncated", "dropped", "eval_rows", "eval_tokens",
          "eval_truncated", "eval_dropped")


def main():
    settings = parse_settings(__doc__, SETTINGS)
    # Each process tokenizes on one core: NUM_PROC processes use NUM_PROC cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    bucket = open_bucket(settings)
    standardized = require_complete(bucket, standardized_prefix(settings.dataset_name),
                                    "import-dataset.py")
    model = require_complete(bucket, model_prefix(settings.model_name), "import-model.py")
    made_from = model_ready_inputs(settings, standardized, model)
    prefix = model_ready_prefix(settings.model_name, settings.dataset_name, made_from)
    # (as it reads back from markers and manifest)
    inputs = json.loads(json.dumps(with_rebuild(made_from, settings, "pretokenize")))
    eval_rows = min(settings.eval_rows, standardized["rows"] // 10)
    if eval_rows < settings.eval_rows:
        log(f"EVAL_ROWS={settings.eval_rows} is more than a tenth of the dataset's "
            f"{standardized['rows']} rows: holding out {eval_rows}")
    if finished(bucket, prefix, inputs):
        return
    parts = list_parts(bucket, settings.dataset_name, standardized, settings.part_size)
    mine = parts[settings.skypilot_node_rank::settings.skypilot_num_nodes]
    todo = [part for part in mine if not part_done(bucket, prefix, part, inputs)]
    my_objects = {name for part in mine for name in objects_of(part)}
    abort_stale_uploads(bucket, prefix, lambda name: name in my_objects)
    log(f"node {settings.skypilot_node_rank} of {settings.skypilot_num_nodes}: {len(todo)} of "
        f"{len(mine)} parts to tokenize ({len(parts)} parts in all)")
    if todo:
        job = {"model_dir": download_model(bucket, settings.model_name, settings.model_cache_dir),
               "chat_template": settings.chat_template, "max_seq_length": settings.max_seq_length,
               "eval_rows": eval_rows, "dataset_rows": standardized["rows"]}

        def row_groups():
            for part in todo:
                groups = [group for group, _ in part["groups"]]
                for table, (_, first_row) in zip(read_row_groups(bucket, part["source"], groups),
                                                 part["groups"]):
                    yield job, table, first_row

        workers = min(settings.num_proc, sum(len(part["groups"]) for part in todo))
        with contextlib.closing(in_order(tokenize_row_group, row_groups(), workers,
                                         preload=[TOKENIZER_MODULE])) as results:
            for part in todo:
                write_part(bucket, prefix, part, results, inputs)
    write_manifest_if_all_done(bucket, prefix, inputs, parts, settings.max_reject_fraction)


def list_parts(bucket, dataset, standardized, part_size):
    """Every part of every standardized shard, in order: whole row groups, a part ending once it
    holds part_size rows or more. Parts depend on the data and PART_SIZE alone, never on the
    number of nodes. Each lists its row groups with the dataset-wide position of their first row
    (which rows are held out for evaluation)."""
    parts, first_row = [], 0
    for index, shard in enumerate(standardized["shards"]):
        source = f"{standardized_prefix(dataset)}/{shard['path']}"
        sizes = row_group_sizes(bucket, source)
        if sum(sizes) != shard["rows"]:
            raise UserError(f"{bucket.url(source)} holds {sum(sizes)} rows but its manifest says "
                            f"{shard['rows']}: it was damaged or replaced; rerun with "
                            "REBUILD=import-dataset")
        groups, rows = [[]], 0  # each part's row groups; the rows of the last part
        for group, size in enumerate(sizes):
            if rows >= part_size:
                groups.append([])
                rows = 0
            groups[-1].append((group, first_row))
            first_row, rows = first_row + size, rows + size
        parts += [{"shard": f"shard-{index:05d}", "name": f"shard-{index:05d}/part-{number:05d}",
                   "source": source, "groups": part_groups}
                  for number, part_groups in enumerate(groups)]
    return parts


def held_out(row, eval_rows, rows):
    """Whether row number `row` of the dataset's `rows` standardized rows is held out for
    evaluation: eval_rows of them, spread evenly."""
    return (row + 1) * eval_rows // rows > row * eval_rows // rows


# ---------------------------------------------------------------- progress in the bucket


def finished(bucket, prefix, inputs):
    """Whether the output is complete from these inputs. The folder is named by the inputs, so
    an output there from others differs by a rebuild mark alone (REBUILD): its manifest goes
    (only the manifest: other nodes may already be writing their new parts; each node replaces
    its own)."""
    manifest = read_manifest(bucket, prefix)
    if manifest is None:
        return False
    if not same_inputs(manifest["inputs"], inputs):
        log(f"rebuilding {bucket.url(prefix)}")
        bucket.fs.rm(bucket.path(f"{prefix}/_manifest.json"))
        return False
    if manifest["complete"]:
        log(f"{bucket.url(prefix)} is complete ({manifest['rows']} rows, {manifest['tokens']} "
            "tokens): nothing to do")
        return True
    return False


def objects_of(part):
    """The names, under the output prefix, of what a part writes."""
    name = part["name"]
    return (f"{name}.parquet", f"_eval/{name}.parquet", f"_dropped/{name}.jsonl",
            f"_parts/{name}.json")


def read_marker(bucket, prefix, part):
    data = bucket.get(f"{prefix}/_parts/{part['name']}.json")
    return None if data is None else json.loads(data)


def part_done(bucket, prefix, part, inputs):
    """Whether a part was finished from these inputs (one from others, before a REBUILD, is
    made again)."""
    marker = read_marker(bucket, prefix, part)
    return marker is not None and same_inputs(marker["inputs"], inputs)


def write_manifest_if_all_done(bucket, prefix, inputs, parts, max_reject_fraction):
    """The node that finds every part finished writes the manifest, unless more rows were dropped
    than MAX_REJECT_FRACTION allows; one write wins. The limit is not an input: it changes no
    part, so a rerun with a higher one writes the manifest from the parts as they are."""
    markers = [read_marker(bucket, prefix, part) for part in parts]
    done = [m for m in markers if m is not None and same_inputs(m["inputs"], inputs)]
    if len(done) < len(parts):
        log(f"{len(done)} of {len(parts)} parts finished: the node that finishes the last one "
            "writes the manifest")
        return
    shards = {}
    for marker in done:
        shard = shards.setdefault(marker["shard"], {"path": marker["shard"], "rows": 0, "tokens": 0,
                                                    "trained_tokens": 0, "truncated": 0,
                                                    "dropped": 0, "dropped_reasons": {}, "parts": []})
        for key in ("rows", "tokens", "trained_tokens", "truncated", "dropped"):
            shard[key] += marker[key]
        for reason, count in marker["dropped_reasons"].items():
            shard["dropped_reasons"][reason] = shard["dropped_reasons"].get(reason, 0) + count
        shard["parts"].append({"path": marker["path"], "rows": marker["rows"],
                               "tokens": marker["tokens"]})
    totals = {key: sum(marker[key] for marker in done) for key in COUNTS}
    refuse_too_many_dropped(bucket, prefix, totals, shards.values(), max_reject_fraction)
    if totals["rows"] == 0:
        raise UserError(f"every row was dropped (the reasons are in {bucket.url(prefix)}/"
                        "_dropped/): raise MAX_SEQ_LENGTH, or check the chat template")
    manifest = {"complete": True, "inputs": inputs, "shards": list(shards.values()), **totals,
                "eval": [marker["eval"] for marker in done if marker["eval"]],
                "end_of_turn": done[0]["end_of_turn"], "max_seq_length": inputs["max_seq_length"]}
    try:
        write_manifest(bucket, prefix, manifest, if_none_match=True)
    except Conflict:
        log("another node wrote the manifest")
        return
    log(f"{bucket.url(prefix)} complete: {totals['rows']} rows, {totals['tokens']} tokens "
        f"({totals['trained_tokens']} trained), {totals['truncated']} truncated, "
        f"{totals['dropped']} dropped (listed in _dropped/), {totals['eval_rows']} held out for "
        "evaluation")


def refuse_too_many_dropped(bucket, prefix, totals, shards, max_reject_fraction):
    """Fail, naming the reasons, when more than the allowed fraction of all rows (training and
    held out) was dropped."""
    every_row = totals["rows"] + totals["eval_rows"] + totals["dropped"]
    if totals["dropped"] <= max_reject_fraction * every_row:
        return
    reasons = {}
    for shard in shards:
        for reason, count in shard["dropped_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    top = sorted(reasons.items(), key=lambda kv: -kv[1])
    listed = ", ".join(f"{count:,} '{short(reason)}'" for reason, count in top[:3])
    if len(top) > 3:
        listed += f" and {len(top) - 3} other reasons"
    raise UserError(f"pretokenize dropped {totals['dropped']:,} of {every_row:,} rows "
                    f"({totals['dropped'] / every_row:.1%}), more than MAX_REJECT_FRACTION="
                    f"{max_reject_fraction}: {listed}; the rows and reasons are in "
                    f"{bucket.url(prefix)}/_dropped/: raise MAX_SEQ_LENGTH, fix the template, or "
                    "raise MAX_REJECT_FRACTION")


# ---------------------------------------------------------------- a part


def model_ready_schema():
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                      ("source_row", pa.int64()), ("length", pa.int32())])


def write_part(bucket, prefix, part, results, inputs):
    """Write one part from the results of its row groups, which come in order, then its marker:
    the part is done."""
    name = part["name"]
    stats = {"path": f"{name}.parquet", "shard": part["shard"], "eval": None,
             "dropped_list": f"_dropped/{name}.jsonl", "dropped_reasons": {},
             "end_of_turn": None, **dict.fromkeys(COUNTS, 0)}
    with contextlib.ExitStack() as files:
        writer = files.enter_context(parquet_writer(bucket, f"{prefix}/{stats['path']}",
                                                    model_ready_schema()))
        dropped_list = files.enter_context(bucket.writer(f"{prefix}/{stats['dropped_list']}"))
        eval_writer = None
        for _ in part["groups"]:
            result = next(results)
            if result["train"].num_rows:
                writer.write_table(result["train"])
            if result["eval"].num_rows:
                if eval_writer is None:
                    stats["eval"] = {"path": f"_eval/{name}.parquet", "rows": 0}
                    eval_writer = files.enter_context(parquet_writer(
                        bucket, f"{prefix}/{stats['eval']['path']}", model_ready_schema()))
                eval_writer.write_table(result["eval"])
                stats["eval"]["rows"] += result["eval"].num_rows
            for source_row, reason, held in result["dropped"]:
                dropped_list.write(json.dumps({"source_row": source_row, "reason": reason,
                                               "held_out": held}).encode() + b"\n")
                stats["dropped_reasons"][reason] = stats["dropped_reasons"].get(reason, 0) + 1
            for key in COUNTS:
                stats[key] += result["counts"][key]
            stats["end_of_turn"] = result["end_of_turn"]
    bucket.put(f"{prefix}/_parts/{name}.json", json.dumps({**stats, "inputs": inputs}, indent=1,
                                                         sort_keys=True).encode())
    log(f"part {name}: {stats['rows']} rows, {stats['tokens']} tokens "
        f"({stats['trained_tokens']} trained), {stats['truncated']} truncated, "
        f"{stats['dropped']} dropped, {stats['eval_rows']} held out")


def tokenize_row_group(task):
    """One row group of a standardized shard (and the position of its first row in the dataset),
    in a worker process: its training rows and its held-out rows, each rendered, tokenized and
    labelled, as tables; the rows dropped, in order (source_row, reason, held out); the counts."""
    job, table, first_row = task
    labeller = labeller_in_this_process(job["model_dir"], job["chat_template"],
                                        job["max_seq_length"])
    conversations = [chat_of(turns) for turns in table.column("conversations").to_pylist()]
    source_rows = table.column("source_row").to_pylist()
    tools_text = (table.column("tools").to_pylist() if "tools" in table.column_names
                  else [None] * table.num_rows)
    tools = [text and json.loads(text) for text in tools_text]
    held = [held_out(first_row + i, job["eval_rows"], job["dataset_rows"])
            for i in range(len(source_rows))]
    train, evaluation = (labeller(*([value for value, h in zip(column, held) if h == side]
                                    for column in (conversations, source_rows, tools)))
                         for side in (False, True))
    counts = {"rows": len(train.source_rows), "tokens": train.tokens,
              "trained_tokens": train.trained_tokens, "truncated": train.truncated,
              "dropped": len(train.dropped) + len(evaluation.dropped),
              "eval_rows": len(evaluation.source_rows), "eval_tokens": evaluation.tokens,
              "eval_truncated": evaluation.truncated, "eval_dropped": len(evaluation.dropped)}
    dropped = sorted([(row, reason, False) for row, reason in train.dropped]
                     + [(row, reason, True) for row, reason in evaluation.dropped])
    return {"train": train.table(), "eval": evaluation.table(), "dropped": dropped,
            "counts": counts, "end_of_turn": labeller.end_of_turn}


@functools.cache
def labeller_in_this_process(model_dir, chat_template, max_seq_length):
    return Labeller(load_chat_tokenizer(model_dir, chat_template), max_seq_length)


# ---------------------------------------------------------------- labels


class Rows:
    """A batch's output rows, the rows dropped from it with why, and its counts."""

    def __init__(self):
        self.ids, self.labels, self.source_rows, self.dropped = [], [], [], []
        self.tokens = self.trained_tokens = self.truncated = 0

    def table(self):
        import numpy as np
        import pyarrow as pa

        def list_array(arrays):
            offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
            np.cumsum([len(a) for a in arrays], out=offsets[1:])
            values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))

        return pa.table({"input_ids": list_array(self.ids), "labels": list_array(self.labels),
                         "source_row": pa.array(self.source_rows, pa.int64()),
                         "length": pa.array([len(ids) for ids in self.ids], pa.int32())},
                        schema=model_ready_schema())


def chat_of(turns):
    """A standardized conversation as chat templates take it: tool calls as objects. A turn's
    weight stays (templates ignore it): the labeller trains the assistant turns of weight 1."""
    return [{key: json.loads(value) if key == "tool_calls" else value
             for key, value in turn.items() if value is not None} for turn in turns]


def trained(message):
    return message["role"] == "assistant" and message.get("weight", 1) != 0


class Labeller:
    """Renders conversations, finds each answer in the text, tokenizes, labels, truncates.

    Where the answers are: a template may add text (Qwen's default system prompt), trim or
    drop content, and need not mark the assistant's part ({% generation %}), so the answers
    are located in what the template actually renders. Each batch is rendered twice: as is,
    and with every answer between two ANSWER_MARKs. When removing the marks from the second
    rendering gives exactly the first and the text between them is exactly the answers, the
    marks give each answer's characters. The end-of-turn text (common.end_of_turn) must follow
    each answer. Any other row (a template that transforms content,
    an answer containing the mark, an answer with tool calls) is located by rendering the
    conversation's prefixes up to each answer, which holds for any template that renders a
    conversation's beginning the same way whatever follows; an answer with tool calls is then
    all the turn renders after the generation prompt, and must show each call's name. The
    text is then tokenized once, and a token is trained when any of its characters is an
    answer's or an end-of-turn's. Only answers of weight 1 (the default) are trained."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.backend = tokenizer.backend_tokenizer
        try:
            self.end_of_turn = end_of_turn(tokenizer)
        except Exception as e:  # noqa: BLE001 - jinja raises many kinds
            raise UserError(f"the chat template cannot render a user/assistant exchange ({e}): "
                            "set CHAT_TEMPLATE=chatml or use another model") from None

    def render(self, conversations, add_generation_prompt=False, tools=None):
        return self.tokenizer.apply_chat_template(conversations, tokenize=False, tools=tools,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, conversations, source_rows, tools=None):
        """The Rows of one batch: rendered twice, answers located, tokenized, labelled."""
        if not conversations:
            return Rows()
        tools = tools or [None] * len(conversations)
        texts, reasons = self.render_all(conversations, tools)
        marked = self.render_all([[mark(message) for message in conversation]
                                  for conversation in conversations], tools)[0]
        spans = [None if text is None else
                 self.spans_by_marks(text, marked_text, conversation)
                 or self.spans_by_prefixes(text, conversation, row_tools)
                 for text, marked_text, conversation, row_tools
                 in zip(texts, marked, conversations, tools)]
        located = [i for i, s in enumerate(spans) if s]
        for i, conversation in enumerate(conversations):
            if not spans[i] and reasons[i] is None:
                reasons[i] = ("no answer to train: every one has weight 0" if spans[i] == []
                              else "the chat template does not render tool calls"
                              if any(m.get("tool_calls") for m in conversation) else
                              "answers not found in the rendered conversation")
        encodings = self.backend.encode_batch([texts[i] for i in located], add_special_tokens=False)
        return self.label(source_rows, spans, reasons, located, encodings)

    def label(self, source_rows, spans, reasons, located, encodings):
        import numpy as np

        rows = Rows()
        encodings = dict(zip(located, encodings))
        for i, source_row in enumerate(source_rows):
            if i not in encodings:
                rows.dropped.append((source_row, reasons[i]))
                continue
            encoding = encodings[i]
            ids = np.array(encoding.ids, dtype=np.int32)
            labels = np.full(len(ids), NOT_TRAINED, dtype=np.int32)
            for start, end in spans[i]:
                first, last = token_range(encoding, start, end)
                labels[first:last] = ids[first:last]
            truncated = len(ids) > self.max_length
            ids, labels = ids[:self.max_length], labels[:self.max_length]
            trained = int(np.count_nonzero(labels != NOT_TRAINED))
            if trained == 0:
                rows.dropped.append((source_row, "no trained token within MAX_SEQ_LENGTH"))
                continue
            rows.truncated += truncated
            rows.ids.append(ids)
            rows.labels.append(labels)
            rows.source_rows.append(source_row)
            rows.tokens += len(ids)
            rows.trained_tokens += trained
        return rows

    def render_all(self, conversations, tools):
        """Renderings of a batch, and for a row the template refuses, None and the reason.
        Rows with tools are rendered one by one, each with its own."""
        try:
            if not any(tools):
                return self.render(conversations), [None] * len(conversations)
        except Exception:  # noqa: BLE001 - jinja raises many kinds; find the rows that fail
            pass
        texts, reasons = [], []
        for conversation, row_tools in zip(conversations, tools):
            try:
                texts.append(self.render([conversation], tools=row_tools)[0])
                reasons.append(None)
            except Exception as e:  # noqa: BLE001
                texts.append(None)
                reasons.append(f"chat template error: {e}")
        return texts, reasons

    def spans_by_marks(self, text, marked, conversation):
        answers = [m for m in conversation if trained(m)]
        if any(m.get("tool_calls") for m in answers):
            return None
        parts = (marked or "").split(ANSWER_MARK)
        if len(parts) != 2 * len(answers) + 1 or parts[1::2] != [m["content"] for m in answers] \
                or "".join(parts) != text:
            return None
        spans, position = [], 0
        for i, part in enumerate(parts):
            if i % 2:
                if not text.startswith(self.end_of_turn, position + len(part)):
                    return None
                spans.append((position, position + len(part) + len(self.end_of_turn)))
            position += len(part)
        return spans

    def spans_by_prefixes(self, text, conversation, tools=None):
        spans = []
        for k, message in enumerate(conversation):
            if not trained(message):
                continue
            try:
                head = self.render([conversation[:k]], add_generation_prompt=True, tools=tools)[0] \
                    if k else ""
                through = self.render([conversation[:k + 1]], tools=tools)[0]
            except Exception:  # noqa: BLE001
                return None
            if not (text.startswith(head) and text.startswith(through)):
                return None
            turn = text[len(head):len(through)]
            if message.get("tool_calls"):
                if not all(call["function"]["name"] in turn for call in message["tool_calls"]):
                    return None
                spans.append((len(head), len(head) + len(turn.rstrip())))
                continue
            for answer in (message["content"], message["content"].strip()):
                at = turn.find(answer)
                if at >= 0:
                    break
            else:
                return None
            end = len(head) + at + len(answer)
            spans.append((len(head) + at, end + len(text[end:len(through)].rstrip())))
        return spans


def mark(message):
    if not trained(message):
        return message
    return {**message, "content": f"{ANSWER_MARK}{message['content']}{ANSWER_MARK}"}


def token_range(encoding, start, end):
    """The tokens [first, last) that hold any of the characters [start, end)."""
    first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
    if first is None or last is None:  # characters no token holds (a normalizer removed them)
        offsets = encoding.offsets
        held = [t for t, (a, b) in enumerate(offsets) if a < end and b > start]
        return (held[0], held[-1] + 1) if held else (0, 0)
    return first, last + 1


if __name__ == "__main__":
    run(main)
