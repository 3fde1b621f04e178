"""Bad input and bad setup end in one line saying what is wrong and how to fix it; secrets
never leave the process: not in output, not in objects, not in local files."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from conftest import (FAKE_KEY_ID, FAKE_SECRET, ROOT, TEST_BUCKET, bucket_objects, run_step,
                      start_step, without_chatml_tokens)

sys.path.insert(0, str(ROOT / "demo"))
MODEL, DATASET = "tiny/qwen2", "synthetic/colors"
HF_TOKEN = "hf_FakeToken0123456789abcdefXYZ"
SECRETS = (FAKE_KEY_ID, FAKE_SECRET, HF_TOKEN)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny model, a small chat dataset, and what import-dataset and import-model make of
    them in a local bucket: {key: bytes} to copy into a test's bucket."""
    from synthetic import conversations, make_model, make_tokenizer

    tmp = tmp_path_factory.mktemp("bad-input")
    make_tokenizer(tmp / "tokenizer")
    model = Path(make_model(tmp / "model", tmp / "tokenizer"))
    dataset = tmp / "chat.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in conversations(40, seed=2)))
    env = {"BUCKET_NAME": f"file://{tmp / 'bucket'}", "MODEL_NAME": MODEL, "DATASET_NAME": DATASET}
    steps = [start_step("import-dataset.py", {**env, "DATASET_SOURCE": str(dataset),
                                              "SHARD_SIZE": "20"}),
             start_step("import-model.py", {**env, "MODEL_SOURCE": str(model)})]
    for step in steps:
        output = step.communicate(timeout=300)[0]
        assert step.returncode == 0, output
    return {"tmp": tmp, "model": model, "dataset": dataset,
            "objects": bucket_objects({"BUCKET_NAME": env["BUCKET_NAME"]})}


def s3_client(env):
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                        aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)


def upload(env, objects):
    client = s3_client(env)
    for key, data in objects.items():
        client.put_object(Bucket=TEST_BUCKET, Key=key, Body=data)


# ---------------------------------------------------------------- case setups: (env, made, tmp) -> env


def imported(env, made, tmp):
    upload(env, made["objects"])
    return env


def no_credentials(env, made, tmp):
    return {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS_KEY_ID")
            and k != "AWS_SECRET_ACCESS_KEY"} | {"HOME": str(tmp), "AWS_EC2_METADATA_DISABLED": "true"}


