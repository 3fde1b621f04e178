"""import-dataset.py: every format, the rejection rules, reruns, resume after SIGKILL, errors."""

import hashlib
import importlib.util
import io
import json
import os
import signal
import time

import boto3
import pyarrow.parquet as pq
import pytest
from conftest import (FAKE_KEY_ID, FAKE_SECRET, ROOT, TEST_BUCKET, bucket_objects, descendants,
                      fixture_path, run_step, running, start_step)

from demo import synthetic

spec = importlib.util.spec_from_file_location("import_dataset", ROOT / "import-dataset.py")
import_dataset = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_dataset)


def standardized(objects, name):
    """All standardized rows of a dataset, in order, from the bucket's objects."""
    manifest = json.loads(objects[f"standardized/{name}/_manifest.json"])
    rows = []
    for shard in manifest["shards"]:
        rows += pq.read_table(io.BytesIO(objects[f"standardized/{name}/{shard['path']}"])).to_pylist()
    return manifest, rows


def rejected(objects, name):
    lines = []
    for key in sorted(k for k in objects if k.startswith(f"standardized/{name}/_rejected/")):
        lines += [json.loads(line) for line in objects[key].splitlines()]
    return lines


def turn(role, content, weight=None, tool_calls=None, tool_call_id=None):
    """A standardized turn: assistant turns are trained (weight 1) unless weight=0 is given."""
    return {"role": role, "content": content,
            "weight": int(role == "assistant") if weight is None else weight,
            "tool_calls": tool_calls and json.dumps(tool_calls), "tool_call_id": tool_call_id}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("file, rows, first_roles", [
    ("fastchat_dummy_conversation.json", 500, ["user", "assistant"]),
    ("axolotl_conversation.json", 1, ["user", "assistant"]),
    ("llamafactory_alpaca_en_demo.json", 999, ["user", "assistant"]),
    ("llamafactory_kto_en_demo.json", 300, ["user", "assistant"]),
])
def test_real_datasets_in_every_format(s3, file, rows, first_roles):
    source = fixture_path("datasets", file)
    result = run_step("import-dataset.py", s3, "--dataset-name", "real/set",
                      "--dataset-source", str(source), "--shard-size", "400")
    assert FAKE_SECRET not in result.stdout + result.stderr
    objects = bucket_objects(s3)
    raw = json.loads(objects["raw/real/set/_manifest.json"])
    manifest, conversations = standardized(objects, "real/set")
    assert raw["complete"] and raw["rows"] == rows
    assert manifest["complete"]
    kept = manifest["rows"]
    dropped = sum(1 for r in rejected(objects, "real/set") if r["action"] == "dropped")
    assert kept + dropped == rows  # no row vanishes silently
    assert [t["role"] for t in conversations[0]["conversations"][:2]] == first_roles
    assert all(c["conversations"][-1]["role"] == "assistant" for c in conversations)
    assert [c["source_row"] for c in conversations] == sorted({c["source_row"] for c in conversations})


def test_raw_keeps_the_source_rows_unchanged(s3):
    source = fixture_path("datasets", "fastchat_dummy_conversation.json")
    run_step("import-dataset.py", s3, "--dataset-name", "d", "--dataset-source", str(source),
             "--shard-size", "300")
    objects = bucket_objects(s3)
    raw = [row for key in ("raw/d/shard-00000.parquet", "raw/d/shard-00001.parquet")
           for row in pq.read_table(io.BytesIO(objects[key])).to_pylist()]
    assert raw == json.loads(source.read_text())


def test_a_missing_assistant_turn_is_removed_and_listed(s3):
    source = fixture_path("datasets", "axolotl_conversation.missingturns.json")
    run_step("import-dataset.py", s3, "--dataset-name", "m", "--dataset-source", str(source))
    objects = bucket_objects(s3)
    manifest, rows = standardized(objects, "m")
    listed = rejected(objects, "m")
    original = json.loads(source.read_text())["conversations"]
    empty = [t for t in original if not t["value"].strip()]
    assert empty, "the fixture has an empty turn"
    if rows:
        assert all(t["content"].strip() for t in rows[0]["conversations"])
    assert listed and listed[0]["source_row"] == 0
    assert "empty turn removed" in listed[0]["reasons"]


