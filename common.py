"""What the four steps share: settings, the bucket, its paths and manifests, errors.

Every step is a pure function from objects in the bucket to objects in the bucket.
A step's output prefix counts as done only when its `_manifest.json`, written last,
says `"complete": true` and was made from the same inputs as the current run.
"""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://t3.storage.dev"
MANIFEST = "_manifest.json"
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "WANDB_API_KEY", "SERVE_API_KEY")
STEPS = ("import-dataset", "import-model", "pretokenize", "dotrain")
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


class UserError(Exception):
    """An expected failure; its message says what is wrong and how to fix it."""


class Conflict(Exception):
    """A conditional write lost: someone else wrote the object first."""


# ---------------------------------------------------------------- settings


@dataclass
class Setting:
    """One setting: an environment variable, overridden by its --kebab-case flag."""

    env: str
    default: object = None
    help: str = ""
    type: type = str
    required: bool = False
    secret: bool = False  # environment only: a flag would show in `ps` and shell history
    minimum: float = None
    choices: tuple = None

    @property
    def flag(self):
        return "--" + self.env.lower().replace("_", "-")

    @property
    def attr(self):
        return self.env.lower()

    def convert(self, text):
        where = f"{self.env} (or {self.flag})" if not self.secret else self.env
        if self.type is bool:
            if text.strip().lower() not in TRUE + FALSE:
                raise UserError(f"{where} must be 1 or 0, not {text!r}")
            return text.strip().lower() in TRUE
        try:
            value = self.type(text)
        except ValueError:
            raise UserError(f"{where} must be a {self.type.__name__}, not {text!r}") from None
        if self.minimum is not None and value < self.minimum:
            raise UserError(f"{where} must be at least {self.minimum}, not {text}")
        if self.choices and value not in self.choices:
            raise UserError(f"{where} must be one of {', '.join(self.choices)}, not {text!r}")
        return value


