"""allatonce.yaml and service.yaml: what SkyPilot's own parser makes of them, what they keep
secret, and their shell blocks run as written (with stand-ins for pip, python and vLLM).

SkyPilot cannot share the project's venv (it pins click<8.2, huggingface_hub needs >=8.4.2),
so its parser runs in its own venv, .venv/sky:
    python3 -m venv .venv/sky && .venv/sky/bin/pip install skypilot==0.14.1
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import yaml
from conftest import FAKE_KEY_ID, FAKE_SECRET, ROOT, TEST_BUCKET

from common import RETRY_EXIT, SECRETS, SHARED_SETTINGS

SKY_PYTHON = Path(os.environ.get("SKYPILOT_PYTHON", ROOT / ".venv" / "sky" / "bin" / "python"))
STEPS = ["import-dataset.py", "import-model.py", "pretokenize.py", "dotrain.py"]
UNSLOTH = "unsloth==2026.10.9"

# Runs in SkyPilot's venv: parses each case as `sky launch CASE --env-file E --secret-file S
# --env NAME=VALUE...` would (--env-file's values are also secrets there, below the others).
PARSE = r"""
import json, sys
import dotenv
from sky.utils import dag_utils

def parse(path, env_file, secret_file, cli_envs):
    envs = {**(dotenv.dotenv_values(env_file) if env_file else {}), **cli_envs}
    secrets = {**envs, **(dotenv.dotenv_values(secret_file) if secret_file else {})}
    try:
        task = dag_utils.load_chain_dag_from_yaml(path, list(envs.items()),
                                                  list(secrets.items())).tasks[0]
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    service = task.service
    return {
        "envs": dict(task.envs),
        "secrets": sorted(task.secrets),
        "unresolved_secrets": sorted(ref.name for ref in task._managed_secret_refs),
        "resources": [{"accelerators": r.accelerators, "cloud": str(r.cloud) if r.cloud else None,
                       "disk_size": r.disk_size, "use_spot": r.use_spot,
                       "job_recovery": r.job_recovery, "ports": r.ports} for r in task.resources],
        "service": service and {"path": service.readiness_path, "post_data": service.post_data,
                                "min_replicas": service.min_replicas,
                                "max_replicas": service.max_replicas,
                                "tls": service.tls_credential and [service.tls_credential.keyfile,
                                                                   service.tls_credential.certfile]},
    }