def test_synthetic_formats_agree(s3, tmp_path):
    paths = synthetic.write_datasets(tmp_path, n=300)
    single_turn = []
    for name, path in paths.items():
        run_step("import-dataset.py", s3, "--dataset-name", f"syn/{name}",
                 "--dataset-source", str(path), "--shard-size", "120")
        manifest, rows = standardized(bucket_objects(s3), f"syn/{name}")
        assert manifest["rows"] == 300 and len(manifest["shards"]) == 3, name
        if name in ("alpaca", "prompt_completion", "csv"):
            single_turn.append([r["conversations"] for r in rows])
        else:
            sharegpt_like = [r["conversations"] for r in rows]
            expected = [[turn({"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]),
                               t["value"]) for t in c["conversations"]]
                        for c in synthetic.conversations(300)]
            assert sharegpt_like == expected, name
    assert single_turn[0] == single_turn[1] == single_turn[2]


# ---------------------------------------------------------------- rejection rules


def test_rejection_rules():
    convert = import_dataset.to_conversation
    clean = import_dataset.clean
    Rejected = import_dataset.Rejected

    turns = convert({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                                       {"from": "human", "value": "more?"}]}, "sharegpt")
    conversation, tools, changes = clean(turns)
    assert conversation == [turn("user", "hi"), turn("assistant", "yo")] and tools is None
    assert changes == ["turns after the last answer removed"]

    conversation, _, changes = clean(convert({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": "  "}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"}]}, "openai"))
    assert [t["role"] for t in conversation] == ["system", "user", "assistant"]
    assert conversation[0]["content"] == "be brief" and changes == ["empty turn removed"]

    assert clean(convert({"instruction": "Add", "input": "1+1", "output": "2", "system": "math"},
                         "alpaca"))[0] == [turn("system", "math"), turn("user", "Add\n\n1+1"),
                                           turn("assistant", "2")]
    assert clean(convert({"prompt": [{"role": "user", "content": "q"}],
                          "completion": [{"role": "assistant", "content": "a"}]},
                         "prompt_completion"))[0][1] == turn("assistant", "a")

    for row, fmt, reason in [
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
         "sharegpt", "unknown role 'robot'"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]},
         "sharegpt", "non-text value"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
         "sharegpt", "no assistant answer"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                       {"role": "assistant", "content": "a"}]}, "openai", "non-text content part"),
        ({"instruction": "q", "output": None}, "alpaca", "no assistant answer"),
    ]:
        with pytest.raises(Rejected, match=reason.replace("(", r"\(")):
            clean(convert(row, fmt))


WEATHER_CALL = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
# OpenAI's chat fine-tuning format: weights, tool calls with null content, tool results, tools.
OPENAI_FINE_TUNING = [
    {"messages": [{"role": "system", "content": "Be terse."},
                  {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Lyon.", "weight": 0},
                  {"role": "user", "content": "Really?"},
                  {"role": "assistant", "content": "Paris.", "weight": 1}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
                  {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
                  {"role": "assistant", "content": "21 degrees."}],
     "tools": [WEATHER_TOOL], "parallel_tool_calls": False},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                  {"role": "assistant", "content": "Hello", "weight": 0}]},
]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
USER_ASSISTANT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_openai_fine_tuning_files_keep_weights_tool_calls_and_tools(s3, tmp_path):
    source = write_jsonl(tmp_path / "ft.jsonl", OPENAI_FINE_TUNING)
    run_step("import-dataset.py", {**s3, "MAX_REJECT_FRACTION": "0.5"}, "--dataset-name", "ft",
             "--dataset-source", str(source))
    objects = bucket_objects(s3)
    manifest, rows = standardized(objects, "ft")
    assert manifest["rows"] == 2 and manifest["dropped"] == {"every assistant answer has weight 0": 1}
    assert rows[0]["conversations"] == [
        turn("system", "Be terse."), turn("user", "Capital of France?"),
        turn("assistant", "Lyon.", weight=0), turn("user", "Really?"), turn("assistant", "Paris.")]
    assert rows[1]["conversations"] == [
        turn("user", "Weather in Paris?"), turn("assistant", "", tool_calls=[CALL]),
        turn("tool", '{"temp": 21}', tool_call_id="call_1"), turn("assistant", "21 degrees.")]
    assert json.loads(rows[1]["tools"]) == [WEATHER_TOOL] and rows[0]["tools"] is None
    assert rejected(objects, "ft") == [{"source_row": 2, "action": "dropped",
                                        "reasons": ["every assistant answer has weight 0"]}]