SHARED_SETTINGS = [
    Setting("BUCKET_NAME", help="where everything lives: NAME (= s3://NAME), s3://NAME/PREFIX, "
            "or a local directory / file:///dir for debugging without a network", required=True),
    Setting("AWS_ACCESS_KEY_ID", help="access key of the bucket", secret=True),
    Setting("AWS_SECRET_ACCESS_KEY", help="secret key of the bucket", secret=True),
    Setting("AWS_ENDPOINT_URL_S3", None, "S3 endpoint (falls back to AWS_ENDPOINT_URL, "
            f"then {DEFAULT_ENDPOINT}, Tigris)"),
    Setting("AWS_REGION", "auto", "region to sign requests for (Tigris: auto)"),
    Setting("S3_TIMEOUT", 60, "seconds a silent S3 connection or read waits before botocore "
            "retries it", int, minimum=1),
    Setting("STALE_UPLOAD_SECONDS", 300, "an unfinished multipart upload under a step's output "
            "begun this long before the step started is taken for a killed run's and aborted; a "
            "younger one may be a run launched beside this one and is left to it", int, minimum=0),
    Setting("FORCE", False, "replace an output made from other inputs (changed settings or "
            "data); an output made from the current inputs is kept, resumed or skipped", bool),
    Setting("REBUILD", "", "rebuild these steps' outputs although made from the current inputs "
            f"(e.g. a damaged object): comma-separated, from {', '.join(STEPS)} or all; once "
            "per SKYPILOT_TASK_ID"),
    Setting("SKYPILOT_TASK_ID", None, "this launch's id, set by SkyPilot, the same across the "
            "recoveries of a managed job: REBUILD happens once per id"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see --help)")


def parse_settings(description, settings, argv=None):
    """Read every setting from its flag, else its environment variable, else its default."""
    settings = SHARED_SETTINGS + settings
    lines = ["settings (a flag overrides its environment variable):"]
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for s in settings:
        default = "set" if s.secret and os.environ.get(s.env) else s.default
        lines.append(f"  {s.env:<24} {'(env only)' if s.secret else s.flag:<24} "
                     f"default: {default!s:<12} {s.help}"
                     + (f" [one of: {', '.join(s.choices)}]" if s.choices else ""))
        if s.secret:
            continue
        if s.type is bool:
            parser.add_argument(s.flag, dest=s.attr, nargs="?", const="1", metavar="0|1",
                                help=argparse.SUPPRESS)
        else:
            parser.add_argument(s.flag, dest=s.attr, metavar=s.env, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.epilog = "\n".join(lines)
    args = parser.parse_args(argv)
    for s in settings:
        text = None if s.secret else getattr(args, s.attr)
        if text is None:
            text = os.environ.get(s.env)
        if text is None or text == "":  # an empty variable (`NAME=` in .env) means unset
            if s.required:
                raise UserError(f"{s.env} is not set: set it in the environment (.env) "
                                f"or pass {s.flag}")
            value = s.default
        else:
            value = s.convert(text)
        setattr(args, s.attr, value)
    return args


def redact(text):
    for name in SECRETS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def log(message):
    print(redact(f"[{time.strftime('%H:%M:%S')}] {message}"), flush=True)


RETRY_EXIT = 75  # (EX_TEMPFAIL) a failure that a rerun on a fresh machine can fix


def run(main):
    """Run a step's main(): expected failures end with one `error:` line and exit 1; failures
    that a retry can fix (retryable) exit RETRY_EXIT, which a managed job restarts on."""
    debug = "--debug" in sys.argv
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the one place that turns failures into messages
        message = explain(e)
        if debug or message is None:
            sys.stderr.write(redact("".join(traceback.format_exception(e))))
        if message is not None:
            sys.stderr.write(redact(f"error: {message}\n"))
        if not retryable(e):
            sys.exit(1)
        if os.environ.get("RETRY_FLAG"):  # torchrun exits 1 whatever its processes exit with
            open(os.environ["RETRY_FLAG"], "a").close()
        sys.exit(RETRY_EXIT)


def retryable(error):
    """Whether a failure comes from the machine or the network rather than from the settings,
    the data or the code: the storage out of reach after botocore's retries (it was reached
    when the step began), a GPU fault, a collective that failed (a peer died). These fail
    differently on a fresh machine; all else fails the same way every time."""
    import botocore.exceptions as bex

    storage = (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
               bex.ConnectionClosedError)
    if isinstance(error, storage):
        return Bucket.reached
    text = str(error)
    if type(error).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError"):
        return True
    return isinstance(error, RuntimeError) and ("CUDA error" in text or "NCCL" in text) \
        and "out of memory" not in text


def explain(error):
    """The one-line message for an expected failure, or None for a bug."""
    import botocore.exceptions as bex

    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, bex.NoCredentialsError):
        return ("no credentials for the bucket: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(for sky launch: --secret-file .secrets)")
    if isinstance(error, (bex.EndpointConnectionError, bex.ConnectTimeoutError)):
        return (f"cannot reach the storage endpoint {getattr(error, 'kwargs', {}).get('endpoint_url', '')}: "
                "check AWS_ENDPOINT_URL_S3 (Tigris: https://t3.storage.dev) and the network")
    if isinstance(error, OSError) and error.errno == 28:
        return f"local disk is full ({error.filename or 'no space left on device'}): free space or use a bigger disk"
    return None


# ---------------------------------------------------------------- storage


def s3_config(settings):
    """The one place that builds the S3 client settings, for s3fs and boto3 alike."""
    endpoint = (settings.aws_endpoint_url_s3 or os.environ.get("AWS_ENDPOINT_URL")
                or DEFAULT_ENDPOINT)
    host = urlparse(endpoint).hostname or ""
    # Tigris asks for virtual-hosted addressing; botocore would use path style for a custom
    # endpoint. A loopback test server only understands path style.
    addressing = "path" if host in ("localhost", "127.0.0.1", "::1") else "virtual"
    config = {
        "s3": {"addressing_style": addressing},
        "retries": {"max_attempts": 10, "mode": "adaptive"},
        "connect_timeout": min(10, settings.s3_timeout),
        "read_timeout": settings.s3_timeout,
    }
    credentials = {}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        credentials = {"key": os.environ["AWS_ACCESS_KEY_ID"],
                       "secret": os.environ.get("AWS_SECRET_ACCESS_KEY")}
    return endpoint, settings.aws_region, config, credentials


def storage_options(settings):
    """fsspec/s3fs storage options (also what `datasets` takes as storage_options)."""
    endpoint, region, config, credentials = s3_config(settings)
    return {**credentials, "endpoint_url": endpoint, "client_kwargs": {"region_name": region},
            "config_kwargs": config, "skip_instance_cache": True, "use_listings_cache": False}


def boto3_client(settings, attempts=None):
    import boto3
    from botocore.config import Config

    endpoint, region, config, credentials = s3_config(settings)
    if attempts:
        config["retries"]["max_attempts"] = attempts
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=Config(**config),
                        aws_access_key_id=credentials.get("key"),
                        aws_secret_access_key=credentials.get("secret"))


