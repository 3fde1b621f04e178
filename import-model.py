"""Step 2: copy a model's published files, byte for byte and verified, into the bucket.

    models/<MODEL_NAME>/<file>            weights (*.safetensors + index), configs, tokenizer
                                          files, chat template, generation config, LICENSE, README
    models/<MODEL_NAME>/_manifest.json    every file with its size and sha256, and the revision

The model is never loaded or re-saved: what training reads is exactly what its authors
published. Only top-level files are copied. Pickle weights (*.bin, *.pt, ...) can run code
when loaded: they are skipped when safetensors weights exist, and refused when they are
the only weights, unless ALLOW_PICKLE=1.

The manifest's "shards" are the files, each {"path", "size", "sha256", "rows": 0}; a file
is listed only once its upload completed and the object's size was checked. A killed
import resumes with the files not yet listed; a finished one writes nothing.
"""

import fnmatch
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed

from common import (Setting, UserError, abort_stale_uploads, hub_errors, log, model_prefix,
                    open_bucket, parse_settings, read_manifest, resume_or_start, run, sha256_file,
                    with_rebuild, write_manifest)

SETTINGS = [
    Setting("MODEL_NAME", help="name of the model in bucket paths, e.g. Qwen/Qwen2.5-0.5B",
            required=True),
    Setting("MODEL_SOURCE", help="Hub id or local directory to copy from (default: MODEL_NAME)"),
    Setting("MODEL_REVISION", help="Hub branch, tag or commit (pinned to the commit it resolves to)"),
    Setting("HF_TOKEN", help="Hugging Face token, for gated or private models", secret=True),
    Setting("ALLOW_PICKLE", False, "copy pickle weights (*.bin, *.pt, ...) when a model has no "
            "safetensors; loading them can run code: only for authors you trust", bool),
]
PARALLEL_FILES = 4  # files downloaded and uploaded at once (each held on local disk meanwhile)
SAFE_WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.bin.index.json",
                  "*.pt.index.json")
OTHER_FILES = ("*.json", "merges.txt", "vocab.txt", "*.model", "*.tiktoken", "*.jinja",
               "LICENSE*", "LICENCE*", "README*", "NOTICE*", "USE_POLICY*")


def main():
    settings = parse_settings(__doc__, SETTINGS)
    bucket = open_bucket(settings)
    prefix = model_prefix(settings.model_name)
    abort_stale_uploads(bucket, prefix)
    previous = read_manifest(bucket, prefix)
    source = Source(settings, previous and previous["inputs"])
    inputs = with_rebuild({"step": "models/1", **source.inputs, "allow_pickle": settings.allow_pickle},
                          settings, "import-model")
    manifest = resume_or_start(bucket, prefix, inputs, settings.force)
    if manifest["complete"]:
        log(f"{bucket.url(prefix)} is complete ({len(manifest['shards'])} files): nothing to do")
        return
    files = select_files(source.list_files(), settings.allow_pickle, source.name)
    copy_files(bucket, prefix, source, files, manifest)
    manifest["shards"].sort(key=lambda entry: entry["path"])
    manifest.update(complete=True, source=source.name, revision=source.inputs.get("revision"),
                    size=sum(entry["size"] for entry in manifest["shards"]))
    write_manifest(bucket, prefix, manifest)
    log(f"{bucket.url(prefix)} complete: {len(manifest['shards'])} files, "
        f"{manifest['size'] / 2**20:.1f} MiB")


# ---------------------------------------------------------------- the source


