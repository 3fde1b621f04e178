"""What the setup blocks of allatonce.yaml and service.yaml install resolves on PyPI, for the
nodes' Python and platform: a pin that cannot resolve fails here, not on a GPU node after the
minutes it took to provision.

Needs PyPI, as `make test`'s own install does; skipped, saying so, only when PyPI cannot be
reached at all. Nothing is installed: pip resolves (--dry-run) for the nodes' platform, and
reads each wheel's metadata with HTTP range requests (fast-deps) instead of downloading
gigabytes of CUDA wheels.
"""

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import yaml
from conftest import ROOT

PYPI = "https://pypi.org/simple"
# The nodes: Python 3.11 (the oldest the setup blocks take, and the one they get from conda),
# x86_64 Linux with glibc 2.35 (Ubuntu 22.04, SkyPilot's GPU images).
NODE = ["--python-version", "3.11", "--only-binary", ":all:",
        *(f"--platform=manylinux_2_{minor}_x86_64" for minor in range(35, 4, -1)),
        "--platform=manylinux2014_x86_64", "--platform=manylinux2010_x86_64",
        "--platform=manylinux1_x86_64"]


def setup_packages(name):
    """The PACKAGES a YAML's setup block installs, optional additions (wandb) included. PyTorch's
    own index (torch==X+cu126, ...) is not reachable from here: the PyPI torch==X stands in for
    its builds, which carry the same version and dependencies but for the CUDA libraries."""
    with open(ROOT / name) as f:
        setup = yaml.safe_load(f)["setup"]
    packages = " ".join(re.findall(r'PACKAGES="(?:\$PACKAGES )?([^"]*)"', setup))
    return re.sub(r"\+\$CUDA\b", "", packages).split()


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    """{YAML: (pip's exit status, its error output, {package: version})}, both resolved at once."""
    try:
        urllib.request.urlopen(f"{PYPI}/pip/", timeout=30).close()
    except urllib.error.HTTPError:
        pass  # PyPI answered: reachable
    except (urllib.error.URLError, OSError) as e:
        pytest.skip(f"PyPI cannot be reached ({e}): the node package sets were not resolved")
    tmp = tmp_path_factory.mktemp("resolve")
    runs = {}
    for name in ("allatonce.yaml", "service.yaml"):
        report = tmp / f"{name}.json"
        command = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check",
                   "--dry-run", "--ignore-installed", "--quiet", "--use-feature=fast-deps",
                   "--index-url", PYPI, *NODE, "--target", str(tmp / "target"),
                   "--report", str(report), *setup_packages(name)]
        runs[name] = report, subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE, text=True)
    found = {}
    for name, (report, process) in runs.items():
        _, errors = process.communicate(timeout=600)
        versions = {}
        if process.returncode == 0:
            versions = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                        for item in json.loads(report.read_text())["install"]}
        found[name] = process.returncode, errors, versions
    return found


def test_the_training_node_packages_resolve(resolved):
    status, errors, versions = resolved["allatonce.yaml"]
    assert status == 0, f"allatonce.yaml's setup cannot install: {errors[-3000:]}"
    assert versions["torch"] == "2.14.1" and versions["unsloth"] == "2026.10.9"
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    for package, version in pins:
        assert versions[package.lower().replace("_", "-")] == version, package


def test_the_serving_node_packages_resolve_to_a_cuda_13_stack(resolved):
    status, errors, versions = resolved["service.yaml"]
    assert status == 0, f"service.yaml's setup cannot install: {errors[-3000:]}"
    assert versions["vllm"] == "0.33.0" and versions["torch"] == "2.14.0"
    # a CUDA 13 runtime: what service.yaml's setup asks of the driver (580 or newer) stands
    assert versions["nvidia-cuda-runtime"].startswith("13.")
