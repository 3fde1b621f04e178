"""The GPU node and the tests install one pinned set: requirements-dev.txt must not drift."""

from importlib.metadata import version

from conftest import ROOT
from packaging.requirements import Requirement
from packaging.version import Version


def requirements(name):
    lines = (ROOT / name).read_text().splitlines()
    return [Requirement(line.split("#")[0]) for line in lines
            if line.split("#")[0].strip() and not line.startswith("-r")]


def test_dev_requirements_extend_the_node_requirements():
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()
    node = {r.name.lower(): r for r in requirements("requirements.txt")}
    for dev in requirements("requirements-dev.txt"):
        pinned = next(iter(dev.specifier)).version
        if dev.name.lower() in node:  # a dev pin may only narrow a node range, never leave it
            assert node[dev.name.lower()].specifier.contains(pinned), dev


def test_every_node_package_is_pinned_and_installed_at_its_pin():
    for req in requirements("requirements.txt"):
        installed = Version(version(req.name).split("+")[0])
        assert req.specifier, f"{req.name} is not pinned"
        assert req.specifier.contains(installed), f"{req.name} {installed} does not match {req}"
        if req.name != "torch":  # torch: a range, the CPU build here, the CUDA build on the node
            assert str(req.specifier).startswith("=="), f"{req.name} must be pinned exactly"


def test_unsloth_caps_are_respected():
    node = {r.name.lower(): r.specifier for r in requirements("requirements.txt")}
    assert all(Version(s.version) <= Version("5.17.0") for s in node["transformers"])
    assert all(Version(s.version) <= Version("1.15.0") for s in node["trl"])
    assert all(Version(s.version) < Version("5") for s in node["datasets"])
    assert not node["torch"].contains("2.15.0")