class Bucket:
    """The bucket (or a local directory), addressed by keys relative to its root."""

    reached = False  # whether this process has reached the storage once (check() passed)

    def __init__(self, settings):
        url = settings.bucket_name.rstrip("/")
        parsed = urlparse(url)
        self.manifest_etags = {}  # prefix -> ETag of its manifest as this process last saw it
        if parsed.scheme in ("", "file") and (parsed.scheme == "file" or "/" in url or url.startswith(".")):
            import fsspec

            self.root = os.path.abspath(parsed.path if parsed.scheme == "file" else url)
            self.fs = fsspec.filesystem("file")
            self.storage_options = {}
            self.is_local = True
            os.makedirs(self.root, exist_ok=True)
        else:
            import s3fs

            if parsed.scheme not in ("", "s3"):
                raise UserError(f"BUCKET_NAME {url!r} is neither a bucket name, s3://NAME[/PREFIX] "
                                "nor a local directory")
            self.name = parsed.netloc if parsed.scheme == "s3" else url
            self.root = f"{self.name}/{parsed.path.strip('/')}".rstrip("/") if parsed.netloc else url
            self.storage_options = storage_options(settings)
            self.fs = s3fs.S3FileSystem(**self.storage_options)
            self.settings = settings
            self.is_local = False

    def __str__(self):
        return self.root if self.is_local else f"s3://{self.root}"

    def path(self, key):
        """The filesystem path of a key (what self.fs takes)."""
        return f"{self.root}/{key}".rstrip("/")

    def url(self, key):
        """The URL of a key (what datasets and pyarrow take with storage_options)."""
        return self.path(key) if self.is_local else f"s3://{self.path(key)}"

    @property
    def client(self):
        if getattr(self, "_client", None) is None:
            self._client = boto3_client(self.settings)
        return self._client

    def key_of(self, key):
        """The S3 object key (without the bucket name) of a key relative to the root."""
        return self.path(key).split("/", 1)[1]

    def check(self):
        """Fail early, in one line, when the bucket cannot be used."""
        if self.is_local:
            return
        import botocore.exceptions as bex

        try:
            # Few attempts: an unreachable endpoint or a missing bucket should fail in seconds.
            response = boto3_client(self.settings, attempts=2).head_bucket(Bucket=self.name)
            # The server's clock, to tell uploads begun before this run (abort_stale_uploads)
            # and a lease's age (now).
            self.opened_at = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
            self.opened_monotonic = time.monotonic()
        except bex.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            if code in ("404", "NoSuchBucket"):
                raise UserError(f"bucket {self.name!r} does not exist at "
                                f"{self.storage_options['endpoint_url']}: create it "
                                f"(aws s3 mb s3://{self.name}) or fix BUCKET_NAME") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise UserError(f"access to bucket {self.name!r} denied: check AWS_ACCESS_KEY_ID "
                                "and AWS_SECRET_ACCESS_KEY, and that the key may use this bucket") from None
            raise

    def now(self):
        """The bucket's clock: the server's time when check() reached it, plus the time since on
        this machine's monotonic clock (a local directory: this machine's clock). Machines whose
        clocks disagree agree on this one, to a second."""
        if self.is_local:
            return datetime.now(timezone.utc)
        return self.opened_at + timedelta(seconds=time.monotonic() - self.opened_monotonic)

    def exists(self, key):
        return self.fs.exists(self.path(key))

    def get(self, key):
        """The object's bytes, or None if there is none."""
        try:
            return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            return None

    def get_with_etag(self, key):
        """The object's bytes and the ETag of exactly those bytes, or (None, None)."""
        if self.is_local:
            data = self.get(key)
            return (None, None) if data is None else (data, hashlib.md5(data).hexdigest())
        try:
            response = self.client.get_object(Bucket=self.name, Key=self.key_of(key))
        except self.client.exceptions.NoSuchKey:
            return None, None
        return response["Body"].read(), response["ETag"]

    def put(self, key, data, if_none_match=False, if_match=None):
        """Write a whole object in one request; a lost condition raises Conflict."""
        if self.is_local:
            return self._put_local(key, data, if_none_match, if_match)
        condition = {"IfMatch": if_match} if if_match else {}
        try:
            response = self.fs.pipe_file(self.path(key), data,
                                         mode="create" if if_none_match else "overwrite", **condition)
            return response["ETag"]
        except FileExistsError:
            raise Conflict(key) from None
        except OSError as e:
            if "PreconditionFailed" in str(e.__cause__) or "412" in str(e.__cause__):
                raise Conflict(key) from None
            raise

    def etag(self, key):
        if self.is_local:
            return hashlib.md5(self.get(key)).hexdigest()
        return self.fs.info(self.path(key))["ETag"].strip('"')

    def _put_local(self, key, data, if_none_match, if_match):
        import fcntl

        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(os.path.join(self.root, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if if_none_match and os.path.exists(path):
                raise Conflict(key)
            if if_match and (not os.path.exists(path) or self.etag(key) != if_match.strip('"')):
                raise Conflict(key)
            with self.writer(key) as f:
                f.write(data)
            return hashlib.md5(data).hexdigest()

    @contextlib.contextmanager
    def writer(self, key):
        """A file to stream an object into; it appears whole at the end, or not at all."""
        path = self.path(key)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
            try:
                with os.fdopen(fd, "wb") as f:
                    yield f
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        # s3fs sends the parts of a multipart upload as they fill and completes it on close;
        # an upload that is discarded (or killed) never becomes visible.
        f = self.fs.open(path, "wb", block_size=8 * 2**20)
        try:
            yield f
        except BaseException:
            f.discard()
            f.closed = True  # so that garbage collection does not commit what was discarded
            raise
        f.close()

    def upload(self, local_path, key):
        """Stream a local file into an object; it appears whole or not at all.

        boto3's transfer manager reads and sends up to 10 parts at once, as `aws s3 sync` does
        (bench/transfer.py)."""
        if self.is_local:
            with open(local_path, "rb") as source, self.writer(key) as f:
                shutil.copyfileobj(source, f, 8 * 2**20)
            return
        from boto3.s3.transfer import TransferConfig

        self.client.upload_file(local_path, self.name, self.key_of(key), Config=TransferConfig(
            multipart_chunksize=8 * 2**20, max_concurrency=10))

    def download(self, key, local_path):
        self.fs.get_file(self.path(key), local_path)

    def delete_prefix(self, prefix, mine=None):
        """Remove everything under a prefix, its manifest first so it never looks done; or, where
        other outputs nest under it, only the entries whose name `mine(name)` accepts."""
        if self.exists(f"{prefix}/{MANIFEST}"):
            self.fs.rm(self.path(f"{prefix}/{MANIFEST}"))
        if not self.fs.exists(self.path(prefix)):
            return
        if mine is None:
            self.fs.rm(self.path(prefix), recursive=True)
            return
        for entry in self.fs.ls(self.path(prefix), detail=False):
            if mine(entry.rstrip("/").rsplit("/", 1)[-1]):
                self.fs.rm(entry, recursive=True)


def open_bucket(settings):
    bucket = Bucket(settings)
    bucket.check()
    Bucket.reached = True
    return bucket


# ---------------------------------------------------------------- worker processes


def in_order(function, tasks, workers, preload=()):
    """function(task) of each task, in the order of the tasks, computed by worker processes.

    The tasks are taken from their iterator as workers free up, at most two a worker in flight
    (each worker has the next task queued while this process reads and writes), so memory does
    not grow with their number; the results come in order whatever the number of workers: the
    output is the same bytes. This process does the I/O (it reads the tasks' data and writes the
    results), the workers compute. They are not forked from this process, which already runs
    s3fs's threads (a fork would copy them in whatever state they are), but from
    multiprocessing's fork server, a fresh process that imports the `preload` modules once: each
    worker starts at once and shares them. Each worker exits when this process is gone, so that
    a killed run leaves none behind. With one worker, everything runs here."""
    if workers <= 1:
        yield from map(function, tasks)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", *preload])  # (read when the server starts)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=exit_with_parent)
    try:
        in_flight = deque()
        for task in tasks:
            if len(in_flight) == 2 * workers:
                yield in_flight.popleft().result()
            in_flight.append(pool.submit(function, task))
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # the workers end while this one goes on


def exit_with_parent():
    """In a worker process: exit as soon as the process that started it is gone (a SIGKILL
    gives it no chance to stop its workers), never left writing into what a rerun clears."""
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()


@contextlib.contextmanager
def hub_errors(kind, repo_id, revision):
    """Turn what the Hugging Face Hub raises about a dataset or model into one line."""
    from huggingface_hub import errors

    setting = kind.upper()
    try:
        yield
    except UserError:
        raise
    except errors.GatedRepoError:
        raise UserError(f"{kind} {repo_id} is gated: accept its terms on the Hub and set "
                        "HF_TOKEN") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{kind} {repo_id} has no revision {revision!r}: fix {setting}_REVISION") \
            from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{kind} {repo_id} not found on the Hugging Face Hub (private? set "
                        f"HF_TOKEN): fix {setting}_SOURCE or {setting}_NAME") from None
    except Exception as e:  # noqa: BLE001 - offline, DNS, TLS, HTTP: all mean "cannot ask"
        raise UserError(f"cannot reach the Hugging Face Hub for {repo_id} ({type(e).__name__}): "
                        f"check the network, or use local files with {setting}_SOURCE") from None


# ---------------------------------------------------------------- bucket contract


def raw_prefix(dataset):
    return f"raw/{dataset}"


def standardized_prefix(dataset):
    return f"standardized/{dataset}"


def model_prefix(model):
    return f"models/{model}"


def model_ready_prefix(model, dataset, inputs):
    """model-ready/<MODEL_NAME>/<DATASET_NAME>/<12 hex digits of the fingerprint of
    pretokenize's inputs, without a rebuild mark>: each set of inputs (data settings, data,
    tokenizer, step version) has a folder of its own, so that runs made from other data
    settings (a sweep over MAX_SEQ_LENGTH) keep theirs side by side, and replacing one never
    touches another's."""
    return f"model-ready/{model}/{dataset}/{fingerprint(inputs)[:12]}"


def checkpoints_prefix(model, dataset, run=None):
    return f"checkpoints/{model}/{dataset}" + (f"/{run}" if run else "")


def done_prefix(model, dataset, run=None):
    return f"done/{model}/{dataset}" + (f"/{run}" if run else "")


def shard_name(index, suffix="parquet"):
    return f"shard-{index:05d}.{suffix}"


# ---------------------------------------------------------------- manifests


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def fingerprint(obj):
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def read_manifest(bucket, prefix):
    """The manifest of a prefix, or None; its ETag is kept for the next write_manifest."""
    data, etag = bucket.get_with_etag(f"{prefix}/{MANIFEST}")
    bucket.manifest_etags[prefix] = etag
    return None if data is None else json.loads(data)


def write_manifest(bucket, prefix, manifest, **condition):
    """One PUT of the whole manifest: readers see the old one or the new one, never a mix.

    Without an explicit condition the write is conditional on the manifest this process last
    read or wrote (If-Match its ETag; If-None-Match when there was none), so that a second run
    of the same step on the same output (a double launch) never moves the manifest backwards,
    e.g. a slower run overwriting a complete manifest with a partial one. When the condition
    fails, the manifest is read again: if it is at least as far along from the same inputs it
    is kept as it is (shards are deterministic, so it lists the same shards), else this one is
    written over it. A retried PUT whose first attempt did succeed also fails its condition,
    and then finds its own manifest: kept. Returns the manifest in the bucket afterwards."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    key = f"{prefix}/{MANIFEST}"
    if condition:
        bucket.put(key, data, **condition)
        return manifest
    for _ in range(10):  # each round means another run wrote meanwhile
        etag = bucket.manifest_etags.get(prefix)
        try:
            bucket.manifest_etags[prefix] = bucket.put(key, data, if_none_match=etag is None,
                                                       if_match=etag)
            return manifest
        except Conflict:
            theirs = read_manifest(bucket, prefix)
        if theirs is not None and theirs.get("inputs") != manifest.get("inputs"):
            raise UserError(f"another run with other settings is writing {bucket.url(prefix)}: "
                            "let one run finish, then rerun")
        if theirs is not None and _progress(theirs) >= _progress(manifest):
            log(f"another run of this step is as far in {bucket.url(prefix)}: keeping its manifest")
            return theirs
    raise UserError(f"{bucket.url(prefix)}/{MANIFEST} keeps changing under this run: is another "
                    "run of this step writing it? Let one run finish, then rerun")


def _progress(manifest):
    return bool(manifest.get("complete")), len(manifest.get("shards") or [])


def new_manifest(inputs):
    return {"complete": False, "inputs": inputs, "shards": [], "rows": 0}


def with_rebuild(inputs, settings, step):
    """The step's inputs, marked with this launch's id when REBUILD names the step.

    The mark makes the existing output one "made from other inputs", which REBUILD consents to
    replace. SkyPilot keeps SKYPILOT_TASK_ID across the recoveries of a managed job and gives
    every node the same one, so a recovery, or another node, finds the output already rebuilt
    (or being rebuilt) by this launch and continues it. Outside SkyPilot every run with
    REBUILD set rebuilds, once: the mark is kept in the environment, which the process keeps
    when it re-executes itself (dotrain.py's export after unsloth)."""
    wanted = {name.strip() for name in settings.rebuild.split(",") if name.strip()}
    unknown = wanted - set(STEPS) - {"all"}
    if unknown:
        raise UserError(f"REBUILD names no step {', '.join(sorted(unknown))}: use "
                        f"{', '.join(STEPS)} or all")
    if step not in wanted and "all" not in wanted:
        return inputs
    launch = settings.skypilot_task_id or os.environ.setdefault(
        "REBUILD_LAUNCH", f"local-{time.time_ns()}-{os.getpid()}")
    return {**inputs, "rebuild": launch}


def same_inputs(made_from, inputs):
    """Whether an output made from `made_from` is the current run's: a rebuild mark counts only
    when this run asks for a rebuild."""
    if "rebuild" not in inputs:
        made_from = {k: v for k, v in (made_from or {}).items() if k != "rebuild"}
    return made_from == inputs


def changes(made_from, inputs):
    """`name: old -> new` of every input that differs, for messages."""
    old = made_from or {}
    return ", ".join(f"{k}: {short(old.get(k))} -> {short(inputs.get(k))}"
                     for k in sorted(set(old) | set(inputs)) if old.get(k) != inputs.get(k))


def refuse_other_inputs(bucket, prefix, made_from, inputs, what="was made"):
    raise UserError(f"{bucket.url(prefix)} {what} with other inputs ({changes(made_from, inputs)}); "
                    "rerun with FORCE=1 to replace it, or restore the settings")


def resume_or_start(bucket, prefix, inputs, force, replaceable=False, mine=None):
    """The manifest to continue from: complete (nothing to do), partial (resume) or new.

    An output made from the current inputs is kept, whatever FORCE says: a finished one is
    skipped and a partial one resumed, so a recovery that still has FORCE=1 continues where
    the job was. One made from other inputs is replaced only when FORCE=1 (or REBUILD, which
    marks the inputs) consents, or when it is `replaceable` (holds nothing of value); else
    refused, so that a changed setting never mixes old and new shards. `mine`: as in
    Bucket.delete_prefix."""
    inputs = json.loads(canonical_json(inputs))  # as it reads back from JSON
    manifest = read_manifest(bucket, prefix)
    if manifest is None or same_inputs(manifest.get("inputs"), inputs):
        return manifest or new_manifest(inputs)
    if not (force or replaceable or "rebuild" in inputs):
        refuse_other_inputs(bucket, prefix, manifest.get("inputs"), inputs)
    log(f"replacing {bucket.url(prefix)}, made with other inputs "
        f"({changes(manifest.get('inputs'), inputs)})")
    bucket.delete_prefix(prefix, mine)
    bucket.manifest_etags[prefix] = None
    return new_manifest(inputs)


def manifest_fingerprint(manifest):
    """What identifies a finished output to the steps that read it. A rebuild from the same
    inputs makes the same output, so its mark is left out: what was made from the output
    before stays valid."""
    inputs = {k: v for k, v in (manifest.get("inputs") or {}).items() if k != "rebuild"}
    return fingerprint({**manifest, "inputs": inputs})


def abort_stale_uploads(bucket, prefix, mine=lambda name: True):
    """Abort the unfinished multipart uploads under an output prefix left by a killed run.

    A run killed while streaming a shard leaves its upload open: never visible as an object,
    but stored (and billed) until aborted. Called when a step starts on its output, it aborts
    what was begun STALE_UPLOAD_SECONDS or more before the bucket was opened (by the server's
    clock): a recovery starts minutes after the kill, while the uploads of a run launched
    beside this one (a double launch, another node) are younger and are left to it. A run of
    the same step still going from much earlier would lose the shard it is uploading, and
    fail: its shard is written again by this run. `mine(name)` (the key's name under the
    prefix) limits it to the objects this run writes, where several nodes share an output."""
    if bucket.is_local:
        return
    start = len(bucket.key_of(prefix)) + 1
    stale_before = bucket.opened_at - timedelta(seconds=bucket.settings.stale_upload_seconds)
    paginator = bucket.client.get_paginator("list_multipart_uploads")
    for page in paginator.paginate(Bucket=bucket.name, Prefix=bucket.key_of(prefix) + "/"):
        for upload in page.get("Uploads", []):
            if upload["Initiated"] < stale_before and mine(upload["Key"][start:]):
                log(f"aborting an unfinished upload of s3://{bucket.name}/{upload['Key']} "
                    "left by an earlier run")
                bucket.client.abort_multipart_upload(Bucket=bucket.name, Key=upload["Key"],
                                                     UploadId=upload["UploadId"])


def short(value, width=60):
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[:width - 3] + "..."


def require_complete(bucket, prefix, produced_by):
    """The complete manifest of an input prefix, or an error naming the step to run first."""
    manifest = read_manifest(bucket, prefix)
    if manifest is None or not manifest.get("complete"):
        raise UserError(f"{bucket.url(prefix)} is not complete: run {produced_by} first")
    return manifest


@contextlib.contextmanager
def parquet_writer(bucket, key, schema):
    """A ParquetWriter streaming row groups into an object that appears whole or not at all."""
    import pyarrow.parquet as pq

    with bucket.writer(key) as f:
        writer = pq.ParquetWriter(f, schema, compression="zstd")
        try:
            yield writer
        except BaseException:
            writer.is_open = False  # never finish a file that is being thrown away
            raise
        writer.close()


def read_parquet_batches(bucket, key, batch_size):
    """Record batches of a Parquet object, read a row group at a time (bounded memory)."""
    import pyarrow.parquet as pq

    with _parquet_errors(bucket, key), bucket.fs.open(bucket.path(key), "rb", block_size=8 * 2**20) as f:
        # pre_buffer would keep every row group read so far until the file is closed.
        yield from pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=batch_size)


def row_group_sizes(bucket, key):
    """The number of rows of each row group of a Parquet object (read from its footer alone)."""
    import pyarrow.parquet as pq

    with _parquet_errors(bucket, key), bucket.fs.open(bucket.path(key), "rb", cache_type="none") as f:
        metadata = pq.ParquetFile(f).metadata
        return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def read_row_groups(bucket, key, groups=None):
    """The row groups of a Parquet object (those numbered in `groups`, or all), in order, as
    tables: the object is read once, ahead in blocks, one row group held at a time."""
    import pyarrow.parquet as pq

    with _parquet_errors(bucket, key), bucket.fs.open(bucket.path(key), "rb", block_size=8 * 2**20) as f:
        parquet = pq.ParquetFile(f, pre_buffer=False)
        for group in range(parquet.num_row_groups) if groups is None else groups:
            yield parquet.read_row_group(group)


@contextlib.contextmanager
def _parquet_errors(bucket, key):
    """A damaged or replaced object's content as one line naming the step that remakes it."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # a local or network failure, not the object's content
        maker = "pretokenize" if key.startswith("model-ready/") else "import-dataset"
        raise UserError(f"{bucket.url(key)} is not a readable Parquet file ({e}): it was "
                        f"damaged or replaced; rerun with REBUILD={maker}") from None


def sha256_file(path, chunk=8 * 2**20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the model-ready data


MODEL_READY_STEP = "model-ready/4"  # bump when a change alters what pretokenize.py produces
# What pretokenize.py makes the data with: dotrain.py finds the data made with the same ones.
DATA_SETTINGS = [
    Setting("MAX_SEQ_LENGTH", 4096, "tokens per row: pretokenize.py truncates longer rows, and "
            "training packs rows into sequences of this length", int, minimum=1),
    Setting("CHAT_TEMPLATE", "model", "model: the model's own chat template; chatml: ChatML "
            "(for a model that has none)", choices=("model", "chatml")),
    Setting("EVAL_ROWS", 200, "conversations held out of training for the evaluation loss, spread "
            "evenly over the whole dataset (at most a tenth of it; 0: none)", int, minimum=0),
    Setting("PART_SIZE", 20_000, "rows per part: each standardized shard is tokenized and "
            "committed in parts of whole row groups, which nodes share", int, minimum=1),
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "vocab.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
TOKENIZER_SUFFIXES = (".model", ".tiktoken")


def tokenizer_fingerprint(model):
    files = [(entry["path"], entry["sha256"]) for entry in model["shards"]
             if entry["path"] in TOKENIZER_FILES or entry["path"].endswith(TOKENIZER_SUFFIXES)]
    return fingerprint(sorted(files))


def model_ready_inputs(settings, standardized, model):
    """What pretokenize.py's output is made from (before a rebuild mark): the step's version,
    the standardized data, the model and its tokenizer files, and DATA_SETTINGS."""
    return {"step": MODEL_READY_STEP, "standardized": manifest_fingerprint(standardized),
            "model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(model),
            "chat_template": settings.chat_template, "max_seq_length": settings.max_seq_length,
            "eval_rows": settings.eval_rows, "part_size": settings.part_size}


def model_ready_location(bucket, settings):
    """The prefix of the model-ready data that pretokenize.py makes with these settings (and
    dotrain.py trains on), from the standardized and model manifests in the bucket."""
    standardized = require_complete(bucket, standardized_prefix(settings.dataset_name),
                                    "import-dataset.py")
    model = require_complete(bucket, model_prefix(settings.model_name), "import-model.py")
    return model_ready_prefix(settings.model_name, settings.dataset_name,
                              model_ready_inputs(settings, standardized, model))


# ---------------------------------------------------------------- chat templates and labels


NOT_TRAINED = -100  # the label of a token that training does not learn
# The template CHAT_TEMPLATE=chatml asks for, and the one the project's tiny tokenizer uses.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def load_chat_tokenizer(model_dir, chat_template):
    """The model's tokenizer with the chat template conversations are rendered with: the
    model's own (CHAT_TEMPLATE=model) or ChatML (chatml). One line where that cannot work."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.is_fast:
        raise UserError(f"the tokenizer in {model_dir} has no fast (Rust) version, which "
                        "pretokenize.py needs to map answers to tokens: use a model that ships "
                        "tokenizer.json")
    if chat_template == "chatml":
        # Else `<|im_end|>` would be trained as a few ordinary tokens, and generation, which
        # stops at one token, would not stop.
        split = [token for token in ("<|im_start|>", "<|im_end|>")
                 if len(tokenizer.backend_tokenizer.encode(token, add_special_tokens=False)) != 1]
        if split:
            fix = ("use the model's own chat template (CHAT_TEMPLATE=model)" if tokenizer.chat_template
                   else "use a model that has a chat template or these tokens")
            raise UserError(f"CHAT_TEMPLATE=chatml needs {' and '.join(split)} to be one token "
                            f"each, and the tokenizer in {model_dir} splits them into ordinary "
                            f"tokens: {fix}")
        tokenizer.chat_template = CHATML_TEMPLATE
    elif not tokenizer.chat_template:
        raise UserError(f"the tokenizer in {model_dir} has no chat template: set "
                        "CHAT_TEMPLATE=chatml to use ChatML, or use a model that has one")
    return tokenizer


def end_of_turn(tokenizer):
    """The text the chat template renders after an answer, up to the whitespace before the next
    turn: trained with each answer so that the model learns to stop, and where generation stops."""
    mark = "\ue000"  # a private-use character, found again in the rendering
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": f"Hello{mark}"}],
                                         tokenize=False)
    return text[text.rindex(mark) + 1:].rstrip()


