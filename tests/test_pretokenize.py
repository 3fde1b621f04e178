"""pretokenize.py: exact assistant-only labels for any chat template, and the step's guarantees."""

import copy
import io
import json
import shutil
import signal
import sys
import time

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import (FAKE_KEY_ID, FAKE_SECRET, ROOT, TEST_BUCKET, bucket_objects, date_upload,
                      descendants, fixture_path, model_ready_prefix, run_step, running, start_step,
                      without_chatml_tokens)

import common
import pretokenize

sys.path.insert(0, str(ROOT / "demo"))
import synthetic  # noqa: E402

MODEL, DATASET = "qwen/tiny", "synth/chat"
MAX_SEQ_LENGTH = 96
EDGE_CASES = [  # beyond the synthetic rows: what templates and tokenizers make hard
    [{"role": "user", "content": "Repeat after me: the sky is blue."},
     {"role": "assistant", "content": "the sky is blue."}],  # the answer also in the question
    [{"role": "assistant", "content": "I speak first."}],
    [{"role": "user", "content": "Unicode?"}, {"role": "assistant", "content": "Oui, très bien: 世界 🌍"}],
    [{"role": "user", "content": "Spaces?"}, {"role": "assistant", "content": "Trailing space.  \n"}],
    [{"role": "user", "content": "Mark?"},
     {"role": "assistant", "content": f"An answer with {pretokenize.ANSWER_MARK} inside."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
     {"role": "assistant", "content": "One."}, {"role": "user", "content": "Two?"},
     {"role": "assistant", "content": "Two."}],
]
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}")
GEMMA_TEMPLATE = (  # no system role: it is folded into the first user turn; answers are trimmed
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set first = messages[0]['content'] | trim + '\\n\\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set first = '' %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}")
# template: (end-of-turn text, whether the template trims answers)
TEMPLATES = {"qwen2.5": ("<|im_end|>", False), "chatml": ("<|im_end|>", False),
             "llama3-style": ("<|eot_id|>", True), "gemma-style": ("<end_of_turn>", True)}


def standardized(rows):
    return [[{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]),
              "content": t["value"]} for t in row["conversations"]] for row in rows]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return synthetic.make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def tokenizer_for(template, tiny_tokenizer):
    if template == "qwen2.5":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(fixture_path("tokenizers", "qwen2.5-0.5b"))
    tokenizer = copy.deepcopy(tiny_tokenizer)
    if template == "llama3-style":
        tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>"})
        tokenizer.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                             special_tokens=True)
        tokenizer.chat_template = LLAMA3_TEMPLATE
    elif template == "gemma-style":
        tokenizer.add_special_tokens({"bos_token": "<bos>"})
        tokenizer.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
        tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


def trained_runs(ids, labels):
    """The trained tokens, as runs of consecutive positions."""
    assert all(label in (common.NOT_TRAINED, token) for token, label in zip(ids, labels))
    runs, run = [], []
    for token, label in zip(ids, labels):
        if label != common.NOT_TRAINED:
            run.append(int(token))
        elif run:
            runs, run = runs + [run], []
    return runs + [run] if run else runs


def check_row(tokenizer, conversation, ids, labels, end_of_turn, trims):
    """Untruncated: the tokens spell the template's rendering, the trained ones each answer."""
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(conversation, tokenize=False)
    answers = [m["content"].strip() if trims else m["content"]
               for m in conversation if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in trained_runs(ids, labels)] == \
        [answer + end_of_turn for answer in answers]


@pytest.mark.parametrize("template", TEMPLATES)
def test_labels_train_exactly_each_answer_and_its_end_of_turn(template, tiny_tokenizer):
    tokenizer = tokenizer_for(template, tiny_tokenizer)
    end_of_turn, trims = TEMPLATES[template]
    conversations = standardized(synthetic.conversations(40, seed=3)) + EDGE_CASES
    labeller = pretokenize.Labeller(tokenizer, max_length=10_000)
    assert labeller.end_of_turn == end_of_turn

    rows = labeller(conversations, np.arange(len(conversations)))
    assert rows.dropped == [] and rows.truncated == 0
    assert rows.source_rows == list(range(len(conversations)))
    for conversation, ids, labels in zip(conversations, rows.ids, rows.labels):
        check_row(tokenizer, conversation, ids, labels, end_of_turn, trims)
    assert rows.tokens == sum(len(ids) for ids in rows.ids)
    assert rows.trained_tokens == sum(int((labels != -100).sum()) for labels in rows.labels)


