"""Step 3: render each conversation with the model's chat template, tokenize it, and label
it so that training learns the assistant's answers only.

    model-ready/<MODEL_NAME>/<DATASET_NAME>/shard-NNNNN.parquet  one per standardized shard:
        input_ids, labels (list<int32>), source_row (int64). labels are -100 except on each
        assistant answer and the end-of-turn token that closes it (<|im_end|> for Qwen), so the
        model learns to answer and to stop; system and user turns and the template's
        scaffolding are never trained
    .../_dropped/shard-NNNNN.jsonl   every row dropped, with its source_row and reason
    .../_shards/shard-NNNNN.json     a finished shard's statistics and inputs
    .../_manifest.json               written by whichever node finds every shard finished

The tokenizer comes from the bucket's copy of the model (import-model.py), never from the
Hub. Rows longer than MAX_SEQ_LENGTH tokens are truncated and counted; rows left without a
trained token are dropped and listed. On several SkyPilot nodes, node SKYPILOT_NODE_RANK
takes the shards whose number % SKYPILOT_NUM_NODES equals its rank; each shard is committed
on its own, so a rerun continues where it stopped and a finished run writes nothing.
"""

import json
import os

from common import (CHATML_TEMPLATE, MODEL_CACHE_SETTING, Conflict, Setting, UserError,
                    abort_stale_uploads, download_model, fingerprint, log, manifest_fingerprint,
                    model_fingerprint, model_prefix, model_ready_prefix, open_bucket, parquet_writer,
                    parse_settings, read_manifest, read_parquet_batches, refuse_other_inputs,
                    require_complete, run, same_inputs, shard_name, standardized_prefix,
                    with_rebuild, write_manifest)

SETTINGS = [
    Setting("MODEL_NAME", help="the model whose tokenizer and template to use, as imported by "
            "import-model.py, e.g. Qwen/Qwen2.5-0.5B", required=True),
    Setting("DATASET_NAME", help="the dataset to tokenize, as imported by import-dataset.py",
            required=True),
    Setting("MAX_SEQ_LENGTH", 4096, "tokens per row; longer rows are truncated", int, minimum=1),
    Setting("CHAT_TEMPLATE", "model", "model: the model's own chat template; chatml: ChatML "
            "(for a model that has none)", choices=("model", "chatml")),
    Setting("NUM_PROC", os.cpu_count(), "CPU cores to tokenize with", int, minimum=1),
    Setting("EVAL_ROWS", 200, "conversations held out of training for the evaluation loss, spread "
            "evenly over the whole dataset (at most a tenth of it; 0: none)", int, minimum=0),
    MODEL_CACHE_SETTING,
    Setting("SKYPILOT_NODE_RANK", 0, "this node's number (set by SkyPilot)", int, minimum=0),
    Setting("SKYPILOT_NUM_NODES", 1, "how many nodes share the work (set by SkyPilot)", int,
            minimum=1),
]
BATCH_ROWS = 1_000  # rows rendered and tokenized at once, and rows per Parquet row group
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "vocab.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
TOKENIZER_SUFFIXES = (".model", ".tiktoken")
ANSWER_MARK = "\ue000"  # a private-use character, placed around each answer in a second rendering
NOT_TRAINED = -100


