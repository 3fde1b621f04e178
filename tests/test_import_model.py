"""import-model.py copies a model's files verified and resumably; download_model gets them back."""

import hashlib
import json
import os
import shutil
import sys

import pytest
from conftest import FAKE_SECRET, ROOT, bucket_objects, run_step

import common

sys.path.insert(0, str(ROOT / "demo"))
import synthetic  # noqa: E402

MODEL = "org/tiny-model"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The synthetic model as a publisher saves it, plus files that must not be copied."""
    out = tmp_path_factory.mktemp("model")
    synthetic.make_tokenizer(out / "tokenizer")
    synthetic.make_model(out / "model", out / "tokenizer")
    model = out / "model"
    (model / "LICENSE").write_text("Apache-2.0\n")
    (model / "README.md").write_text("# tiny model\n")
    (model / "training_args.bin").write_bytes(b"pickle bytes")
    (model / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (model / "onnx").mkdir()
    (model / "onnx" / "model.onnx").write_bytes(b"onnx")
    return model


def copied_files(model_dir):
    skipped = {"training_args.bin", ".gitattributes"}
    return {p.name: p.read_bytes() for p in model_dir.iterdir()
            if p.is_file() and p.name not in skipped}


def import_env(env, source):
    return {**env, "MODEL_NAME": MODEL, "MODEL_SOURCE": str(source)}


def test_copies_published_files_verified_and_rerun_writes_nothing(proxy, model_dir):
    env = import_env(proxy.env, model_dir)
    result = run_step("import-model.py", env)
    assert FAKE_SECRET not in result.stdout + result.stderr

    objects = bucket_objects(env)
    manifest = json.loads(objects.pop(f"models/{MODEL}/_manifest.json"))
    expected = copied_files(model_dir)
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "LICENSE"} <= set(expected)
    assert objects == {f"models/{MODEL}/{name}": data for name, data in expected.items()}
    assert manifest["complete"] is True
    assert manifest["rows"] == 0
    assert manifest["shards"] == [
        {"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": 0}
        for name, data in sorted(expected.items())]
    assert all(FAKE_SECRET.encode() not in data for data in objects.values())

    proxy.clear()
    result = run_step("import-model.py", env)
    assert "nothing to do" in result.stdout
    assert proxy.writes() == []


def test_resume_uploads_only_what_is_missing(proxy, model_dir, monkeypatch):
    env = import_env(proxy.env, model_dir)
    run_step("import-model.py", env)
    bucket = open_bucket(env, monkeypatch)
    prefix = f"models/{MODEL}"
    manifest = common.read_manifest(bucket, prefix)
    # As if killed after two uploads: a partial manifest, one listed object gone too.
    listed = [e for e in manifest["shards"] if e["path"] in ("config.json", "tokenizer.json")]
    common.write_manifest(bucket, prefix, {**manifest, "complete": False, "shards": listed})
    bucket.fs.rm(bucket.path(f"{prefix}/tokenizer.json"))

    proxy.clear()
    run_step("import-model.py", env)
    uploaded = {path.rsplit("/", 1)[-1] for method, path in proxy.writes() if method == "PUT"}
    assert "config.json" not in uploaded
    assert {"tokenizer.json", "model.safetensors", "_manifest.json"} <= uploaded
    assert common.read_manifest(bucket, prefix) == manifest


def test_pickle_only_model_is_refused_unless_allowed(local_bucket, model_dir, tmp_path):
    source = tmp_path / "pickled"
    shutil.copytree(model_dir, source)
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    env = import_env(local_bucket, source)

    result = run_step("import-model.py", env, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "pytorch_model.bin" in result.stderr and "ALLOW_PICKLE=1" in result.stderr
    assert not os.path.exists(tmp_path / "bucket" / "models")

    run_step("import-model.py", env, "--allow-pickle")
    stored = tmp_path / "bucket" / "models" / MODEL
    assert (stored / "pytorch_model.bin").read_bytes() == (source / "pytorch_model.bin").read_bytes()
    assert (stored / "training_args.bin").exists()


def test_unreachable_hub_is_one_clear_line(local_bucket):
    env = {**local_bucket, "MODEL_NAME": "Qwen/Qwen2.5-0.5B", "HF_HUB_OFFLINE": "1"}
    result = run_step("import-model.py", env, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach the Hugging Face Hub for Qwen/Qwen2.5-0.5B")
    assert "Traceback" not in result.stderr


def open_bucket(env, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return common.Bucket(common.parse_settings("", [], argv=[]))


def test_download_model_verifies_and_reuses(local_bucket, model_dir, tmp_path, monkeypatch):
    run_step("import-model.py", import_env(local_bucket, model_dir))
    bucket = open_bucket(local_bucket, monkeypatch)
    cache = tmp_path / "cache"

    local = common.download_model(bucket, MODEL, cache)
    expected = copied_files(model_dir)
    assert {p.name: p.read_bytes() for p in (cache / MODEL).iterdir()
            if not p.name.startswith(".")} == expected
    assert local == str(cache / MODEL)

    downloads = []
    real_download = common.Bucket.download
    monkeypatch.setattr(common.Bucket, "download",
                        lambda self, key, path: downloads.append(key) or real_download(self, key, path))
    common.download_model(bucket, MODEL, cache)
    assert downloads == []  # verified before: neither fetched nor hashed again

    (cache / MODEL / "config.json").write_text("{}")  # a changed size is noticed
    (cache / MODEL / "stale.bin").write_bytes(b"x")  # a file the manifest does not list goes
    common.download_model(bucket, MODEL, cache)
    assert downloads == [f"models/{MODEL}/config.json"]
    assert (cache / MODEL / "config.json").read_bytes() == expected["config.json"]
    assert not (cache / MODEL / "stale.bin").exists()

    damaged = tmp_path / "bucket" / "models" / MODEL / "tokenizer.json"
    damaged.write_bytes(b"!" * damaged.stat().st_size)
    with pytest.raises(common.UserError, match="tokenizer.json does not match the sha256"):
        common.download_model(bucket, MODEL, tmp_path / "other-cache")
    assert not (tmp_path / "other-cache" / MODEL / "tokenizer.json").exists()


def test_download_model_needs_a_complete_import(local_bucket, tmp_path, monkeypatch):
    bucket = open_bucket(local_bucket, monkeypatch)
    with pytest.raises(common.UserError, match="run import-model.py first"):
        common.download_model(bucket, MODEL, tmp_path)