# ---------------------------------------------------------------- models


MODEL_NAME_SETTING = Setting(
    "MODEL_NAME", help="name of the model in bucket paths, e.g. Qwen/Qwen2.5-0.5B", required=True)
DATASET_NAME_SETTING = Setting(
    "DATASET_NAME", help="name of the dataset in bucket paths, e.g. mlabonne/FineTome-100k",
    required=True)
MAX_REJECT_SETTING = Setting(
    "MAX_REJECT_FRACTION", 0.1, "fail if more than this fraction of the rows is dropped: by the "
    "import (rows no rule converts) or by pretokenize (no trained token within MAX_SEQ_LENGTH, "
    "or refused by the chat template); each drop is listed with its reason", float, minimum=0)
MODEL_CACHE_SETTING = Setting(
    "MODEL_CACHE_DIR", os.path.join("~", ".cache", "tigris-finetune", "models"),
    "local directory that keeps verified copies of the bucket's models")
VERIFIED = ".verified.json"  # in a model's local copy: {path: [size, sha256]} already checked


def model_fingerprint(manifest):
    """What identifies an imported model: its files' names and hashes."""
    return fingerprint(sorted((entry["path"], entry["sha256"]) for entry in manifest["shards"]))


def download_model(bucket, model_name, cache_dir=None, parallel=4):
    """A local directory holding models/<MODEL_NAME>/ exactly as its manifest lists it.

    Each file is downloaded to a temporary name and renamed only once its sha256 matches
    the manifest. Files already verified (same size and hash in the local record, same size
    on disk) are reused without hashing them again; files the manifest does not list are
    removed. A lock keeps two processes of one machine from fetching the same files."""
    import fcntl
    from concurrent.futures import ThreadPoolExecutor

    manifest = require_complete(bucket, model_prefix(model_name), "import-model.py")
    local = os.path.join(os.path.expanduser(cache_dir or MODEL_CACHE_SETTING.default), model_name)
    os.makedirs(local, exist_ok=True)
    with open(os.path.join(local, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record_path = os.path.join(local, VERIFIED)
        try:
            with open(record_path) as f:
                verified = json.load(f)
        except (FileNotFoundError, ValueError):
            verified = {}
        wanted = {entry["path"]: [entry["size"], entry["sha256"]] for entry in manifest["shards"]}
        for name in os.listdir(local):
            if name not in wanted and name not in (".lock", VERIFIED):
                os.remove(os.path.join(local, name))
        todo = [path for path, expected in wanted.items()
                if verified.get(path) != expected or not _has_size(os.path.join(local, path),
                                                                   expected[0])]
        verified = {path: value for path, value in verified.items()
                    if path in wanted and path not in todo}
        if todo:
            log(f"downloading {len(todo)} files of {bucket.url(model_prefix(model_name))} to {local}")
        with ThreadPoolExecutor(parallel) as pool:
            for path in pool.map(lambda p: _download_verified(bucket, model_name, p, wanted[p],
                                                              local), todo):
                verified[path] = wanted[path]
                write_json_atomically(record_path, verified)
    return local


def _has_size(path, size):
    return os.path.isfile(path) and os.path.getsize(path) == size


def _download_verified(bucket, model_name, path, expected, local):
    key = f"{model_prefix(model_name)}/{path}"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=local)
    os.close(fd)
    try:
        bucket.download(key, tmp)
        if sha256_file(tmp) != expected[1]:
            raise UserError(f"{bucket.url(key)} does not match the sha256 in its manifest: the "
                            "bucket's copy was damaged or replaced; rerun with REBUILD=import-model")
        os.replace(tmp, os.path.join(local, path))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomically(path, obj):
    """A local JSON file that readers find whole or not at all."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