def main():
    settings = parse_settings(__doc__, SETTINGS)
    use_cores(settings.num_proc)
    bucket = open_bucket(settings)
    standardized = require_complete(bucket, standardized_prefix(settings.dataset_name),
                                    "import-dataset.py")
    model = require_complete(bucket, model_prefix(settings.model_name), "import-model.py")
    prefix = model_ready_prefix(settings.model_name, settings.dataset_name)
    inputs = json.loads(json.dumps(with_rebuild({  # as it reads back from markers and manifest
        "step": "model-ready/3", "standardized": manifest_fingerprint(standardized),
        "model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(model),
        "chat_template": settings.chat_template, "max_seq_length": settings.max_seq_length,
        "eval_rows": settings.eval_rows}, settings, "pretokenize")))
    held_out = min(settings.eval_rows, standardized["rows"] // 10)
    if held_out < settings.eval_rows:
        log(f"EVAL_ROWS={settings.eval_rows} is more than a tenth of the dataset's "
            f"{standardized['rows']} rows: holding out {held_out}")
    replace = settings.force or "rebuild" in inputs  # consent to replace what other inputs made
    if finished(bucket, prefix, inputs, replace):
        return
    sources = [f"{standardized_prefix(settings.dataset_name)}/{shard['path']}"
               for shard in standardized["shards"]]
    mine = range(settings.skypilot_node_rank, len(sources), settings.skypilot_num_nodes)
    todo = [index for index in mine if not shard_done(bucket, prefix, index, inputs, replace)]
    my_objects = {name for index in mine for name in (
        f"{shard_name(index, '')[:-1]}/part-00000.parquet", f"_eval/{shard_name(index)}",
        dropped_list_name(index))}
    abort_stale_uploads(bucket, prefix, lambda name: name in my_objects)
    log(f"node {settings.skypilot_node_rank} of {settings.skypilot_num_nodes}: {len(todo)} of "
        f"{len(mine)} shards to tokenize")
    if todo:
        model_dir = download_model(bucket, settings.model_name, settings.model_cache_dir)
        labeller = Labeller(load_tokenizer(model_dir, settings.chat_template),
                            settings.max_seq_length)
        first_rows = [sum(shard["rows"] for shard in standardized["shards"][:index])
                      for index in range(len(sources))]
        for index in todo:
            pretokenize_shard(bucket, sources[index], prefix, index, labeller, inputs,
                              HeldOut(held_out, standardized["rows"], first_rows[index]))
    write_manifest_if_all_done(bucket, prefix, inputs, len(sources))


def use_cores(num_proc):
    # The fast tokenizer spreads one batch over NUM_PROC Rust threads; these are read when the
    # tokenizers library first needs its thread pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if num_proc > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(num_proc)


def tokenizer_fingerprint(model):
    files = [(entry["path"], entry["sha256"]) for entry in model["shards"]
             if entry["path"] in TOKENIZER_FILES or entry["path"].endswith(TOKENIZER_SUFFIXES)]
    return fingerprint(sorted(files))


# ---------------------------------------------------------------- progress in the bucket


def finished(bucket, prefix, inputs, replace):
    """Whether the output is complete from these inputs. One made from other inputs is refused,
    unless `replace` consents: then its manifest goes (only the manifest: other nodes may
    already be writing their new shards; each node replaces its own)."""
    manifest = read_manifest(bucket, prefix)
    if manifest is None:
        return False
    if not same_inputs(manifest["inputs"], inputs):
        if not replace:
            refuse_other_inputs(bucket, prefix, manifest["inputs"], inputs)
        log(f"replacing {bucket.url(prefix)}, made with other inputs")
        bucket.fs.rm(bucket.path(f"{prefix}/_manifest.json"))
        return False
    if manifest["complete"]:
        log(f"{bucket.url(prefix)} is complete ({manifest['rows']} rows, {manifest['tokens']} "
            "tokens): nothing to do")
        return True
    return False


def dropped_list_name(index):
    return f"_dropped/{shard_name(index, 'jsonl')}"


def marker_key(prefix, index):
    return f"{prefix}/_shards/{shard_name(index, 'json')}"


def read_marker(bucket, prefix, index):
    data = bucket.get(marker_key(prefix, index))
    return None if data is None else json.loads(data)


def shard_done(bucket, prefix, index, inputs, replace):
    """Whether a shard was finished from these inputs; one made from others is redone when
    `replace` consents, else refused."""
    marker = read_marker(bucket, prefix, index)
    if marker is None:
        return False
    if not same_inputs(marker["inputs"], inputs):
        if not replace:
            refuse_other_inputs(bucket, prefix, marker["inputs"], inputs, what="was partly made")
        return False
    return True


def write_manifest_if_all_done(bucket, prefix, inputs, count):
    """The node that finds every shard finished writes the manifest; one write wins."""
    markers = [read_marker(bucket, prefix, index) for index in range(count)]
    done = [m for m in markers if m is not None and same_inputs(m["inputs"], inputs)]
    if len(done) < count:
        log(f"{len(done)} of {count} shards finished: the node that finishes the last one "
            "writes the manifest")
        return
    shards = [{k: v for k, v in marker.items() if k not in ("inputs", "eval", "end_of_turn")}
              for marker in done]
    totals = {key: sum(shard[key] for shard in shards)
              for key in ("rows", "tokens", "trained_tokens", "truncated", "dropped")}
    held_out = [marker["eval"] for marker in done if marker["eval"]["rows"]]
    if totals["rows"] == 0:
        raise UserError(f"every row was dropped (the reasons are in {bucket.url(prefix)}/"
                        "_dropped/): raise MAX_SEQ_LENGTH, or check the chat template")
    manifest = {"complete": True, "inputs": inputs, "shards": shards, **totals,
                "max_seq_length": inputs["max_seq_length"], "eval": held_out,
                "eval_rows": sum(entry["rows"] for entry in held_out),
                "end_of_turn": done[0]["end_of_turn"]}
    try:
        write_manifest(bucket, prefix, manifest, if_none_match=True)
    except Conflict:
        log("another node wrote the manifest")
        return
    log(f"{bucket.url(prefix)} complete: {totals['rows']} rows, {totals['tokens']} tokens "
        f"({totals['trained_tokens']} trained), {totals['truncated']} truncated, "
        f"{totals['dropped']} dropped (listed in _dropped/)")


# ---------------------------------------------------------------- a shard


class HeldOut:
    """Which rows of a shard are held out for evaluation: `count` rows spread evenly over all
    `total` rows of the dataset (global row r is held out when floor((r+1) * count / total) >
    floor(r * count / total)), whichever nodes tokenize which shards."""

    def __init__(self, count, total, first_row):
        self.count, self.total, self.next_row = count, total, first_row

    def take(self, rows):
        """The held-out positions among the next `rows` rows of the shard."""
        first, self.next_row = self.next_row, self.next_row + rows
        return {r - first for r in range(first, first + rows)
                if (r + 1) * self.count // self.total > r * self.count // self.total}


def pretokenize_shard(bucket, source, prefix, index, labeller, inputs, held_out):
    """Tokenize the standardized shard `source` into the model-ready shard number `index`, its
    held-out rows apart."""
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401 - pa.compute

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("source_row", pa.int64()), ("length", pa.int32())])
    name = shard_name(index, "")[:-1]
    stats = {"path": name, "dropped_list": dropped_list_name(index), "rows": 0, "tokens": 0,
             "trained_tokens": 0, "truncated": 0, "dropped": 0, "dropped_reasons": {},
             "parts": [{"path": f"{name}/part-00000.parquet", "rows": 0, "tokens": 0}],
             "eval": {"path": f"_eval/{name}.parquet", "rows": 0},
             "end_of_turn": labeller.end_of_turn}
    with parquet_writer(bucket, f"{prefix}/{stats['parts'][0]['path']}", schema) as writer, \
            parquet_writer(bucket, f"{prefix}/{stats['eval']['path']}", schema) as eval_writer, \
            bucket.writer(f"{prefix}/{stats['dropped_list']}") as dropped_list:
        held = set()

        def batches():
            for batch in read_parquet_batches(bucket, source, BATCH_ROWS):
                source_rows = batch.column("source_row").to_numpy()
                held.update(int(source_rows[i]) for i in held_out.take(len(source_rows)))
                tools = (batch.column("tools").to_pylist() if "tools" in batch.schema.names
                         else [None] * len(source_rows))
                yield ([chat_of(turns) for turns in batch.column("conversations").to_pylist()],
                       source_rows, [tools and json.loads(tools) for tools in tools])

        for rows in labeller.pipeline(batches()):
            table = pa.table(rows.columns, schema=schema)
            is_held = pa.array([int(r) in held for r in rows.source_rows], pa.bool_())
            training, evaluation = table.filter(pa.compute.invert(is_held)), table.filter(is_held)
            writer.write_table(training)
            eval_writer.write_table(evaluation)
            for source_row, reason in rows.dropped:
                dropped_list.write(json.dumps({"source_row": int(source_row),
                                               "reason": reason}).encode() + b"\n")
                stats["dropped_reasons"][reason] = stats["dropped_reasons"].get(reason, 0) + 1
            stats["rows"] += training.num_rows
            stats["eval"]["rows"] += evaluation.num_rows
            tokens = pa.compute.sum(training.column("length")).as_py() or 0
            stats["tokens"] += tokens
            stats["parts"][0]["tokens"] += tokens
            stats["trained_tokens"] += pa.compute.sum(pa.compute.not_equal(
                pa.compute.list_flatten(training.column("labels")), NOT_TRAINED)).as_py() or 0
            stats["truncated"] += rows.truncated
            stats["dropped"] += len(rows.dropped)
    stats["parts"][0]["rows"] = stats["rows"]
    bucket.put(marker_key(prefix, index), json.dumps({**stats, "inputs": inputs}, indent=1,
                                                     sort_keys=True).encode())
    log(f"shard {stats['path']}: {stats['rows']} rows ({stats['eval']['rows']} more held out), "
        f"{stats['tokens']} tokens, {stats['truncated']} truncated, {stats['dropped']} dropped")