@pytest.mark.parametrize("row, fmt, expected", [
    # kept: the roles of the conversation, or the tools it may call
    ({"messages": USER_ASSISTANT, "id": 7, "meta": {"x": None}}, "openai", ["user", "assistant"]),
    ({"messages": json.dumps(USER_ASSISTANT)}, "openai", ["user", "assistant"]),
    ({"messages": [json.dumps(m) for m in USER_ASSISTANT]}, "openai", ["user", "assistant"]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "text"}]},
                   {"role": "assistant", "content": "a", "weight": None, "extra": [1]}]},
     "openai", ["user", "assistant"]),
    ({"messages": [{"role": "user", "content": None}, *USER_ASSISTANT]}, "openai",
     ["user", "assistant"]),
    ({"messages": [{"role": "user", "content": "q", "weight": 1},
                   {"role": "assistant", "content": "a", "weight": True}]}, "openai",
     ["user", "assistant"]),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
      "tool_calls": [{"name": "f", "arguments": None}]}]}, "openai", ["user", "assistant"]),
    ({"messages": USER_ASSISTANT, "tools": json.dumps([WEATHER_TOOL])}, "openai", [WEATHER_TOOL]),
    ({"messages": USER_ASSISTANT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": None}}]}, "openai", [{"type": "function", "function": {"name": "f"}}]),
    ({"conversations": json.dumps([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}])},
     "sharegpt", ["user", "assistant"]),
    ({"prompt": [json.dumps({"role": "user", "content": "q"})], "completion": "a"},
     "prompt_completion", ["user", "assistant"]),
    # rejected, with the reason
    ({"messages": None}, "openai", "no assistant answer"),
    ({"messages": "not json"}, "openai", "messages are not a list"),
    ({"messages": {"role": "user"}}, "openai", "messages are not a list"),
    ({"messages": [5, {"role": "assistant", "content": "a"}]}, "openai", "a message is not an object"),
    ({"messages": ["{broken", {"role": "assistant", "content": "a"}]}, "openai",
     "a message is not an object"),
    ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}, "openai",
     "unknown role None"),
    ({"messages": [{"role": "user", "content": {"text": "q"}}, {"role": "assistant", "content": "a"}]},
     "openai", "non-text value"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}, "x"]},
                   {"role": "assistant", "content": "a"}]}, "openai", "non-text content part"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                      "weight": 2}]}, "openai", "weight 2, not 0 or 1"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                      "weight": "1"}]}, "openai", "weight '1', not 0 or 1"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                                                      "tool_calls": {"name": "f"}}]},
     "openai", "tool_calls is not a list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                                                      "tool_calls": [{"function": {}}]}]},
     "openai", "a tool call without a function name"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
      "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}]},
     "openai", "tool call arguments that are not a JSON object"),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": [WEATHER_CALL]},
                   {"role": "assistant", "content": "a"}]}, "openai", "tool calls in a user turn"),
    ({"messages": USER_ASSISTANT, "tools": "nothing"}, "openai", "tools is not a list of objects"),
    ({"conversations": [{"from": "human", "value": "q"}, "gpt: a"]}, "sharegpt",
     "a message is not an object"),
    ({"conversations": 3}, "sharegpt", "messages are not a list"),
    ({"instruction": ["q"], "input": {"x": 1}, "output": "a"}, "alpaca", "non-text value"),
    ({"prompt": 1.5, "completion": "a"}, "prompt_completion", "non-text value"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [None]}, "prompt_completion",
     "a message is not an object"),
])
def test_odd_row_shapes_are_kept_or_rejected_with_a_reason(row, fmt, expected):
    try:
        conversation, tools, _ = import_dataset.standardized_row(row, fmt)
    except import_dataset.Rejected as reason:
        assert str(reason) == expected
        return
    if isinstance(expected[0], dict):
        assert json.loads(tools) == expected
    else:
        assert [t["role"] for t in conversation] == expected