def wrong_key(env, made, tmp):
    from s3proxy import S3Proxy

    proxy = S3Proxy(int(env["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1]), key_id=FAKE_KEY_ID)
    return {**env, "AWS_ENDPOINT_URL_S3": proxy.url, "AWS_ACCESS_KEY_ID": "WRONGKEYID98765"}


def jsonl(rows):
    def setup(env, made, tmp):
        (tmp / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return {**env, "DATASET_SOURCE": str(tmp / "data.jsonl")}
    return setup


def corrupt_standardized_shard(env, made, tmp):
    imported(env, made, tmp)
    upload(env, {f"standardized/{DATASET}/shard-00001.parquet": b"not parquet at all " * 50})
    return env


def model_dir(change):
    def setup(env, made, tmp):
        directory = tmp / "model"
        shutil.copytree(made["model"], directory)
        change(directory)
        return {**env, "MODEL_SOURCE": str(directory)}
    return setup


def only_pickle(directory):
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")


def no_chat_template(env, made, tmp):
    env = model_dir(remove_template)(env, made, tmp)
    imported(env, made, {})
    run_step("import-model.py", {**env, "FORCE": "1"})
    return env


def remove_template(directory):
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def no_chatml_tokens(env, made, tmp):
    env = model_dir(lambda directory: without_chatml_tokens(directory, "{{ messages }}"))(env, made, tmp)
    imported(env, made, tmp)
    run_step("import-model.py", {**env, "FORCE": "1"})
    return env


def replaced_model_file(env, made, tmp):
    imported(env, made, tmp)
    key = f"models/{MODEL}/tokenizer.json"
    data = made["objects"][key]
    upload(env, {key: data.replace(b"<|im_end|>", b"<|im_END|>")})  # same size, other bytes
    return env


def full_disk(env, made, tmp):
    imported(env, made, tmp)
    cache = tmp / "small-disk"
    cache.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    return {**env, "MODEL_CACHE_DIR": str(cache)}


CASES = [  # (name, setup, step, env changes, what the message starts with or contains)
    ("no credentials", no_credentials, "import-dataset.py", {},
     "no credentials for the bucket: set AWS_ACCESS_KEY_ID"),
    ("wrong credentials", wrong_key, "import-model.py", {},
     f"access to bucket '{TEST_BUCKET}' denied: check AWS_ACCESS_KEY_ID"),
    ("no such bucket", None, "pretokenize.py", {"BUCKET_NAME": "no-such-bucket"},
     "bucket 'no-such-bucket' does not exist"),
    ("endpoint unreachable", None, "import-dataset.py", {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"},
     "cannot reach the storage endpoint"),
    ("dataset file not found", None, "import-dataset.py", {"DATASET_SOURCE": "/nonexistent/chat.jsonl"},
     "no such file: /nonexistent/chat.jsonl: fix DATASET_SOURCE"),
    ("dataset on an unreachable Hub", None, "import-dataset.py",
     {"DATASET_NAME": "someone/no-such-dataset"}, "cannot reach the Hugging Face Hub for someone/no-such-dataset"),
    ("model directory not found", None, "import-model.py", {"MODEL_SOURCE": "/nonexistent/model"},
     "no such directory: /nonexistent/model: fix MODEL_SOURCE"),
    # A gated model needs the Hub (GatedRepoError -> "is gated: accept its terms ... HF_TOKEN");
    # offline, what can be checked is that the Hub being out of reach is said so.
    ("model on an unreachable Hub", None, "import-model.py", {"MODEL_NAME": "meta-llama/Llama-3.1-8B"},
     "cannot reach the Hugging Face Hub for meta-llama/Llama-3.1-8B"),
    ("dataset in no known format", jsonl([{"question": "q", "answer": "a"}] * 5), "import-dataset.py", {},
     "cannot tell the chat format from the columns ['answer', 'question']: set FORMAT"),
    ("every row rejected", jsonl([{"conversations": [{"from": "human", "value": "hi"}]}] * 5),
     "import-dataset.py", {}, "5 of 5 rows dropped, more than MAX_REJECT_FRACTION=0.1: no assistant answer (5)"),
    ("corrupt standardized shard", corrupt_standardized_shard, "pretokenize.py", {},
     f"s3://{TEST_BUCKET}/standardized/{DATASET}/shard-00001.parquet is not a readable Parquet file"),
    ("pickle weights only", model_dir(only_pickle), "import-model.py", {}, "has only pickle weights"),
    ("tokenizer without a chat template", no_chat_template, "pretokenize.py", {},
     "the tokenizer in"),
    ("model file not matching its manifest", replaced_model_file, "pretokenize.py", {},
     f"s3://{TEST_BUCKET}/models/{MODEL}/tokenizer.json does not match the sha256 in its manifest"),
    ("SHARD_SIZE=0", None, "import-dataset.py", {"SHARD_SIZE": "0"},
     "SHARD_SIZE (or --shard-size) must be at least 1, not 0"),
    ("MAX_SEQ_LENGTH=-1", None, "pretokenize.py", {"MAX_SEQ_LENGTH": "-1"},
     "MAX_SEQ_LENGTH (or --max-seq-length) must be at least 1, not -1"),
    ("LORA_R=abc", None, "dotrain.py", {"LORA_R": "abc"}, "LORA_R (or --lora-r) must be a int, not 'abc'"),
    ("local disk full", full_disk, "pretokenize.py", {}, "local disk is full"),
    ("ChatML on a vocabulary without its tokens", no_chatml_tokens, "pretokenize.py",
     {"CHAT_TEMPLATE": "chatml"}, "CHAT_TEMPLATE=chatml needs <|im_start|> and <|im_end|> to be one "
     "token each"),
]


@pytest.mark.parametrize("name, setup, step, changes, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line_and_nothing_complete(s3, made, tmp_path, name, setup, step,
                                                         changes, message):
    env = {**s3, "MODEL_NAME": MODEL, "DATASET_NAME": DATASET, "DATASET_SOURCE": str(made["dataset"]),
           "MODEL_SOURCE": str(made["model"]), "MODEL_CACHE_DIR": str(tmp_path / "cache"),
           "HF_TOKEN": HF_TOKEN}
    if setup:
        env = setup(env, made, tmp_path)
    env = {**env, **changes}
    if "DATASET_NAME" in changes:
        env.pop("DATASET_SOURCE")
    if "MODEL_NAME" in changes:
        env.pop("MODEL_SOURCE")
    complete_before = complete_manifests(s3)
    began = time.time()
    try:
        result = run_step(step, env, check=False, timeout=120)
    finally:
        if setup is full_disk:
            subprocess.run(["umount", env["MODEL_CACHE_DIR"]], check=True)
    assert result.returncode == 1, result.stdout + result.stderr
    # Progress bars (tqdm, on stderr) may come before; the failure is one last line.
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert time.time() - began < 60
    new = complete_manifests(s3) - complete_before
    assert not [key for key in new if not key.startswith("raw/")], new  # a raw copy is a copy
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr


def complete_manifests(s3):
    return {key for key, data in bucket_objects(s3).items()
            if key.endswith("_manifest.json") and json.loads(data).get("complete")}


# ---------------------------------------------------------------- secrets


def test_no_secret_in_output_objects_or_local_files(s3, made, tmp_path):
    from s3proxy import S3Proxy

    env = {**s3, "MODEL_NAME": MODEL, "DATASET_NAME": DATASET, "DATASET_SOURCE": str(made["dataset"]),
           "MODEL_SOURCE": str(made["model"]), "HF_TOKEN": HF_TOKEN, "SHARD_SIZE": "20",
           "MODEL_CACHE_DIR": str(tmp_path / "cache"), "WORK_DIR": str(tmp_path / "work"),
           "TMPDIR": str(tmp_path / "tmp"), "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path / "home"),
           "MAX_SEQ_LENGTH": "128", "NUM_PROC": "1", "MAX_STEPS": "2", "BATCH_SIZE": "2",
           "GRAD_ACCUM": "1", "LORA_R": "4", "SAVE_STEPS": "1", "OMP_NUM_THREADS": "1", "EVAL_ROWS": "4",
           # an adapter strong enough in 2 steps for the 16-bit fused model to hold it
           "LEARNING_RATE": "1e-2", "WARMUP_STEPS": "0", "SAMPLE_PROMPT": "hi"}
    for folder in ("tmp", "home"):
        (tmp_path / folder).mkdir()
    proxy = S3Proxy(int(s3["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1]), key_id=FAKE_KEY_ID)
    results = []
    try:
        for step in ("import-dataset.py", "import-model.py", "pretokenize.py", "dotrain.py"):
            results.append(run_step(step, env))
        # Error paths, with tracebacks: a refused key, a bad setting, changed settings.
        results.append(run_step("pretokenize.py", {**env, "AWS_ENDPOINT_URL_S3": proxy.url,
                                                   "AWS_ACCESS_KEY_ID": FAKE_KEY_ID[::-1]},
                                "--debug", check=False))
        results.append(run_step("dotrain.py", {**env, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"},
                                "--debug", check=False))
        results.append(run_step("import-dataset.py", {**env, "SHARD_SIZE": "10"}, "--debug",
                                check=False))
        results.append(run_step("import-model.py", env, "--help"))
    finally:
        proxy.close()
    assert [r.returncode for r in results] == [0, 0, 0, 0, 1, 1, 1, 0]
    assert "Traceback" in results[4].stderr and "Traceback" in results[5].stderr
    secrets = SECRETS + (FAKE_KEY_ID[::-1],)
    for result in results:
        for secret in secrets:
            assert secret not in result.stdout + result.stderr, (secret, result.args)
    objects = bucket_objects(s3)
    assert any(key.startswith("done/") for key in objects)
    for key, data in objects.items():
        for secret in secrets:
            assert secret.encode() not in data, (secret, key)
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, (secret, path)