def test_answer_after_leading_whitespace_is_trained_whole(tiny_tokenizer):
    # A token may hold both the header's last newline and the answer's first characters.
    tokenizer = tokenizer_for("qwen2.5", tiny_tokenizer)
    conversation = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\n\nA list:"}]
    rows = pretokenize.Labeller(tokenizer, 10_000)([conversation], [0])
    (run,) = trained_runs(rows.ids[0], rows.labels[0])
    trained, expected = tokenizer.decode(run), "\n\nA list:<|im_end|>"
    assert trained.endswith(expected) and not trained[:-len(expected)].strip()


def test_truncation_is_counted_and_rows_without_answer_tokens_dropped(tiny_tokenizer):
    tokenizer = tokenizer_for("qwen2.5", tiny_tokenizer)
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    long_answer = [{"role": "user", "content": "Count"},
                   {"role": "assistant", "content": " ".join(map(str, range(200)))}]
    long_question = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Ok."}]
    rows = pretokenize.Labeller(tokenizer, 64)([short, long_answer, long_question], [7, 8, 9])
    assert rows.source_rows == [7, 8]
    assert rows.dropped == [(9, "no trained token within MAX_SEQ_LENGTH")]
    assert rows.truncated == 1
    full = tokenizer.apply_chat_template(long_answer, tokenize=False)
    assert list(rows.ids[1]) == tokenizer(full, add_special_tokens=False)["input_ids"][:64]