def test_odd_rows_in_one_file_import_without_a_traceback(s3, tmp_path):
    """Shapes that vary from row to row, in one JSONL file: each row is kept or listed."""
    rows = OPENAI_FINE_TUNING + [
        {"messages": USER_ASSISTANT, "tools": None},
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": ["a"]}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                         "weight": 2}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
          "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]},
        {"messages": USER_ASSISTANT, "tools": [{"type": "function", "function": {"name": "g"}}],
         "extra": {"nested": [1, None]}},
    ]
    source = write_jsonl(tmp_path / "odd.jsonl", rows)
    result = run_step("import-dataset.py", {**s3, "MAX_REJECT_FRACTION": "0.5"}, "--dataset-name",
                      "odd", "--dataset-source", str(source))
    assert "Traceback" not in result.stdout + result.stderr
    objects = bucket_objects(s3)
    manifest, kept = standardized(objects, "odd")
    listed = {line["source_row"]: line["reasons"] for line in rejected(objects, "odd")
              if line["action"] == "dropped"}
    assert manifest["rows"] + len(listed) == len(rows)
    assert listed == {2: ["every assistant answer has weight 0"], 4: ["non-text content part"],
                      5: ["weight 2, not 0 or 1"], 6: ["tool call arguments that are not a JSON object"]}
    assert [r["source_row"] for r in kept] == [0, 1, 3, 7]


def test_rejected_rows_are_counted_and_listed(s3, tmp_path):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    rows = [good] * 18 + [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                           {"from": "human", "value": "left over"}]},
    ]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    run_step("import-dataset.py", s3, "--dataset-name", "r", "--dataset-source", str(source),
             "--shard-size", "8")
    objects = bucket_objects(s3)
    manifest, kept = standardized(objects, "r")
    assert manifest["complete"] and manifest["rows"] == 19
    assert manifest["dropped"] == {"unknown role 'robot'": 1}
    assert manifest["shards"][2]["altered"] == {"turns after the last answer removed": 1}
    assert rejected(objects, "r") == [
        {"source_row": 18, "action": "dropped", "reasons": ["unknown role 'robot'"]},
        {"source_row": 19, "action": "altered", "reasons": ["turns after the last answer removed"]},
    ]
    assert [r["source_row"] for r in kept] == list(range(20))[:18] + [19]