cases = json.loads(sys.argv[1])
print(json.dumps({name: parse(*args) for name, args in cases.items()}))
"""


def task(name):
    return yaml.safe_load((ROOT / name).read_text())


def uncomment_tls(text):
    """service.yaml with its commented-out tls: section turned on, as its comment says to."""
    return re.sub(r"^  # (tls:\n)  # (  keyfile: .*\n)  # (  certfile: .*\n)", r"  \1  \2  \3", text,
                  flags=re.M)


def dotenv_keys(path):
    """{NAME: value} of a dotenv example, commented-out `# NAME=value` lines included (a value's
    double quotes removed, as dotenv and bash read it)."""
    found = {}
    for line in (ROOT / path).read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found[match[1]] = match[2].strip('"')
    return found


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    """SkyPilot's view of the two files, of variants of them, and of broken copies."""
    if not SKY_PYTHON.exists():
        pytest.skip(f"SkyPilot's parser is not installed at {SKY_PYTHON}: python3 -m venv "
                    ".venv/sky && .venv/sky/bin/pip install skypilot==0.14.1")
    tmp = tmp_path_factory.mktemp("yaml")

    def variant(name, change):
        config = task("allatonce.yaml")
        change(config)
        path = tmp / name
        path.write_text(yaml.safe_dump(config))
        return str(path)

    env, secrets = str(ROOT / ".env.example"), str(ROOT / ".secrets.example")
    allatonce, service = str(ROOT / "allatonce.yaml"), str(ROOT / "service.yaml")
    with_tls = tmp / "tls.yaml"
    with_tls.write_text(uncomment_tls((ROOT / "service.yaml").read_text()))
    bucket = {"BUCKET_NAME": "my-bucket"}
    cases = {
        "allatonce": [allatonce, env, secrets, bucket],
        "service": [service, env, secrets, bucket],
        "service-tls": [str(with_tls), env, secrets, bucket],
        "no-bucket": [allatonce, env, secrets, {}],
        "spot": [variant("spot.yaml", lambda c: c["resources"].update(use_spot=True)), env,
                 secrets, bucket],
        "unknown-key": [variant("unknown.yaml", lambda c: c["resources"].update(acelerators="L4:1")),
                        env, secrets, bucket],
        "wrong-type": [variant("type.yaml", lambda c: c["resources"].update(disk_size="a lot")),
                       env, secrets, bucket],
    }
    result = subprocess.run([str(SKY_PYTHON), "-c", PARSE, json.dumps(cases)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={"PATH": os.environ["PATH"], "HOME": str(tmp / "home")})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


# ---------------------------------------------------------------- SkyPilot's parser


@pytest.mark.parametrize("name", ["allatonce", "service"])
def test_skypilot_accepts_both_files_with_the_example_env_and_secret_files(parsed, name):
    config = parsed[name]
    assert "error" not in config, config.get("error")
    assert set(SECRETS) <= set(config["secrets"]) and not config["unresolved_secrets"]
    assert not set(SECRETS) & set(config["envs"])
    names = [list(r["accelerators"])[0] for r in config["resources"]]
    gpus = ["L4", "A10G", "T4", "L40S", "A100", "A100-80GB", "H100"]
    assert names == (gpus if name == "allatonce" else [g for g in gpus if g != "T4"])
    for resources in config["resources"]:
        assert list(resources["accelerators"].values()) == [1]  # one GPU
        assert resources["cloud"] is None and int(resources["disk_size"]) >= 100


def test_the_parser_rejects_an_unknown_key_and_a_wrong_type(parsed):
    assert "acelerators" in parsed["unknown-key"]["error"]
    assert "disk_size" in parsed["wrong-type"]["error"]


def test_launching_without_a_bucket_name_is_refused(parsed):
    assert "BUCKET_NAME" in parsed["no-bucket"]["error"]  # .env.example as it is


def test_spot_and_recovery(parsed):
    resources = parsed["spot"]["resources"]
    assert all(r["use_spot"] for r in resources)
    assert all(r["job_recovery"]["strategy"] == "EAGER_NEXT_REGION" for r in resources)
    # a failure of the task is restarted on the retryable exit code alone
    assert all(r["job_recovery"]["max_restarts_on_errors"] == 0 for r in resources)
    assert all(r["job_recovery"]["recover_on_exit_codes"] == [RETRY_EXIT] for r in resources)
    assert not any(r["use_spot"] for r in parsed["allatonce"]["resources"])


def test_the_service_probes_the_model_it_serves(parsed):
    service = parsed["service"]
    assert service["service"]["path"] == "/v1/chat/completions"
    assert service["service"]["post_data"]["model"] == service["envs"]["SERVED_MODEL_NAME"]
    assert service["service"]["post_data"]["messages"]
    assert 1 <= service["service"]["min_replicas"] <= service["service"]["max_replicas"]
    assert all(r["ports"] == ["8000"] for r in service["resources"])


def test_the_documented_tls_section_gives_the_endpoint_https(parsed):
    assert parsed["service"]["service"]["tls"] is None  # as shipped
    tls = parsed["service-tls"]
    assert "error" not in tls, tls.get("error")
    assert tls["service"]["tls"] == ["~/certs/endpoint.key", "~/certs/endpoint.crt"]


# ---------------------------------------------------------------- settings and secrets


def step_settings():
    """{script: its settings (shared ones included)}, read from the scripts themselves."""
    settings = {}
    for script in STEPS:
        spec = importlib.util.spec_from_file_location(script[:-3].replace("-", "_"), ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        settings[script] = SHARED_SETTINGS + module.SETTINGS
    return settings


@pytest.mark.parametrize("name", ["allatonce.yaml", "service.yaml"])
def test_credentials_are_secrets_without_values(name):
    config = task(name)
    assert set(config["secrets"]) <= set(SECRETS) and set(config["secrets"].values()) == {None}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(config["secrets"])
    assert not set(SECRETS) & set(config["envs"])
    assert config["envs"]["BUCKET_NAME"] is None  # the user must choose it


def documented_default(setting):
    """A default as .env.example shows it: one that depends on the machine, as on a node."""
    if setting.env == "NUM_PROC" and setting.default == os.cpu_count():
        return ""  # all cores
    if setting.type is bool:
        return str(int(setting.default))
    return str(setting.default).replace(tempfile.gettempdir(), "/tmp")


def test_the_example_files_hold_every_setting_with_its_default():
    env, secrets = dotenv_keys(".env.example"), dotenv_keys(".secrets.example")
    assert secrets == {name: "" for name in SECRETS}
    assert not set(SECRETS) & set(env)
    for script, settings in step_settings().items():
        for s in settings:
            if s.secret:
                assert s.env in SECRETS, f"{script}: secret {s.env} is missing from SECRETS"
                continue
            if s.env.startswith("SKYPILOT_"):  # set by SkyPilot on each node
                assert s.env not in env
                continue
            assert s.env in env, f"{script}: {s.env} is missing from .env.example"
            if s.default is not None:
                default = documented_default(s)
                assert env[s.env] == default, f"{s.env}: .env.example says {env[s.env]!r}, " \
                                              f"{script} defaults to {default!r}"
    for name, value in task("service.yaml")["envs"].items():
        if value is not None:
            assert env.get(name) == str(value), f"{name}: .env.example says {env.get(name)!r}, " \
                                                f"service.yaml defaults to {value!r}"


def test_the_task_envs_agree_with_the_steps_defaults():
    envs = task("allatonce.yaml")["envs"]
    for script, settings in step_settings().items():
        for s in settings:
            if s.env in envs and s.default is not None:
                assert str(envs[s.env]) == str(s.default), f"{s.env} in allatonce.yaml vs {script}"
    assert envs["DATASET_NAME"] == "mlabonne/FineTome-100k"
    assert envs["MODEL_NAME"] == "Qwen/Qwen2.5-0.5B"
    assert envs["AWS_ENDPOINT_URL_S3"] == "https://t3.storage.dev" and envs["AWS_REGION"] == "auto"


def test_the_service_uses_the_task_settings_and_the_tested_aws_cli():
    task_envs, service_envs = task("allatonce.yaml")["envs"], task("service.yaml")["envs"]
    for name in ("BUCKET_NAME", "DATASET_NAME", "MODEL_NAME", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        assert service_envs[name] == task_envs[name]
    awscli = re.search(r"^awscli==\S+", (ROOT / "requirements.txt").read_text(), re.M)[0]
    assert awscli in task("service.yaml")["setup"]


# ---------------------------------------------------------------- setup blocks


def write_script(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(0o755)


# The torch of PyTorch's cu126 build, as torch.cuda reports it (get_arch_list), on an L4.
CU126_TORCH = {"version": "2.14.1+cu126", "cuda": "12.6", "sees_gpu": True, "capability": [8, 9],
               "archs": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"],
               "kernels_load": True}
CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
VLLM_KERNELS = "vllm._C_stable_libtorch"  # the compiled module of the vllm==0.33.0 wheel on PyPI


@pytest.fixture
def node(tmp_path):
    """A pretend node: HOME, a work dir holding the task's files, and stand-ins on PATH for
    python3 (old or new), conda, nvidia-smi (when a driver is given) and the venv's python: its
    pip logs what it is asked to do, and its Python is this one with a stand-in torch (and vLLM
    kernels) that reports the GPU it is told to."""
    log, bin_, fakes = tmp_path / "log", tmp_path / "bin", tmp_path / "fakes"
    gpu = tmp_path / "gpu.json"
    (fakes / "torch").mkdir(parents=True)
    (fakes / "torch" / "__init__.py").write_text(f"""import json
_gpu = json.load(open({str(gpu)!r}))
__version__ = _gpu["version"]

class version:
    cuda = _gpu["cuda"]

class cuda:
    is_available = staticmethod(lambda: _gpu["sees_gpu"])
    get_device_capability = staticmethod(lambda device=None: tuple(_gpu["capability"]))
    get_arch_list = staticmethod(lambda: _gpu["archs"])
""")
    (fakes / "vllm").mkdir()
    (fakes / "vllm" / "__init__.py").write_text("")
    (fakes / "vllm" / "_C_stable_libtorch.py").write_text(f"""import json
if not json.load(open({str(gpu)!r}))["kernels_load"]:
    raise ImportError("libcudart.so.13: cannot open shared object file:\\nNo such file or directory")
""")
    write_script(tmp_path / "venv-python", f"""echo "venv-python $*" >> {log}
[ "$1 $2" = "-m pip" ] && exit 0
PYTHONPATH={fakes} exec {sys.executable} -S "$@"
""")
    write_script(bin_ / "python3", f"""echo "python3 $*" >> {log}
if [ "$1" = -c ]; then exit $(cat {tmp_path}/python3-too-old 2>/dev/null || echo 0); fi
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp {tmp_path}/venv-python "$3/bin/python"; fi
""")
    write_script(bin_ / "conda", f"""echo "conda $*" >> {log}
mkdir -p "$5/bin"; printf '#!/bin/bash\\nexec {bin_}/python3 "$@"\\n' > "$5/bin/python"; chmod +x "$5/bin/python"
""")
    work = tmp_path / "work"
    work.mkdir()
    for name in ("requirements.txt", "torch-for-driver.sh"):
        (work / name).write_text((ROOT / name).read_text())

    def run(block, python3_too_old=False, driver=None, capability="8.9", torch=(), env=()):
        (tmp_path / "python3-too-old").write_text("1" if python3_too_old else "0")
        gpu.write_text(json.dumps({**CU126_TORCH, **dict(torch)}))
        (bin_ / "nvidia-smi").unlink(missing_ok=True)
        if driver:  # answers --query-gpu=driver_version (or compute_cap) --format=csv,noheader
            write_script(bin_ / "nvidia-smi", f'case "$*" in *driver_version*) echo "{driver}";; '
                                              f'*compute_cap*) echo "{capability}";; *) exit 2;; esac\n')
        env = {"HOME": str(tmp_path / "home"), "PATH": f"{bin_}:/usr/bin:/bin", **dict(env)}
        result = subprocess.run(["bash", "-c", block], cwd=work, env=env, capture_output=True,
                                text=True, timeout=60)
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return result, lines

    run.work = work
    return run


def installs(lines):
    return [line.split("pip install ", 1)[1] for line in lines if " pip install " in line
            and "--upgrade pip" not in line]


def gpu_checks(lines):
    """The arguments of each GPU check the venv's python ran (`python - DRIVER [MODULE...]`)."""
    return [line.split(" ", 2)[2] for line in lines if line.startswith("venv-python - ")]


def torch_from(cuda, version="2.14.1"):
    return f"--extra-index-url https://download.pytorch.org/whl/{cuda} torch=={version}+{cuda}"


SERVICE_PACKAGES = "vllm==0.33.0 awscli==1.46.3"


def test_setup_installs_once_and_again_when_the_requirements_change(node):
    setup = task("allatonce.yaml")["setup"]
    result, lines = node(setup, driver="550.54.15")
    assert result.returncode == 0, result.stderr
    assert installs(lines) == [f"{torch_from('cu126')} -r requirements.txt {UNSLOTH}"]
    assert "python3 -m venv" in " ".join(lines) and not any(x.startswith("conda") for x in lines)

    result, lines = node(setup, driver="550.54.15")
    assert result.returncode == 0 and installs(lines) == []

    with open(node.work / "requirements.txt", "a") as f:
        f.write("tqdm==4.70.1\n")
    result, lines = node(setup, driver="550.54.15")
    assert result.returncode == 0 and installs(lines) == [f"{torch_from('cu126')} -r requirements.txt {UNSLOTH}"]
    result, lines = node(setup, driver="550.54.15", env={"REPORT_TO": "wandb"})
    assert result.returncode == 0 and installs(lines)[0].endswith(f"{UNSLOTH} wandb==0.31.0")


@pytest.mark.parametrize("driver, capability, cuda", [
    (None, None, "cpu"), ("525.60.13", "8.9", "cu126"), ("535.183.01", "8.6", "cu126"),
    ("570.124.06", "8.9", "cu128"), ("575.57.08", "7.5", "cu128"), ("580.95.05", "8.0", "cu130"),
    ("590.44.01", "12.0", "cu130"), ("580.95.05", "7.5", "cu130"),
    # cu128 and cu130 have no kernels below compute capability 7.5: a V100 (7.0) takes cu126
    ("580.95.05", "7.0", "cu126"), ("570.124.06", "7.0", "cu126"), ("550.54.15", "6.0", "cu126")])
def test_training_setup_installs_the_torch_build_of_the_nodes_driver_and_gpu(node, driver, capability, cuda):
    torch = {"capability": [int(part) for part in capability.split(".")],
             "archs": CU126_TORCH["archs"] if cuda == "cu126" else CU130_ARCHS} if capability else {}
    result, lines = node(task("allatonce.yaml")["setup"], driver=driver, capability=capability, torch=torch)
    assert result.returncode == 0, result.stderr
    [packages] = installs(lines)
    assert packages.startswith(torch_from(cuda) + " ")
    assert gpu_checks(lines) == ([driver] if driver else [])


def test_training_setup_refuses_in_one_line_a_torch_without_kernels_for_the_gpu(node):
    # e.g. a venv that a cu128 install left on a disk that now has a V100 (compute capability 7.0)
    torch = {"version": "2.14.1+cu128", "cuda": "12.8", "capability": [7, 0], "archs": CU130_ARCHS}
    for _ in range(2):  # after the install, and again when setup finds it up to date
        result, lines = node(task("allatonce.yaml")["setup"], driver="580.95.05", capability="7.0",
                             torch=torch)
        assert result.returncode != 0
        assert result.stderr.strip().splitlines() == [
            "error: torch 2.14.1+cu128 built for CUDA 12.8 has no kernels for this GPU (compute "
            f"capability 7.0; it has {' '.join(CU130_ARCHS)}): remove the venv and rerun setup, or "
            "pick another GPU in resources.ordered"]
    # the same build runs on 7.5 (sm_75), on 8.9 (sm_86's cubins) and on 12.1 (compute_120's PTX)
    for capability in ([7, 5], [8, 9], [12, 1]):
        result, _ = node(task("allatonce.yaml")["setup"], driver="580.95.05",
                         torch={**torch, "capability": capability})
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["allatonce.yaml", "service.yaml"])
def test_setup_refuses_in_one_line_a_driver_too_old_or_a_torch_blind_to_the_gpu(node, name):
    result, lines = node(task(name)["setup"], driver="470.256.02")
    assert result.returncode != 0 and installs(lines) == []
    [message] = result.stderr.strip().splitlines()
    assert message.startswith("error: ") and "470.256.02" in message

    for _ in range(2):  # after the install, and again when setup finds it up to date
        result, lines = node(task(name)["setup"], driver="580.95.05",
                             torch={"version": "2.14.1+cu130", "cuda": "13.0", "sees_gpu": False})
        assert result.returncode != 0
        [message] = result.stderr.strip().splitlines()
        assert message.startswith("error: nvidia-smi sees a GPU (driver 580.95.05) and torch "
                                  "cannot use it (2.14.1+cu130 built for CUDA 13.0)")


def test_training_setup_names_the_driver_floor_of_pytorchs_builds(node):
    result, _ = node(task("allatonce.yaml")["setup"], driver="470.256.02")
    assert result.stderr.strip().splitlines() == [
        "error: the NVIDIA driver 470.256.02 is too old for PyTorch's CUDA builds (525 or newer): "
        "pick an image with a newer driver (resources.image_id) or another GPU in resources.ordered"]


@pytest.mark.parametrize("name", ["allatonce.yaml", "service.yaml"])
def test_setup_takes_python_from_conda_when_the_image_has_an_old_one(node, name):
    result, lines = node(task(name)["setup"], python3_too_old=True)
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("conda create") and "python=3.11" in line for line in lines)
    assert len(installs(lines)) == 1
    result, lines = node(task(name)["setup"], python3_too_old=True)
    assert result.returncode == 0 and installs(lines) == [] and not lines


SERVING_TORCH = {"version": "2.14.0+cu130", "cuda": "13.0", "archs": CU130_ARCHS}


@pytest.mark.parametrize("driver, capability", [(None, None), ("580.95.05", "8.9"), ("590.44.01", "9.0"),
                                                ("580.95.05", "7.5")])
def test_service_setup_installs_vllm_with_its_own_torch_from_pypi_once(node, driver, capability):
    setup = task("service.yaml")["setup"]
    torch = {**SERVING_TORCH, "capability": [int(part) for part in (capability or "8.9").split(".")]}
    result, lines = node(setup, driver=driver, capability=capability, torch=torch)
    assert result.returncode == 0, result.stderr
    # no torch of PyTorch's indexes beside it: vLLM's wheel is built against the torch it pins
    assert installs(lines) == [SERVICE_PACKAGES]
    assert gpu_checks(lines) == ([f"{driver} {VLLM_KERNELS}"] if driver else [])
    result, lines = node(setup, driver=driver, capability=capability, torch=torch)
    assert result.returncode == 0 and installs(lines) == []
    assert gpu_checks(lines) == ([f"{driver} {VLLM_KERNELS}"] if driver else [])


@pytest.mark.parametrize("driver, capability", [
    ("575.57.08", "8.9"), ("535.183.01", "8.6"), ("525.60.13", "8.0"),  # CUDA 12 drivers
    ("580.95.05", "7.0"),  # a V100: vLLM and torch's CUDA 13 build start at 7.5
    ("470.256.02", "8.0")])
def test_service_setup_refuses_in_one_line_a_node_that_cannot_run_cuda_13(node, driver, capability):
    result, lines = node(task("service.yaml")["setup"], driver=driver, capability=capability)
    assert result.returncode != 0 and installs(lines) == []
    assert result.stderr.strip().splitlines() == [
        "error: vLLM 0.33.0 is built for CUDA 13, which needs an NVIDIA driver 580 or newer and a GPU "
        f"of compute capability 7.5 or more; this node has driver {driver} and compute capability "
        f"{capability}: pick an image with a newer driver (resources.image_id) or another GPU in "
        "resources.ordered"]


def test_service_setup_refuses_in_one_line_vllm_kernels_that_do_not_load(node):
    torch = {**SERVING_TORCH, "kernels_load": False}
    for _ in range(2):  # after the install, and again when setup finds it up to date
        result, _ = node(task("service.yaml")["setup"], driver="580.95.05", torch=torch)
        assert result.returncode != 0
        assert result.stderr.strip().splitlines() == [
            f"error: {VLLM_KERNELS} does not load beside torch 2.14.0+cu130 built for CUDA 13.0 "
            "(ImportError: libcudart.so.13: cannot open shared object file: No such file or "
            "directory): remove the venv and rerun setup"]


# ---------------------------------------------------------------- run blocks


@pytest.fixture
def fake_steps(tmp_path):
    """A venv whose `python` logs the step it is given and fails the one named in FAIL."""
    log = tmp_path / "steps.log"
    venv = tmp_path / "venv"
    write_script(venv / "bin" / "python", f"""echo "start $1" >> {log}
echo "$1 on node $SKYPILOT_NODE_RANK of $SKYPILOT_NUM_NODES" >> {log}.nodes
case "$1" in import-*) sleep 1;; esac
if [ "$1" = "$FAIL" ]; then echo "end $1 failed" >> {log}; exit 3; fi
echo "end $1" >> {log}
""")
    write_script(venv / "bin" / "torchrun", f"""echo "start torchrun $*" >> {log}
echo "end torchrun" >> {log}
""")
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')

    def run(fail="", rank="0", nodes="1", gpus="1"):
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "VENV": str(venv),
               "FAIL": fail, "SKYPILOT_NODE_RANK": rank, "SKYPILOT_NUM_NODES": nodes,
               "SKYPILOT_NUM_GPUS_PER_NODE": gpus, "SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.8",
               "MODEL_NAME": "m", "DATASET_NAME": "d"}
        result = subprocess.run(["bash", "-c", task("allatonce.yaml")["run"]], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        return result, log.read_text().splitlines() if log.exists() else []

    return run


def test_run_names_only_scripts_that_exist():
    named = re.findall(r"python (\S+\.py)", task("allatonce.yaml")["run"])
    assert named == STEPS
    assert all((ROOT / script).exists() for script in named)


def test_run_imports_at_the_same_time_then_pretokenizes_then_trains(fake_steps):
    result, lines = fake_steps()
    assert result.returncode == 0, result.stderr
    for one, other in [("import-dataset.py", "import-model.py"), ("import-model.py", "import-dataset.py")]:
        assert lines.index(f"start {one}") < lines.index(f"end {other}")  # at the same time
    assert lines[-4:] == ["start pretokenize.py", "end pretokenize.py",
                          "start dotrain.py", "end dotrain.py"]


@pytest.mark.parametrize("failing", ["import-dataset.py", "import-model.py", "pretokenize.py"])
def test_run_stops_at_the_first_failing_step(fake_steps, failing):
    result, lines = fake_steps(fail=failing)
    assert result.returncode != 0
    assert f"end {failing} failed" in lines
    assert "start dotrain.py" not in lines
    if failing.startswith("import"):
        assert "start pretokenize.py" not in lines


def test_on_several_nodes_node_0_imports_and_all_pretokenize_and_train_with_torchrun(fake_steps):
    result, lines = fake_steps(rank="1", nodes="2", gpus="4")
    assert result.returncode == 0, result.stderr
    started = [line for line in lines if line.startswith("start")]
    # `python -c`: RUN_NAME checked; `python -`: waiting for the imports, then for every node's shards
    assert started[:5] == ["start -c", "start -", "start -", "start pretokenize.py", "start -"]
    assert started[5] == ("start torchrun --nnodes 2 --nproc-per-node 4 --node-rank 1 "
                          "--master-addr 10.0.0.7 --master-port 29500 dotrain.py")
    result, lines = fake_steps(rank="0", nodes="2", gpus="4")
    started = [line for line in lines if line.startswith("start")][6:]
    assert started[0] == "start -c"
    assert {started[1], started[2]} == {"start import-dataset.py", "start import-model.py"}
    assert started[3:5] == ["start pretokenize.py", "start -"]
    assert "--node-rank 0 " in started[5]


def test_one_node_with_one_gpu_trains_without_torchrun(fake_steps):
    result, lines = fake_steps(rank="0", nodes="1", gpus="1")
    assert result.returncode == 0 and not any("torchrun" in line or line == "start -" for line in lines)


def test_a_run_name_dotrain_would_refuse_stops_the_run_block_before_any_step(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "VENV": str(ROOT / ".venv"),
           "RUN_NAME": "lr 1e-4"}
    result = subprocess.run(["bash", "-c", task("allatonce.yaml")["run"]], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: RUN_NAME='lr 1e-4': use letters, digits, '.', '_' and '-', and none of "
        "_manifest.json, latest.json, lease.json, lora_model, fused, metrics.json, loss.png, "
        "tensorboard or checkpoint-*")


# ---------------------------------------------------------------- the service's run block


@pytest.fixture
def replica(tmp_path, s3):
    """A pretend replica: the project's venv (its aws CLI) as ~/venv-serve, a stand-in vllm
    that logs its arguments and the key it was given, the service's settings, and a bucket that
    the test fills with a base model and runs."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    venv = home / "venv-serve"
    write_script(venv / "bin" / "vllm", f'echo "vllm $*" > {tmp_path}/vllm.log; '
                 f'echo "key $VLLM_API_KEY" >> {tmp_path}/vllm.log\n')
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:{ROOT}/.venv/bin:$PATH"\n')
    (venv / "aws-config").write_text("[default]\ns3 =\n  addressing_style = path\n")  # loopback
    envs = {k: str(v) for k, v in task("service.yaml")["envs"].items() if v is not None}
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)

    def put(key, body):
        client.put_object(Bucket=TEST_BUCKET, Key=key, Body=body if isinstance(body, bytes) else body.encode())

    def put_base(model_type="qwen2"):
        base = f"models/{envs['MODEL_NAME']}"
        put(f"{base}/config.json", json.dumps({"model_type": model_type}))
        put(f"{base}/model.safetensors", "base weights")
        put(f"{base}/tokenizer_config.json", "the base's tokenizer")
        put(f"{base}/_manifest.json", json.dumps({"complete": True}))

    def put_run(run_name="", complete=True, model_type="qwen2", rank=16, tokenizer="the runs' tokenizer",
                template="the runs' template", max_seq_length=4096):
        done = f"done/{envs['MODEL_NAME']}/{envs['DATASET_NAME']}" + (f"/{run_name}" if run_name else "")
        put(f"{done}/_manifest.json", json.dumps({"complete": complete,
                                                  "inputs": {"max_seq_length": max_seq_length}}))
        put(f"{done}/fused/config.json", json.dumps({"model_type": model_type}))
        put(f"{done}/fused/model.safetensors", f"{run_name}/model.safetensors")
        put(f"{done}/lora_model/adapter_config.json", json.dumps({"r": rank}))
        put(f"{done}/lora_model/adapter_model.safetensors", f"{run_name}/adapter")
        put(f"{done}/lora_model/tokenizer_config.json", tokenizer)
        if template is not None:
            put(f"{done}/lora_model/chat_template.jinja", template)
        put(f"{done}/lora_model/generation_config.json", "the runs' stops")

    def serve(api_key=SERVE_KEY, **settings):
        env = {"PATH": os.environ["PATH"], "HOME": str(home), **envs, **s3, "SERVE_API_KEY": api_key,
               **settings}
        result = subprocess.run(["bash", "-c", task("service.yaml")["run"]], cwd=work, env=env,
                                capture_output=True, text=True, timeout=120)
        log = tmp_path / "vllm.log"
        return result, log.read_text().splitlines() if log.exists() else None

    return SimpleNamespace(work=work, put_base=put_base, put_run=put_run, serve=serve)


SERVE_KEY = "serve-key-7d1e5a"
VLLM = "vllm serve ./model --host 0.0.0.0 --port 8000 --max-model-len 4096"
HERMES = "--enable-auto-tool-choice --tool-call-parser hermes"


@pytest.mark.parametrize("run_name", ["", "lr-1e-4"])
def test_the_service_pulls_the_fused_model_and_serves_it_behind_its_key(replica, run_name):
    replica.put_run(run_name)
    result, vllm = replica.serve(RUN_NAME=run_name)
    assert result.returncode == 0, result.stderr
    assert vllm == [f"{VLLM} --served-model-name finetuned {HERMES}", f"key {SERVE_KEY}"]
    assert (replica.work / "model" / "model.safetensors").read_bytes() == f"{run_name}/model.safetensors".encode()
    assert FAKE_SECRET not in result.stdout + result.stderr and SERVE_KEY not in result.stdout + result.stderr


@pytest.mark.parametrize("model_type, parser", [("qwen2", "hermes"), ("qwen3", "hermes"),
                                                ("llama", "llama3_json"), ("mistral", "mistral")])
def test_the_service_returns_tool_calls_with_the_parser_of_the_models_family(replica, model_type, parser):
    replica.put_run(model_type=model_type)
    result, vllm = replica.serve()
    assert result.returncode == 0, result.stderr
    assert vllm[0].endswith(f" --enable-auto-tool-choice --tool-call-parser {parser}")


def test_tool_call_parser_can_be_named_or_turned_off(replica):
    replica.put_run(model_type="gpt2")  # no parser known for it
    result, vllm = replica.serve()
    assert result.returncode == 0, result.stderr
    assert vllm[0] == f"{VLLM} --served-model-name finetuned"
    assert "no tool-call parser is known for model_type 'gpt2'" in result.stdout
    result, vllm = replica.serve(TOOL_CALL_PARSER="pythonic")
    assert vllm[0] == f"{VLLM} --served-model-name finetuned --enable-auto-tool-choice --tool-call-parser pythonic"
    replica.put_run(model_type="qwen2")
    result, vllm = replica.serve(TOOL_CALL_PARSER="none")
    assert vllm[0] == f"{VLLM} --served-model-name finetuned"


# RUN_NAME's run answers to SERVED_MODEL_NAME alone: one adapter, one of --max-loras' slots
@pytest.mark.parametrize("run_name, others, served", [("", ["lr-1e-4"], ""), ("lr-1e-4", [], "lr-1e-4/")])
def test_with_adapters_one_endpoint_serves_the_base_and_every_complete_run_by_name(replica, run_name,
                                                                                    others, served):
    replica.put_base()
    replica.put_run("", rank=16)
    replica.put_run("lr-1e-4", rank=24)
    replica.put_run("lr-3e-4", complete=False, rank=64)  # still training: not served
    result, vllm = replica.serve(ADAPTERS="1", RUN_NAME=run_name)
    assert result.returncode == 0, result.stderr
    runs = replica.work / "runs"
    modules = [f"{run}={runs}/{run}/lora_model" for run in others] + [f"finetuned={runs}/{served}lora_model"]
    assert vllm[0] == (f"{VLLM} --served-model-name Qwen/Qwen2.5-0.5B --enable-lora --max-lora-rank 32 "
                       f"--max-loras {len(modules)} --lora-modules {' '.join(modules)} {HERMES}")
    # the bucket's base, with the runs' tokenizer and generation config, as in their fused/
    model = replica.work / "model"
    assert (model / "model.safetensors").read_text() == "base weights"
    assert (model / "tokenizer_config.json").read_text() == "the runs' tokenizer"
    assert (model / "generation_config.json").read_text() == "the runs' stops"
    assert not list(model.glob("adapter_*"))


def test_with_adapters_runs_of_another_tokenizer_or_chat_template_are_left_out_and_named(replica):
    replica.put_base()
    replica.put_run("")
    replica.put_run("lr-1e-4")
    replica.put_run("chatml", template="chatml")  # a sweep over CHAT_TEMPLATE
    replica.put_run("no-template", template=None)
    replica.put_run("other-tokenizer", tokenizer="another tokenizer")
    result, vllm = replica.serve(ADAPTERS="1")
    assert result.returncode == 0, result.stderr
    runs, model = replica.work / "runs", replica.work / "model"
    assert f"--max-loras 2 --lora-modules lr-1e-4={runs}/lr-1e-4/lora_model finetuned={runs}/lora_model " in vllm[0]
    assert ("not served: chatml, no-template, other-tokenizer: their tokenizer or chat template differs "
            "from that of RUN_NAME's run (the unnamed run), which the base is served with; serve them "
            "from a service whose RUN_NAME is one of them") in result.stdout.splitlines()
    assert (model / "chat_template.jinja").read_text() == "the runs' template"

    result, vllm = replica.serve(ADAPTERS="1", RUN_NAME="chatml")
    assert result.returncode == 0, result.stderr
    assert f"--max-loras 1 --lora-modules finetuned={runs}/chatml/lora_model " in vllm[0]
    assert "not served: lr-1e-4, no-template, other-tokenizer: " in result.stdout
    assert (model / "chat_template.jinja").read_text() == "chatml"


def test_the_context_is_the_longest_sequence_the_served_runs_were_trained_on(replica):
    assert "MAX_SEQ_LENGTH" not in task("service.yaml")["envs"]
    replica.put_base()
    replica.put_run("", max_seq_length=8192)
    replica.put_run("short", max_seq_length=2048)
    replica.put_run("long", max_seq_length=16384)
    replica.put_run("chatml", max_seq_length=32768, template="chatml")  # not served: not counted
    replica.put_run("training", complete=False, max_seq_length=65536)  # nor this one
    # the same .env as training's may hold another MAX_SEQ_LENGTH: the runs' own is served
    for settings, context in [({}, 8192), ({"MAX_SEQ_LENGTH": "4096"}, 8192), ({"RUN_NAME": "short"}, 2048),
                              ({"ADAPTERS": "1"}, 16384), ({"ADAPTERS": "1", "RUN_NAME": "short"}, 16384)]:
        result, vllm = replica.serve(**settings)
        assert result.returncode == 0, result.stderr
        assert f" --max-model-len {context} " in vllm[0], settings


def test_with_adapters_a_rank_above_what_vllm_takes_is_refused_in_one_line(replica):
    replica.put_base()
    replica.put_run("", rank=1024)
    result, vllm = replica.serve(ADAPTERS="1")
    assert result.returncode != 0 and vllm is None
    assert result.stderr.strip() == ("error: LoRA rank 1024 is above vLLM's largest, 512: serve the fused "
                                     "models (ADAPTERS=0)")


def test_the_service_refuses_to_serve_without_a_key(replica):
    replica.put_run()
    result, vllm = replica.serve(api_key="")
    assert result.returncode != 0 and vllm is None
    assert result.stderr.strip() == ("error: SERVE_API_KEY is not set: give the endpoint a key (in "
                                     ".secrets, or --secret SERVE_API_KEY)")


def test_the_probe_sends_the_key():
    probe = task("service.yaml")["service"]["readiness_probe"]
    assert probe["headers"] == {"Authorization": "Bearer $SERVE_API_KEY"}


def test_the_service_refuses_an_unfinished_model(replica):
    replica.put_run(complete=False)
    result, vllm = replica.serve()
    assert result.returncode != 0 and vllm is None
    assert "training has not finished" in result.stderr