def test_a_template_is_required_unless_chatml_is_asked(tiny_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(common.UserError, match="no chat template: set CHAT_TEMPLATE=chatml"):
        common.load_chat_tokenizer(str(tmp_path), "model")
    chatml = common.load_chat_tokenizer(str(tmp_path), "chatml")
    conversation = standardized(synthetic.conversations(1))[0]
    rows = pretokenize.Labeller(chatml, 10_000)([conversation], [0])
    check_row(chatml, conversation, rows.ids[0], rows.labels[0], "<|im_end|>", False)


def test_chatml_is_refused_on_a_vocabulary_without_its_tokens(tmp_path):
    own = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    with pytest.raises(common.UserError, match=r"CHAT_TEMPLATE=chatml needs <\|im_start\|> and "
                       r"<\|im_end\|> to be one token each.*use the model's own chat template "
                       r"\(CHAT_TEMPLATE=model\)"):
        common.load_chat_tokenizer(str(without_chatml_tokens(tmp_path / "own", own)), "chatml")
    with pytest.raises(common.UserError, match="splits them into ordinary tokens: use a model that has"):
        common.load_chat_tokenizer(str(without_chatml_tokens(tmp_path / "none")), "chatml")
    labeller = pretokenize.Labeller(common.load_chat_tokenizer(str(tmp_path / "own"), "model"), 100)
    assert labeller.end_of_turn == "</s>"


# ---------------------------------------------------------------- weights and tool calls

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
FINE_TUNING_ROWS = [  # OpenAI's chat fine-tuning format
    {"messages": [{"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Lyon.", "weight": 0},
                  {"role": "user", "content": "Really?"},
                  {"role": "assistant", "content": "Paris.", "weight": 1}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [{
                      "id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
                  {"role": "assistant", "content": "21 degrees."}],
     "tools": [WEATHER_TOOL]},
]
TOOL_CALL_TURN = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_weight_0_answers_are_context_and_only_weight_1_answers_train(tiny_tokenizer):
    conversation = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "weight": 0},
                    {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "weight": 1},
                    {"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3"}]
    for template in ("chatml", "llama3-style"):
        tokenizer = tokenizer_for(template, tiny_tokenizer)
        end_of_turn = TEMPLATES[template][0]
        rows = pretokenize.Labeller(tokenizer, 10_000)([conversation], [0])
        assert [tokenizer.decode(run) for run in trained_runs(rows.ids[0], rows.labels[0])] == \
            ["A2" + end_of_turn, "A3" + end_of_turn], template
    everything_context = [{**m, "weight": 0} for m in conversation]
    rows = pretokenize.Labeller(tiny_tokenizer, 10_000)([everything_context], [5])
    assert rows.dropped == [(5, "no answer to train: every one has weight 0")]


def test_tool_calls_train_as_the_template_renders_them_or_the_row_is_dropped(tiny_tokenizer, tmp_path):
    """Through both steps: an OpenAI fine-tuning file imported, then labelled with Qwen2.5's
    template, which renders tools and tool calls; the tiny model's ChatML template does not,
    and its row with tool calls is dropped with the reason."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "ft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FINE_TUNING_ROWS))
    qwen = work / "qwen"
    shutil.copytree(fixture_path("tokenizers", "qwen2.5-0.5b"), qwen)
    from safetensors.numpy import save_file

    save_file({"weight": np.zeros((2, 2), dtype=np.float32)}, str(qwen / "model.safetensors"))
    tiny = work / "tiny"
    tiny_tokenizer.save_pretrained(tiny)
    save_file({"weight": np.zeros((2, 2), dtype=np.float32)}, str(tiny / "model.safetensors"))
    env = {"BUCKET_NAME": f"file://{work / 'bucket'}", "DATASET_NAME": "ft", "EVAL_ROWS": "0",
           "MODEL_CACHE_DIR": str(work / "cache")}
    run_step("import-dataset.py", {**env, "DATASET_SOURCE": str(work / "ft.jsonl")})
    for name, source in (("qwen", qwen), ("tiny", tiny)):
        run_step("import-model.py", {**env, "MODEL_NAME": name, "MODEL_SOURCE": str(source)})
        run_step("pretokenize.py", {**env, "MODEL_NAME": name, "MAX_SEQ_LENGTH": "1024",
                                    "MAX_REJECT_FRACTION": "0.5"})

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen)
    rows = read_rows(bucket_objects(env), model_ready_prefix({**env, "MODEL_NAME": "qwen",
                                                              "MAX_SEQ_LENGTH": "1024"}))
    assert [[tokenizer.decode(run) for run in trained_runs(rows[r]["input_ids"], rows[r]["labels"])]
            for r in (0, 1)] == [["Paris.<|im_end|>"],
                                 [TOOL_CALL_TURN + "<|im_end|>", "21 degrees.<|im_end|>"]]
    rendered = tokenizer.decode(rows[1]["input_ids"])
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in rendered
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in rendered

    tiny_prefix = model_ready_prefix({**env, "MODEL_NAME": "tiny", "MAX_SEQ_LENGTH": "1024"})
    manifest = json.loads(bucket_objects(env)[f"{tiny_prefix}/_manifest.json"])
    assert manifest["rows"] == 1
    assert manifest["shards"][0]["dropped_reasons"] == {"the chat template does not render tool calls": 1}


def test_more_rows_dropped_than_max_reject_fraction_fail_and_a_higher_limit_reuses_the_parts(
        tiny_tokenizer, s3, proxy, tmp_path):
    """20 rows in two parts, EVAL_ROWS=2 (rows 9 and 19 held out): the tiny model's template
    does not render tool calls (rows 4 and 19) and row 12 has no answer within MAX_SEQ_LENGTH.
    3 of 20 dropped, held-out ones counted, is more than the default tenth: the step fails
    without a manifest; with a higher limit it writes the manifest from the parts on record."""
    rows = [synthetic.as_openai(row) for row in synthetic.conversations(20, seed=7)]
    rows[4] = rows[19] = FINE_TUNING_ROWS[1]
    rows[12]["messages"].insert(0, {"role": "system", "content": "Rule of the house. " * 80})
    (tmp_path / "ft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    from safetensors.numpy import save_file

    save_file({"weight": np.zeros((2, 2), dtype=np.float32)}, str(tmp_path / "tiny" / "model.safetensors"))
    env = {**s3, "DATASET_NAME": "ft", "MODEL_NAME": "tiny", "EVAL_ROWS": "2", "MAX_SEQ_LENGTH": "128",
           "MODEL_CACHE_DIR": str(tmp_path / "cache")}
    run_step("import-dataset.py", {**env, "DATASET_SOURCE": str(tmp_path / "ft.jsonl"),
                                   "SHARD_SIZE": "10"})
    run_step("import-model.py", {**env, "MODEL_SOURCE": str(tmp_path / "tiny")})
    prefix = model_ready_prefix(env)

    result = run_step("pretokenize.py", env, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message == (
        "error: pretokenize dropped 3 of 20 rows (15.0%), more than MAX_REJECT_FRACTION=0.1: "
        "2 'the chat template does not render tool calls', 1 'no trained token within "
        f"MAX_SEQ_LENGTH'; the rows and reasons are in s3://{TEST_BUCKET}/{prefix}/"
        "_dropped/: raise MAX_SEQ_LENGTH, fix the template, or raise MAX_REJECT_FRACTION")
    objects = bucket_objects(s3)
    assert f"{prefix}/_manifest.json" not in objects
    assert sorted(k for k in objects if k.startswith(f"{prefix}/_parts/")) == \
        [f"{prefix}/_parts/shard-0000{i}/part-00000.json" for i in (0, 1)]

    proxy.clear()
    result = run_step("pretokenize.py", {**env, "AWS_ENDPOINT_URL_S3": proxy.url,
                                         "MAX_REJECT_FRACTION": "0.2"})
    assert "0 of 2 parts to tokenize" in result.stdout
    assert [path for _, path in proxy.writes()] == [f"/{TEST_BUCKET}/{prefix}/_manifest.json"]
    manifest = json.loads(bucket_objects(s3)[f"{prefix}/_manifest.json"])
    assert manifest["complete"] and (manifest["rows"], manifest["eval_rows"]) == (16, 1)
    assert (manifest["dropped"], manifest["eval_dropped"]) == (3, 1)


# ---------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A local bucket with a dataset (3 shards) and a model with the real Qwen2.5 tokenizer,
    imported by import-dataset.py and import-model.py running at the same time."""
    work = tmp_path_factory.mktemp("inputs")
    rows = synthetic.conversations(220, seed=5)
    rows[3]["conversations"].insert(0, {"from": "system", "value": "Rule. " * 100})  # dropped
    rows[10]["conversations"][-1]["value"] = "Long answer. " * 60  # truncated
    sharegpt_roles = {"system": "system", "user": "human", "assistant": "gpt"}
    rows += [{"conversations": [{"from": sharegpt_roles[m["role"]], "value": m["content"]}
                                for m in conversation]} for conversation in EDGE_CASES]
    (work / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = work / "model"
    shutil.copytree(fixture_path("tokenizers", "qwen2.5-0.5b"), model)
    from safetensors.numpy import save_file

    save_file({"weight": np.zeros((2, 2), dtype=np.float32)}, str(model / "model.safetensors"))
    env = {"BUCKET_NAME": f"file://{work / 'bucket'}"}
    steps = [start_step("import-dataset.py", {**env, "DATASET_NAME": DATASET, "SHARD_SIZE": "80",
                                              "DATASET_SOURCE": str(work / "chat.jsonl")}),
             start_step("import-model.py", {**env, "MODEL_NAME": MODEL, "MODEL_SOURCE": str(model)})]
    for step in steps:
        output = step.communicate(timeout=300)[0]
        assert step.returncode == 0, output
    return work / "bucket"


def step_env(env, tmp_path, **settings):
    return {**env, "MODEL_NAME": MODEL, "DATASET_NAME": DATASET,
            "MODEL_CACHE_DIR": str(tmp_path / "cache"), "MAX_SEQ_LENGTH": str(MAX_SEQ_LENGTH),
            "EVAL_ROWS": "5", **settings}


def upload_tree(root, env):
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)
    for path in root.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            client.upload_file(str(path), TEST_BUCKET, str(path.relative_to(root)))
    return client


def read_rows(objects, prefix):
    """{source_row: row} of the Parquet files under prefix/shard-* (a folder of parts or not)."""
    rows = {}
    for key, data in sorted(objects.items()):
        if key.startswith(prefix + "/shard-") and key.endswith(".parquet"):
            for row in pq.read_table(io.BytesIO(data)).to_pylist():
                rows[row["source_row"]] = row
    return rows


def in_order(objects, prefix):
    """The standardized rows' source_row, in the dataset's order (their position)."""
    manifest = json.loads(objects[f"{prefix}/_manifest.json"])
    return [row for shard in manifest["shards"]
            for row in pq.read_table(io.BytesIO(objects[f"{prefix}/{shard['path']}"]))
            .column("source_row").to_pylist()]


def held_out(order, eval_rows):
    """The source rows EVAL_ROWS holds out: spread evenly by position."""
    return {row for position, row in enumerate(order)
            if (position + 1) * eval_rows // len(order) > position * eval_rows // len(order)}


def dropped_lists(objects, prefix):
    return [json.loads(line) for key, data in sorted(objects.items())
            if key.startswith(f"{prefix}/_dropped/") for line in data.decode().splitlines()]


def test_step_labels_every_row_exactly_and_a_rerun_writes_nothing(imported, s3, proxy, tmp_path):
    client = upload_tree(imported, s3)
    prefix = model_ready_prefix(step_env(s3, tmp_path))
    # A run killed while uploading a part six minutes ago: its unfinished upload is aborted.
    # One begun a moment ago may be a run launched beside this one: it is left to that run.
    key = f"{prefix}/shard-00001/part-00000.parquet"
    killed = client.create_multipart_upload(Bucket=TEST_BUCKET, Key=key)["UploadId"]
    date_upload(killed, seconds_ago=360)
    twin = client.create_multipart_upload(Bucket=TEST_BUCKET, Key=key)["UploadId"]
    result = run_step("pretokenize.py", step_env(s3, tmp_path))
    assert FAKE_SECRET not in result.stdout + result.stderr
    assert f"aborting an unfinished upload of s3://{TEST_BUCKET}/{key}" in result.stdout
    assert [u["UploadId"] for u in client.list_multipart_uploads(Bucket=TEST_BUCKET)["Uploads"]] == [twin]
    client.abort_multipart_upload(Bucket=TEST_BUCKET, Key=key, UploadId=twin)

    env = step_env(proxy.env, tmp_path)  # the same bucket, through a proxy counting requests
    objects = bucket_objects(env)
    manifest = json.loads(objects[f"{prefix}/_manifest.json"])
    conversations = {r["source_row"]: r["conversations"] for r in
                     read_rows(objects, f"standardized/{DATASET}").values()}
    rows = read_rows(objects, prefix)
    evaluation = read_rows(objects, f"{prefix}/_eval")
    assert [d["source_row"] for d in dropped_lists(objects, prefix)] == [3]
    held = held_out(in_order(objects, f"standardized/{DATASET}"), 5)
    assert len(held) == 5 and 3 not in held
    assert sorted(evaluation) == sorted(held)
    assert sorted(rows) == sorted(set(conversations) - {3} - held)
    assert all(row["length"] == len(row["input_ids"]) for row in {**rows, **evaluation}.values())

    tokenizer = common.load_chat_tokenizer(fixture_path("tokenizers", "qwen2.5-0.5b"), "model")
    truncated = 0
    for source_row, row in {**rows, **evaluation}.items():
        assert row["length"] == len(row["input_ids"]) == len(row["labels"])
        text = tokenizer.apply_chat_template(conversations[source_row], tokenize=False)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(full) > MAX_SEQ_LENGTH:
            truncated += source_row in rows
            assert row["input_ids"] == full[:MAX_SEQ_LENGTH]
            assert trained_runs(row["input_ids"], row["labels"])
        else:
            check_row(tokenizer, conversations[source_row], row["input_ids"], row["labels"],
                      "<|im_end|>", False)
    assert truncated >= 1
    assert manifest["complete"] is True
    assert (manifest["rows"], manifest["dropped"], manifest["truncated"]) == (len(rows), 1, truncated)
    assert manifest["rows"] + manifest["eval_rows"] + manifest["dropped"] == len(conversations)
    assert manifest["tokens"] == sum(len(r["input_ids"]) for r in rows.values())
    assert manifest["trained_tokens"] == sum(sum(x != -100 for x in r["labels"]) for r in rows.values())
    assert manifest["inputs"]["max_seq_length"] == manifest["max_seq_length"] == MAX_SEQ_LENGTH
    assert manifest["end_of_turn"] == "<|im_end|>"
    # What dotrain.py reads: each shard's parts, and the evaluation files, in order.
    assert [shard["path"] for shard in manifest["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    for shard in manifest["shards"]:
        assert set(shard) == {"path", "rows", "tokens", "trained_tokens", "truncated", "dropped",
                              "dropped_reasons", "parts"}
        assert [part["path"] for part in shard["parts"]] == [f"{shard['path']}/part-00000.parquet"]
        part = pq.read_table(io.BytesIO(objects[f"{prefix}/{shard['parts'][0]['path']}"]))
        assert shard["parts"][0] == {"path": shard["parts"][0]["path"], "rows": part.num_rows,
                                     "tokens": sum(part.column("length").to_pylist())}
        assert shard["rows"] == part.num_rows
    assert manifest["eval_rows"] == len(evaluation) == sum(e["rows"] for e in manifest["eval"])
    listed = {}
    for entry in manifest["eval"]:
        table = pq.read_table(io.BytesIO(objects[f"{prefix}/{entry['path']}"]))
        assert table.num_rows == entry["rows"]
        listed.update({row["source_row"]: row for row in table.to_pylist()})
    assert listed == evaluation

    proxy.clear()
    result = run_step("pretokenize.py", env)
    assert "nothing to do" in result.stdout
    assert proxy.writes() == []

    # Other data settings (a sweep over MAX_SEQ_LENGTH) make data of their own beside this one,
    # without FORCE, and leave this one as it is.
    other = model_ready_prefix({**env, "MAX_SEQ_LENGTH": "128"})
    run_step("pretokenize.py", {**env, "MAX_SEQ_LENGTH": "128", "NUM_PROC": "1"})
    assert other != prefix
    written = {path.split("?")[0][len(f"/{TEST_BUCKET}/"):] for _, path in proxy.writes()}
    assert written and all(key.startswith(f"{other}/") for key in written)
    assert json.loads(bucket_objects(env)[f"{other}/_manifest.json"])["max_seq_length"] == 128
    assert {k: v for k, v in bucket_objects(env).items() if k.startswith(prefix)} == \
        {k: v for k, v in objects.items() if k.startswith(prefix)}


def test_eval_rows_are_capped_at_a_tenth_of_the_dataset(imported, tmp_path):
    bucket = tmp_path / "bucket"
    shutil.copytree(imported, bucket)
    env = step_env({"BUCKET_NAME": f"file://{bucket}"}, tmp_path, EVAL_ROWS="100000")
    rows = json.loads((bucket / f"standardized/{DATASET}/_manifest.json").read_text())["rows"]
    result = run_step("pretokenize.py", env)
    assert f"EVAL_ROWS=100000 is more than a tenth of the dataset's {rows} rows: holding out " \
        f"{rows // 10}" in result.stdout
    manifest = json.loads((bucket / model_ready_prefix(env) / "_manifest.json").read_text())
    assert manifest["eval_rows"] + manifest["eval_dropped"] == rows // 10


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory, tiny_tokenizer):
    """A local bucket with one standardized shard of three row groups (4,500 rows, some too
    long to keep, one of them held out) and a model with the tiny tokenizer."""
    work = tmp_path_factory.mktemp("one-shard")
    rows = synthetic.conversations(4500, seed=6)
    for at in (10, 299, 2100):  # 299: held out when EVAL_ROWS=30 (every 150th row)
        rows[at]["conversations"].insert(0, {"from": "system", "value": "Rule of the house. " * 80})
    (work / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_tokenizer.save_pretrained(work / "model")
    from safetensors.numpy import save_file

    save_file({"weight": np.zeros((2, 2), dtype=np.float32)}, str(work / "model" / "model.safetensors"))
    env = {"BUCKET_NAME": f"file://{work / 'bucket'}", "MODEL_NAME": MODEL, "DATASET_NAME": DATASET}
    run_step("import-dataset.py", {**env, "DATASET_SOURCE": str(work / "chat.jsonl")})
    run_step("import-model.py", {**env, "MODEL_SOURCE": str(work / "model")})
    return work / "bucket"


def test_processes_and_nodes_share_the_parts_of_one_shard_and_make_the_same_bytes(one_shard, tmp_path):
    """One shard in three parts: one node and one process; two processes, killed after the first
    part; two nodes of one process each. The same bytes, and each part resumes on its own."""
    bucket = tmp_path / "bucket"
    shutil.copytree(one_shard, bucket)
    env = step_env({"BUCKET_NAME": f"file://{bucket}"}, tmp_path, MAX_SEQ_LENGTH="256",
                   EVAL_ROWS="30", PART_SIZE="1", NUM_PROC="1")

    def output():
        return {k: v for k, v in bucket_objects(env).items() if k.startswith("model-ready/")}

    prefix = model_ready_prefix(env)

    run_step("pretokenize.py", env)
    reference = output()
    manifest = json.loads(reference[f"{prefix}/_manifest.json"])
    assert [[part["rows"] for part in shard["parts"]] for shard in manifest["shards"]] == \
        [[2000 - 13 - 1, 2000 - 13 - 1, 500 - 4]]  # row groups of 2,000 rows; 30 held out, 3 dropped
    assert [d["source_row"] for d in dropped_lists(reference, prefix)] == [10, 299, 2100]
    assert [d["held_out"] for d in dropped_lists(reference, prefix)] == [False, True, False]
    assert (manifest["dropped"], manifest["eval_dropped"], manifest["eval_rows"]) == (3, 1, 29)
    evaluation = read_rows(reference, f"{prefix}/_eval")
    assert sorted(evaluation) == sorted(held_out(list(range(4500)), 30) - {299})
    assert [e["path"] for e in manifest["eval"]] == [f"_eval/shard-00000/part-0000{i}.parquet" for i in range(3)]

    shutil.rmtree(bucket / "model-ready")
    process = start_step("pretokenize.py", {**env, "NUM_PROC": "2"})
    for line in process.stdout:
        if "part shard-00000/part-00000:" in line:
            workers = descendants(process.pid)
            process.send_signal(signal.SIGKILL)
            break
    assert process.wait(timeout=60) == -signal.SIGKILL and workers
    assert not (bucket / prefix / "_manifest.json").exists()
    deadline = time.time() + 10
    while running(workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not running(workers), "a process of the killed run outlived it"
    # The next parts may have been committed between the line and the kill: resume from those on record.
    committed = len(list((bucket / prefix / "_parts").rglob("*.json")))
    assert committed >= 1
    result = run_step("pretokenize.py", {**env, "NUM_PROC": "2"})
    assert f"{3 - committed} of 3 parts to tokenize" in result.stdout
    assert output() == reference

    shutil.rmtree(bucket / "model-ready")
    nodes = [start_step("pretokenize.py", {**env, "SKYPILOT_NUM_NODES": "2",
                                           "SKYPILOT_NODE_RANK": str(rank)}) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "node 0 of 2: 2 of 2 parts" in outputs[0] and "node 1 of 2: 1 of 1 parts" in outputs[1]
    assert output() == reference

    # As if killed after parts 0 and 2 were committed: only part 1 is made again.
    (bucket / prefix / "_manifest.json").unlink()
    (bucket / prefix / "_parts" / "shard-00000" / "part-00001.json").unlink()
    kept = (bucket / prefix / "shard-00000" / "part-00000.parquet").stat().st_mtime_ns
    time.sleep(0.01)
    assert "1 of 3 parts to tokenize" in run_step("pretokenize.py", env).stdout
    assert (bucket / prefix / "shard-00000" / "part-00000.parquet").stat().st_mtime_ns == kept
    assert output() == reference