def test_too_many_rejects_fail_and_keep_the_raw_copy(s3, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "q"}]}] * 3 + \
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}] * 7
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    result = run_step("import-dataset.py", s3, "--dataset-name", "bad", "--dataset-source",
                      str(source), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: 3 of 10 rows dropped, more than MAX_REJECT_FRACTION=0.1: no assistant answer (3)")
    assert "Traceback" not in result.stderr
    objects = bucket_objects(s3)
    assert json.loads(objects["raw/bad/_manifest.json"])["complete"]
    assert not json.loads(objects["standardized/bad/_manifest.json"])["complete"]
    run_step("import-dataset.py", {**s3, "MAX_REJECT_FRACTION": "0.5"}, "--dataset-name", "bad",
             "--dataset-source", str(source))
    assert json.loads(bucket_objects(s3)["standardized/bad/_manifest.json"])["complete"]


# ---------------------------------------------------------------- reruns and resume


def test_rerun_of_a_finished_import_writes_nothing(proxy, tmp_path):
    source = synthetic.write_datasets(tmp_path, n=200)["sharegpt"]
    args = ("--dataset-name", "d", "--dataset-source", str(source), "--shard-size", "64")
    run_step("import-dataset.py", proxy.env, *args)
    assert proxy.writes(), "the first run goes through the proxy"
    proxy.clear()
    result = run_step("import-dataset.py", proxy.env, *args)
    assert proxy.writes() == []
    assert "nothing to do" in result.stdout


def test_local_directory_backend_writes_the_same_shards(s3, local_bucket, tmp_path):
    source = synthetic.write_datasets(tmp_path, n=150)["openai"]
    args = ("--dataset-name", "d", "--dataset-source", str(source), "--shard-size", "100")
    run_step("import-dataset.py", s3, *args)
    run_step("import-dataset.py", local_bucket, *args)
    assert bucket_objects(local_bucket) == bucket_objects(s3)


def test_sigkill_after_the_second_shard_then_rerun_gives_identical_shards(s3, tmp_path):
    source = tmp_path / "big.jsonl"
    rows = [r for i in range(8) for r in synthetic.conversations(2500, seed=i, turns=(2, 4))]
    write_jsonl(source, rows)
    args = ("--dataset-name", "k", "--dataset-source", str(source), "--shard-size", "1500")
    killed = {**s3, "BUCKET_NAME": "s3://test-bucket/killed"}
    clean = {**s3, "BUCKET_NAME": "s3://test-bucket/clean"}

    process = start_step("import-dataset.py", killed, *args)
    for line in process.stdout:
        if "raw shard shard-00001.parquet" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    partial = json.loads(bucket_objects(s3)["killed/raw/k/_manifest.json"])
    assert not partial["complete"] and len(partial["shards"]) in (2, 3)

    resumed = run_step("import-dataset.py", killed, *args)
    assert "resuming" in resumed.stdout
    run_step("import-dataset.py", clean, *args)
    objects = bucket_objects(s3)
    after_kill = {k[len("killed/"):]: v for k, v in objects.items() if k.startswith("killed/")}
    uninterrupted = {k[len("clean/"):]: v for k, v in objects.items() if k.startswith("clean/")}
    assert len([k for k in uninterrupted if k.startswith("raw/k/shard-")]) == 14
    assert after_kill == uninterrupted


def test_one_or_two_processes_and_a_kill_make_the_same_standardized_bytes(s3, tmp_path):
    """Standardization in NUM_PROC processes: row groups in parallel, written in order. Two
    shards of several row groups, with dropped and altered rows in both."""
    rows = synthetic.conversations(4500, seed=4)
    for at in (10, 2222, 4497):
        rows[at] = {"conversations": [{"from": "human", "value": "Nobody answers."}]}
    rows[1500]["conversations"].append({"from": "human", "value": "left over"})
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    args = ("--dataset-name", "p", "--dataset-source", str(source), "--shard-size", "3000")

    def output(prefix):
        return {k[len(prefix) + 1:]: v for k, v in bucket_objects(s3).items() if k.startswith(prefix + "/")}

    run_step("import-dataset.py", {**s3, "BUCKET_NAME": "s3://test-bucket/one", "NUM_PROC": "1"}, *args)
    run_step("import-dataset.py", {**s3, "BUCKET_NAME": "s3://test-bucket/two", "NUM_PROC": "2"}, *args)
    one = output("one")
    assert output("two") == one
    manifest, kept = standardized(one, "p")
    assert manifest["rows"] == len(kept) == 4497 and manifest["dropped"] == {"no assistant answer": 3}
    assert [r["source_row"] for r in rejected(one, "p")] == [10, 1500, 2222, 4497]

    # Killed while its workers standardize: they go too, and the rerun ends with the same bytes.
    killed = {**s3, "BUCKET_NAME": "s3://test-bucket/killed", "NUM_PROC": "2"}
    process = start_step("import-dataset.py", killed, *args)
    for line in process.stdout:
        if "raw/p complete" in line:
            break
    while len(workers := descendants(process.pid)) < 3 and process.poll() is None:
        time.sleep(0.02)  # a resource tracker and two workers
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    deadline = time.time() + 10
    while running(workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not running(workers), "a process of the killed run outlived it"
    run_step("import-dataset.py", killed, *args)
    assert output("killed") == one


def test_changed_settings_are_refused_unless_forced(s3, tmp_path):
    source = synthetic.write_datasets(tmp_path, n=100)["sharegpt"]
    args = ("--dataset-name", "d", "--dataset-source", str(source))
    run_step("import-dataset.py", s3, *args, "--shard-size", "50")
    result = run_step("import-dataset.py", s3, *args, "--shard-size", "40", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: s3://test-bucket/raw/d was made with other inputs")
    assert "shard_size: 50 -> 40" in message and "FORCE=1" in message
    run_step("import-dataset.py", {**s3, "FORCE": "1"}, *args, "--shard-size", "40")
    raw = json.loads(bucket_objects(s3)["raw/d/_manifest.json"])
    assert raw["complete"] and [s["rows"] for s in raw["shards"]] == [40, 40, 20]
    assert "raw/d/shard-00002.parquet" in bucket_objects(s3)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_source_edited_in_place_to_the_same_size_is_not_taken_for_the_one_imported(s3, tmp_path,
                                                                                       where):
    """Files are known by their content: a local file by its sha256, an s3:// object by its
    ETag. An edit that keeps the size (and, locally, the modification time, as `cp -p` or a
    restore from a backup does) is other inputs, refused as any changed input is."""
    data = "".join(json.dumps(r) + "\n" for r in synthetic.conversations(30, seed=8)).encode()
    edited = data.replace(b" blue", b" pink")
    assert edited != data and len(edited) == len(data)
    path = tmp_path / "d.jsonl"
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)

    def write_source(content):
        if where == "s3":
            return client.put_object(Bucket=TEST_BUCKET, Key="sources/d.jsonl", Body=content)["ETag"]
        mtime = path.stat().st_mtime_ns if path.exists() else None
        path.write_bytes(content)
        if mtime is not None:
            os.utime(path, ns=(mtime, mtime))
        return hashlib.sha256(content).hexdigest()

    source = f"s3://{TEST_BUCKET}/sources/d.jsonl" if where == "s3" else str(path)
    args = ("--dataset-name", "d", "--dataset-source", source)
    fingerprint = write_source(data)
    run_step("import-dataset.py", s3, *args)
    files = json.loads(bucket_objects(s3)["raw/d/_manifest.json"])["inputs"]["files"]
    key = "etag" if where == "s3" else "sha256"
    assert files == [{"path": source, "size": len(data), key: fingerprint.strip('"')}]

    write_source(edited)
    result = run_step("import-dataset.py", s3, *args, check=False)
    assert result.returncode == 1 and "nothing to do" not in result.stdout
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: s3://{TEST_BUCKET}/raw/d was made with other inputs (files: ")
    assert "FORCE=1" in message
    run_step("import-dataset.py", {**s3, "FORCE": "1"}, *args)
    _, rows = standardized(bucket_objects(s3), "d")
    answers = [t["content"] for r in rows for t in r["conversations"] if t["role"] == "assistant"]
    assert any(" pink." in a for a in answers) and not any(" blue." in a for a in answers)


# ---------------------------------------------------------------- expected failures


def unreachable_endpoint():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("change, args, expected", [
    ({"BUCKET_NAME": "no-such-bucket"}, (), "error: bucket 'no-such-bucket' does not exist"),
    ({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
      "AWS_CONFIG_FILE": "/nonexistent"}, (), "error: no credentials for the bucket"),
    ({"AWS_ENDPOINT_URL_S3": "UNREACHABLE"}, (), "error: cannot reach the storage endpoint"),
    ({"BUCKET_NAME": ""}, (), "error: BUCKET_NAME is not set"),
    ({}, ("--shard-size", "0"), "error: SHARD_SIZE (or --shard-size) must be at least 1, not 0"),
    ({"SHARD_SIZE": "abc"}, (), "error: SHARD_SIZE (or --shard-size) must be a int, not 'abc'"),
    ({"FORMAT": "xml"}, (), "error: FORMAT (or --format) must be one of"),
    ({}, ("--dataset-source", "/nonexistent/data.jsonl"), "error: no such file: /nonexistent/data.jsonl"),
    ({}, ("--dataset-source", "someone/missing-dataset"), "error: cannot reach the Hugging Face Hub"),
    ({}, ("--no-such-flag",), "error: unrecognized arguments: --no-such-flag"),
    ({}, ("--dataset-source", "COLUMNS"), "error: cannot tell the chat format from the columns"),
])
def test_expected_failures_print_one_line(s3, tmp_path, change, args, expected):
    env = {**s3, "DATASET_NAME": "d", **change}
    if env["AWS_ENDPOINT_URL_S3"] == "UNREACHABLE":
        env["AWS_ENDPOINT_URL_S3"] = unreachable_endpoint()
    if "COLUMNS" in args:
        args = ("--dataset-source", str(write_jsonl(tmp_path / "x.jsonl", [{"text": "t", "score": 1}])))
    started = time.monotonic()
    result = run_step("import-dataset.py", env, *args, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
    assert FAKE_SECRET not in result.stdout + result.stderr
    assert time.monotonic() - started < 60


def test_debug_shows_the_traceback(s3):
    result = run_step("import-dataset.py", {**s3, "BUCKET_NAME": "no-such-bucket"}, "--debug",
                      "--dataset-name", "d", check=False)
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_help_lists_every_setting_with_its_variable_and_default():
    result = run_step("import-dataset.py", {}, "--help")
    for setting in import_dataset.SETTINGS:
        assert setting.env in result.stdout
    assert "--shard-size" in result.stdout and "5000000" in result.stdout
    assert "BUCKET_NAME" in result.stdout and "AWS_SECRET_ACCESS_KEY" in result.stdout


def test_help_and_the_readme_list_every_format():
    (setting,) = [s for s in import_dataset.SETTINGS if s.env == "FORMAT"]
    (line,) = [line for line in run_step("import-dataset.py", {}, "--help").stdout.splitlines()
               if line.strip().startswith("FORMAT ")]
    (row,) = [row for row in (ROOT / "README.md").read_text().splitlines()
              if row.startswith("| `FORMAT` |")]
    for value in setting.choices:
        assert value in line.split("default:")[1].split(None, 1)[1], (value, line)
        assert value in row.split("|")[5], (value, row)
