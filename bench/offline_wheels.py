"""Download the wheels the pipeline needs on a GPU machine that has no network, beyond what a
CUDA torch image already holds, trimmed to the parts the pipeline loads.

    python bench/offline_wheels.py [--dest .whl] [--cuda 130]

The target: Python 3.12, x86_64 Linux, an image with torch (CUDA), transformers 5.17.0,
accelerate, huggingface_hub, safetensors, tokenizers, pyarrow, pandas, numpy, aiohttp, requests,
werkzeug, jinja2, pyyaml, psutil, rich, typer, triton, sentencepiece, protobuf and einops. There:

    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site

Trimmed (each repacked as a valid wheel, its RECORD rewritten):
- unsloth without studio/ (a web UI that `import unsloth` never loads);
- bitsandbytes with one CUDA build (--cuda, the image's torch.version.cuda) and the CPU library;
- botocore with the service data of S3 alone (the data of every other AWS service goes);
- moto without the other services' bundled resources (SSM parameters, EC2 instance types, ...).

Left out, each imported only behind a guard or on a path the pipeline does not take:
unsloth_zoo's cut_cross_entropy (unsloth_zoo turns it off on torch >= 2.8), torchao (loaded only
if present), xformers (optional; its wheels are built for one torch), msgspec (vLLM only), tyro,
hf_transfer and diffusers (never imported by unsloth 2026.10.9), pycparser (cffi needs it to
compile bindings, not to load cryptography's), and moto[server]'s extras for other services
(cfn-lint, docker, aws-xray-sdk, graphql-core, ...). Flask's werkzeug, click and jinja2 are the
image's.
"""

import argparse
import base64
import csv
import hashlib
import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = [
    # training: unsloth and what the steps import that the image lacks
    "unsloth==2026.10.9",
    "unsloth_zoo==2026.10.9",
    "bitsandbytes==0.50.2",  # adamw_8bit, 4-bit LoRA
    "trl==1.15.0",
    "peft==0.21.2",
    "datasets==4.8.5",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    # the bucket: s3fs over aiobotocore, and boto3
    "s3fs==2026.2.0",
    "fsspec==2026.2.0",
    "aiobotocore==3.10.0",
    "aioitertools==0.13.0",
    "botocore==1.43.117",
    "boto3==1.43.117",
    "s3transfer==0.19.3",
    "jmespath==1.1.0",
    "python-dateutil==2.9.0.post0",  # botocore and aiobotocore need < 3
    # the local S3 server (moto[server], S3 alone)
    "moto==5.2.5",
    "xmltodict==1.0.4",
    "responses==0.26.3",
    "flask==3.1.3",
    "flask-cors==6.0.5",
    "blinker==1.9.0",
    "itsdangerous==2.2.0",
    "cryptography==50.0.2",  # moto.iam, which every request passes through
    "cffi==2.1.1",  # cryptography's bindings
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
BOTOCORE_SERVICES = {"s3"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=str(ROOT / ".whl"), help="where the wheels go (default .whl/)")
    parser.add_argument("--cuda", default="130", help="the bitsandbytes CUDA build to keep: the "
                        "image's torch.version.cuda without the dot (default 130)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "tigris-finetune" / "wheels"),
                        help="where the untrimmed wheels are downloaded (kept for the next run)")
    args = parser.parse_args()
    check_pins()
    cache, dest = Path(args.cache), Path(args.dest)
    cache.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    *(f"--platform={platform}" for platform in PLATFORMS), "--dest", str(cache),
                    *WHEELS], check=True)
    for old in dest.glob("*.whl"):  # an earlier set's: two versions of one package stop the install
        old.unlink()
    drops = {"unsloth": lambda path: path.startswith("studio/"),
             "bitsandbytes": lambda path: other_native_library(path, args.cuda),
             "botocore": other_service_data,
             "moto": other_service_resources}
    total = 0
    for requirement in WHEELS:
        source = downloaded(cache, requirement)
        name = requirement.split("==")[0].replace("-", "_").lower()
        target = dest / source.name
        if name in drops:
            kept = repack(source, target, drops[name])
            note = f"trimmed from {source.stat().st_size / 2**20:.1f} MiB, {kept}"
        else:
            target.write_bytes(source.read_bytes())
            note = ""
        total += target.stat().st_size
        print(f"{target.stat().st_size / 2**20:7.2f} MiB  {target.name}  {note}".rstrip())
    print(f"{total / 2**20:7.2f} MiB  in all, {len(WHEELS)} wheels in {dest}")


def check_pins():
    """The versions above are the project's: those pinned in requirements*.txt must agree."""
    pins = {}
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            match = re.match(r"([A-Za-z0-9_.\[\]-]+)==([^\s#]+)", line)
            if match:
                pins[re.sub(r"\[.*\]", "", match[1]).replace("_", "-").lower()] = match[2]
    for requirement in WHEELS:
        name, version = requirement.split("==")
        pinned = pins.get(name.replace("_", "-").lower())
        if pinned and pinned != version:
            sys.exit(f"error: {requirement} here, but the project pins {name}=={pinned}: "
                     "make them agree")


def downloaded(cache, requirement):
    name, version = requirement.split("==")
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    found = [path for path in cache.glob("*.whl") if path.name.lower().startswith(stem)]
    if len(found) != 1:
        sys.exit(f"error: expected one wheel of {requirement} in {cache}, found {found}")
    return found[0]


def other_native_library(path, cuda):
    """bitsandbytes/libbitsandbytes_*.so other than the CPU one and the CUDA build kept."""
    match = re.fullmatch(r"bitsandbytes/libbitsandbytes_(\w+)\.so", path)
    return bool(match) and match[1] not in ("cpu", f"cuda{cuda}")


def other_service_data(path):
    """botocore/data/SERVICE/... of a service the pipeline does not call (endpoints.json,
    partitions.json and the other files directly in data/ stay: botocore reads them itself)."""
    parts = path.split("/")
    return parts[:2] == ["botocore", "data"] and len(parts) > 3 and parts[2] not in BOTOCORE_SERVICES


def other_service_resources(path):
    """moto/SERVICE/resources/... of a service other than S3 (the data each service loads when a
    request for it arrives)."""
    parts = path.split("/")
    return parts[0] == "moto" and len(parts) > 3 and parts[2] == "resources" and parts[1] != "s3"


def repack(source, target, drop):
    """A copy of the wheel without the files `drop` selects, with a RECORD that lists the files
    kept, each with its sha256 and size; returns what was left out, in words."""
    kept = dropped = 0
    with zipfile.ZipFile(source) as wheel, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        record = next(item.filename for item in wheel.infolist()
                      if item.filename.endswith(".dist-info/RECORD"))
        rows = []
        for item in wheel.infolist():
            if item.filename == record or item.is_dir():
                continue
            if drop(item.filename):
                dropped += item.file_size
                continue
            data = wheel.read(item)
            out.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append([item.filename, f"sha256={digest}", str(len(data))])
            kept += 1
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([*rows, [record, "", ""]])
        out.writestr(record, text.getvalue())
    return f"{kept} files kept, {dropped / 2**20:.1f} MiB unpacked left out"


if __name__ == "__main__":
    main()
