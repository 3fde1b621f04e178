"""Shared fixtures: a real S3 server on loopback (moto), and running the steps as a user does."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = Path(os.environ.get("FIXTURES_DIR", ROOT.parent / "shared" / "fixtures"))
TEST_BUCKET = "test-bucket"
# Recognisable fake credentials: no output, log or object may ever contain them.
FAKE_KEY_ID = "FAKEKEYID0123456789"
FAKE_SECRET = "fake-secret-4f9c2e7b1a"


def fixture_path(*parts):
    """A real third-party file from FIXTURES_DIR, or a skip saying why it is missing."""
    path = FIXTURES_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: set FIXTURES_DIR to the shared fixtures to run this test")
    return path


UPLOADS_BEGAN = {}  # upload id -> when it began, as the in-process moto server lists it


def date_multipart_uploads():
    """moto lists every multipart upload as begun on one fixed day in 2010; a real server
    (and abort_stale_uploads, which tells a killed run's uploads from a live twin's) reports
    when each began. Make this in-process moto server do the same."""
    import re

    from moto.s3 import models, responses

    began = UPLOADS_BEGAN
    create, listing = models.FakeMultipart.__init__, responses.S3Response.list_multipart_uploads

    def create_and_date(self, *args, **kwargs):
        create(self, *args, **kwargs)
        date_upload(self.id)

    def list_with_dates(self):
        status, headers, body = listing(self)
        text = body.decode() if isinstance(body, bytes) else body
        text = re.sub(r"<UploadId>([^<]+)</UploadId>(.*?)<Initiated>[^<]*</Initiated>",
                      lambda m: f"<UploadId>{m[1]}</UploadId>{m[2]}<Initiated>"
                                f"{began.get(m[1], '2010-11-10T20:48:33.000Z')}</Initiated>",
                      text, flags=re.S)
        return status, headers, text.encode() if isinstance(body, bytes) else text

    models.FakeMultipart.__init__ = create_and_date
    responses.S3Response.list_multipart_uploads = list_with_dates


def date_upload(upload_id, seconds_ago=0):
    """Set when the moto server says a multipart upload began (to age one, as a killed run's)."""
    from datetime import datetime, timedelta, timezone

    began = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    UPLOADS_BEGAN[upload_id] = began.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    date_multipart_uploads()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def create_bucket(endpoint, name=TEST_BUCKET):
    # moto refuses CreateBucket in region "auto"; objects signed for "auto" work afterwards.
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id=FAKE_KEY_ID,
                 aws_secret_access_key=FAKE_SECRET).create_bucket(Bucket=name)


@pytest.fixture
def s3(s3_server):
    """Environment for a step that uses an empty bucket on the local S3 server."""
    requests.post(f"{s3_server}/moto-api/reset", timeout=30)
    create_bucket(s3_server)
    return {"BUCKET_NAME": TEST_BUCKET, "AWS_ENDPOINT_URL_S3": s3_server, "AWS_REGION": "auto",
            "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}


@pytest.fixture
def proxy(s3, s3_server):
    """The same bucket reached through a proxy that records every request."""
    from s3proxy import S3Proxy

    p = S3Proxy(int(s3_server.rsplit(":", 1)[1]))
    p.env = {**s3, "AWS_ENDPOINT_URL_S3": p.url}
    yield p
    p.close()


@pytest.fixture
def local_bucket(tmp_path):
    """Environment for a step that uses the local-directory backend."""
    return {"BUCKET_NAME": f"file://{tmp_path / 'bucket'}"}


def step_env(env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("AWS_", "BUCKET_", "DATASET_", "MODEL_", "HF_"))}
    return {**clean, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1", **env}


def run_step(script, env, *args, check=True, timeout=600):
    """Run one step as a user would: `python SCRIPT --flags` with settings in the environment."""
    result = subprocess.run([sys.executable, str(ROOT / script), *args], env=step_env(env),
                            cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def start_step(script, env, *args):
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], env=step_env(env),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def model_ready_prefix(env):
    """Where pretokenize.py writes, and dotrain.py reads, the model-ready data of env's settings:
    common.model_ready_location, from the manifests in env's bucket, as both steps compute it."""
    from unittest import mock

    import common

    names = [common.Setting("MODEL_NAME"), common.Setting("DATASET_NAME"), *common.DATA_SETTINGS]
    with mock.patch.dict(os.environ, {k: str(v) for k, v in step_env(env).items()}, clear=True):
        settings = common.parse_settings("", names, [])
        return common.model_ready_location(common.open_bucket(settings), settings)


def bucket_objects(env):
    """{key: bytes} of everything in the test bucket (S3) or the local bucket directory."""
    url = env["BUCKET_NAME"]
    if url.startswith("file://"):
        root = Path(url[len("file://"):])
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and not p.name.startswith(".")}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=TEST_BUCKET):
        for item in page.get("Contents", []):
            objects[item["Key"]] = client.get_object(Bucket=TEST_BUCKET, Key=item["Key"])["Body"].read()
    return objects


def descendants(pid):
    """Every process under pid (torchrun starts its workers in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def running(pids):
    """Those of the processes that still run (a zombie has ended)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def without_chatml_tokens(directory, chat_template=None):
    """A byte-level BPE tokenizer whose vocabulary has no <|im_start|> or <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["The sky is blue. What color is the sky?"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>",
                            chat_template=chat_template).save_pretrained(directory)
    return directory