class Source:
    """A local directory (fingerprinted by file names and sizes) or a Hub repo pinned to a commit.

    A Hub source reuses the commit recorded by an earlier import of the same repo, so a
    resumed or finished import does not ask the Hub where the branch points now."""

    def __init__(self, settings, previous_inputs):
        self.name = settings.model_source or settings.model_name
        self.token = os.environ.get("HF_TOKEN") or None
        path = os.path.expanduser(self.name.removeprefix("file://"))
        if os.path.isdir(path) or self.name.startswith(("/", "./", "../", "~", "file://")):
            if not os.path.isdir(path):
                raise UserError(f"no such directory: {path}: fix MODEL_SOURCE")
            self.directory = path
            self.inputs = {"source": self.name, "files": sorted(self.list_files().items())}
            return
        self.directory = None
        previous = previous_inputs or {}
        revision = settings.model_revision
        if revision is None and previous.get("source") == self.name and previous.get("revision"):
            revision = previous["revision"]
        elif revision is None or len(revision) != 40:
            with hub_errors("model", self.name, revision):
                from huggingface_hub import HfApi

                revision = HfApi(token=self.token).model_info(self.name, revision=revision).sha
        self.inputs = {"source": self.name, "revision": revision}

    def list_files(self):
        """{file name: size} of the top-level files."""
        if self.directory is not None:
            return {entry.name: entry.stat().st_size for entry in os.scandir(self.directory)
                    if entry.is_file() and not entry.name.startswith(".")}
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        with hub_errors("model", self.name, self.inputs["revision"]):
            tree = HfApi(token=self.token).list_repo_tree(self.name,
                                                          revision=self.inputs["revision"])
            return {item.path: item.size for item in tree if isinstance(item, RepoFile)}

    def fetch(self, name, scratch):
        """A local path holding the file: in place for a directory, downloaded for the Hub."""
        if self.directory is not None:
            return os.path.join(self.directory, name)
        from huggingface_hub import hf_hub_download

        with hub_errors("model", self.name, self.inputs["revision"]):
            return hf_hub_download(self.name, name, revision=self.inputs["revision"],
                                   token=self.token, local_dir=scratch)

    def release(self, path):
        if self.directory is None:
            os.remove(path)


def select_files(files, allow_pickle, source_name):
    """The published files worth copying: {name: size}. Refuses pickle-only weights."""
    def matching(patterns):
        return {name for name in files if any(fnmatch.fnmatch(name, p) for p in patterns)}

    pickles = matching(PICKLE_WEIGHTS)
    safe = matching(SAFE_WEIGHTS)
    chosen = (matching(OTHER_FILES) - pickles) | safe
    if not any(name.endswith(".safetensors") for name in safe):
        weights = sorted(p for p in pickles if not p.endswith(".json"))
        if not weights:
            raise UserError(f"{source_name} has no weights (*.safetensors): point MODEL_SOURCE "
                            "at a model's files")
        if not allow_pickle:
            raise UserError(f"{source_name} has only pickle weights ({', '.join(weights[:3])}), "
                            "and loading a pickle can run arbitrary code: use a model published "
                            "as safetensors, or set ALLOW_PICKLE=1 if you trust its authors")
        chosen |= pickles
    skipped = sorted(set(files) - chosen)
    if skipped:
        log(f"not copied: {', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}")
    return {name: files[name] for name in sorted(chosen)}


# ---------------------------------------------------------------- the copy


def copy_files(bucket, prefix, source, files, manifest):
    """Upload what is not already listed with the same size and present; list each when done."""
    listed = {entry["path"]: entry for entry in manifest["shards"]}
    if listed:
        stored = {os.path.basename(path): info["size"]
                  for path, info in bucket.fs.find(bucket.path(prefix), detail=True).items()}
        listed = {name: entry for name, entry in listed.items()
                  if files.get(name) == entry["size"] == stored.get(name)}
        log(f"resuming: {len(listed)} of {len(files)} files already copied")
    manifest["shards"] = list(listed.values())
    todo = [name for name in files if name not in listed]
    with tempfile.TemporaryDirectory(prefix="import-model-") as scratch, \
            ThreadPoolExecutor(PARALLEL_FILES) as pool:
        futures = [pool.submit(copy_file, bucket, f"{prefix}/{name}", source, name, scratch)
                   for name in todo]
        for future in as_completed(futures):
            entry = future.result()
            manifest["shards"].append(entry)
            write_manifest(bucket, prefix, manifest)
            log(f"copied {entry['path']} ({entry['size'] / 2**20:.1f} MiB)")


def copy_file(bucket, key, source, name, scratch):
    """Upload one file, hashed meanwhile (the hash takes no time of its own: the upload is
    slower, and the hash reads what the upload just brought into the page cache); listed once
    the object holds as many bytes as the file."""
    local = source.fetch(name, scratch)
    try:
        with ThreadPoolExecutor(1) as hashing:
            hashed = hashing.submit(sha256_file, local)
            bucket.upload(local, key)
            size, sha256 = os.path.getsize(local), hashed.result()
    finally:
        source.release(local)
    stored = bucket.fs.size(bucket.path(key))
    if stored != size:
        raise UserError(f"{bucket.url(key)} holds {stored} bytes after the upload, not {size}: "
                        "rerun to copy it again")
    return {"path": name, "size": size, "sha256": sha256, "rows": 0}


if __name__ == "__main__":
    run(main)