# ---------------------------------------------------------------- tokenizer and template


def load_tokenizer(model_dir, chat_template):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.is_fast:
        raise UserError(f"the tokenizer in {model_dir} has no fast (Rust) version, which "
                        "pretokenize.py needs to map answers to tokens: use a model that ships "
                        "tokenizer.json")
    if chat_template == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    elif not tokenizer.chat_template:
        raise UserError(f"the tokenizer in {model_dir} has no chat template: set "
                        "CHAT_TEMPLATE=chatml to use ChatML, or use a model that has one")
    return tokenizer


class Rows:
    """A batch's output columns, the rows dropped from it with why, and its counts."""

    def __init__(self):
        self.ids, self.labels, self.source_rows, self.dropped = [], [], [], []
        self.tokens = self.trained_tokens = self.truncated = 0

    @property
    def columns(self):
        import numpy as np
        import pyarrow as pa

        def list_array(arrays):
            offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
            np.cumsum([len(a) for a in arrays], out=offsets[1:])
            values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))

        return {"input_ids": list_array(self.ids), "labels": list_array(self.labels),
                "source_row": pa.array(self.source_rows, pa.int64()),
                "length": pa.array([len(ids) for ids in self.ids], pa.int32())}


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
    marks give each answer's characters. The end-of-turn text (the template's text after an
    answer, up to the whitespace before the next turn) is found once by rendering a probe
    exchange, and must follow each answer. Any other row (a template that transforms content,
    an answer containing the mark, an answer with tool calls) is located by rendering the
    conversation's prefixes up to each answer, which holds for any template that renders a
    conversation's beginning the same way whatever follows; an answer with tool calls is then
    all the turn renders after the generation prompt, and must show each call's name. The
    text is then tokenized once, and a token is trained when any of its characters is an
    answer's or an end-of-turn's. Only answers of weight 1 (the default) are trained."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.backend = tokenizer.backend_tokenizer
        probe = [[{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": f"{ANSWER_MARK}Hello{ANSWER_MARK}"}]]
        try:
            text = self.render(probe)[0]
        except Exception as e:  # noqa: BLE001 - jinja raises many kinds
            raise UserError(f"the chat template cannot render a user/assistant exchange ({e}): "
                            "set CHAT_TEMPLATE=chatml or use another model") from None
        self.end_of_turn = text[text.rindex(ANSWER_MARK) + 1:].rstrip()

    def render(self, conversations, add_generation_prompt=False, tools=None):
        return self.tokenizer.apply_chat_template(conversations, tokenize=False, tools=tools,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, conversations, source_rows, tools=None):
        """The Rows of one batch."""
        (rows,) = self.pipeline([(conversations, source_rows, tools or [None] * len(conversations))])
        return rows

    def pipeline(self, batches):
        """The Rows of each (conversations, source_rows, tools) batch, in order.

        The tokenizer releases the GIL: a batch is tokenized while the next one is read and
        rendered, and the previous one labelled and written."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as tokenizer_thread:
            pending = None
            for conversations, source_rows, tools in batches:
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
                encodings = tokenizer_thread.submit(self.backend.encode_batch,
                                                    [texts[i] for i in located],
                                                    add_special_tokens=False)
                if pending is not None:
                    yield self.label(*pending)
                pending = (source_rows, spans, reasons, located, encodings)
            if pending is not None:
                yield self.label(*pending)

    def label(self, source_rows, spans, reasons, located, encodings):
        import numpy as np

        rows = Rows()
        encodings = dict(zip(located, encodings.result()))
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
