"""README.md checked where a machine can check it offline: the settings table, that its shell
snippets parse and its aws commands take either form of BUCKET_NAME, that every SkyPilot
command it names exists with the flags shown (SkyPilot's own CLI parser, in .venv/sky), that
.env.example reads the same in SkyPilot and in bash, and that its figures follow the bench's."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, fixture_path

import common

STEPS = ["import-dataset.py", "import-model.py", "pretokenize.py", "dotrain.py"]
SKY_PYTHON = Path(os.environ.get("SKYPILOT_PYTHON", ROOT / ".venv" / "sky" / "bin" / "python"))
README = (ROOT / "README.md").read_text()
FLAT = " ".join(README.split())  # the text with its line breaks and indents as single spaces


def settings_of(script):
    spec = importlib.util.spec_from_file_location(script[:-3].replace("-", "_"), ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return common.SHARED_SETTINGS + module.SETTINGS


def blocks(language):
    """The README's fenced code blocks in a language, dedented (some sit in list items)."""
    return [textwrap.dedent(match[3]) for match in re.finditer(
        r"^( *)```(\w*)\n(.*?)^\1```", README, flags=re.M | re.S) if match[2] == language]


def inline_code():
    return re.findall(r"`([^`\n]+)`", README)


def sky_python():
    if not SKY_PYTHON.exists():
        pytest.skip(f"SkyPilot is not installed at {SKY_PYTHON}: python3 -m venv .venv/sky && "
                    ".venv/sky/bin/pip install skypilot==0.14.1")
    return str(SKY_PYTHON)


def run_in_sky_venv(code, cwd, home, *args):
    result = subprocess.run([sky_python(), "-c", code, *args], cwd=cwd, capture_output=True,
                            text=True, timeout=300,
                            env={"PATH": os.environ["PATH"], "HOME": str(home)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_every_setting_is_in_the_readme_table_with_its_flag():
    rows = {line.split("|")[1].strip().strip("`"): line for line in README.splitlines()
            if line.startswith("| `")}
    for script in STEPS:
        for setting in settings_of(script):
            assert setting.env in rows, f"{setting.env} ({script}) is missing from README.md"
            if not setting.secret:
                assert f"`{setting.flag}`" in rows[setting.env], setting.env


def test_readme_shows_the_two_commands_and_the_launch_line():
    assert "make demo" in README and "make test" in README
    assert "sky launch -c train allatonce.yaml --env-file .env --secret-file .secrets" in README


# ---------------------------------------------------------------- shell and Python snippets


def test_every_shell_snippet_parses():
    for block in blocks("bash"):
        result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert result.returncode == 0, f"{result.stderr}\n{block}"


def test_every_python_snippet_compiles():
    for block in blocks("python"):
        compile(block, "README.md", "exec")


# Parses each command line as `sky` would, without running it: SkyPilot's click group resolves
# the subcommands and checks every option and argument (a file option reads its file).
PARSE_SKY = r"""
import json, shlex, sys
import click
from sky.client.cli import command

def parse(line, named):
    args = shlex.split(line, comments=True)[1:]
    try:
        ctx = command.cli.make_context("sky", args)
        group, rest = command.cli, ctx.protected_args + ctx.args
        while isinstance(group, click.Group) and rest:
            name, group, rest = group.resolve_command(ctx, rest)
            ctx = group.make_context(name, rest, parent=ctx)
            rest = ctx.protected_args + ctx.args if isinstance(group, click.Group) else []
    except click.exceptions.Exit:  # --help
        return None
    except click.MissingParameter as e:  # a command named in the text, without its arguments
        return None if named else e.format_message()
    except click.ClickException as e:
        return e.format_message()
    return None

print(json.dumps({line: parse(line, named) for line, named in json.loads(sys.argv[1])}))
"""


def sky_commands():
    """[command, named] of every `sky ...` command in the README's snippets and text and in the
    example files' comments, placeholders such as <id> filled in. `named`: a command the text
    names (`sky jobs launch`), whose arguments may be left out; elided ones (...) are left out."""
    named = {code for code in inline_code() if code.startswith("sky ") and "..." not in code}
    found = list(named)
    for block in blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*", "", line)
            found += re.findall(r"^\s*(sky .*)$", line) + re.findall(r"\$\((sky [^)]*)\)", line)
    for name in ("allatonce.yaml", "service.yaml", ".env.example", ".secrets.example"):
        for line in (ROOT / name).read_text().splitlines():
            found += re.findall(r"^#\s+(sky .*)$", line)
            found += [m.rstrip(";,.") for m in re.findall(r"(?<=: |, )(sky [a-z][^,;]*)", line)
                      if line.startswith("#")]
    return sorted([re.sub(r"<[^>]+>", "1", command), command in named] for command in set(found))


def test_the_sky_commands_exist_with_the_flags_shown(tmp_path):
    for name in (".env", ".secrets"):  # --env-file and --secret-file read their file
        shutil.copy(ROOT / f"{name}.example", tmp_path / name)
    commands = sky_commands()
    assert ["sky jobs logs --controller 1", False] in commands
    assert ["sky serve down finetuned", False] in commands
    errors = run_in_sky_venv(PARSE_SKY, tmp_path, tmp_path / "home", json.dumps(commands))
    assert {line: error for line, error in errors.items() if error} == {}


def test_a_pinned_gpu_keeps_the_yamls_recovery_policy(tmp_path):
    """`sky jobs launch allatonce.yaml --gpus L4:1 --use-spot` as SkyPilot's CLI builds it."""
    assert "sky jobs launch allatonce.yaml --gpus L4:1 --use-spot" in README
    code = r"""
import json
from sky.client.cli import command
task = command._make_task_or_dag_from_entrypoint_with_overrides(
    ("allatonce.yaml",), gpus="L4:1", use_spot=True, env=[("BUCKET_NAME", "my-bucket")])
print(json.dumps([{"accelerators": r.accelerators, "use_spot": r.use_spot, "disk_size": r.disk_size,
                   "job_recovery": r.job_recovery} for r in task.resources]))
"""
    resources = yaml.safe_load((ROOT / "allatonce.yaml").read_text())["resources"]
    pinned = run_in_sky_venv(code, ROOT, tmp_path / "home")
    assert len(pinned) == len(resources["ordered"])
    for entry in pinned:
        assert entry["accelerators"] == {"L4": 1} and entry["use_spot"]
        assert entry["disk_size"] == resources["disk_size"]
        assert entry["job_recovery"] == resources["job_recovery"]


# ---------------------------------------------------------------- .env, aws commands


def uncommented(path, tmp_path):
    """The example file with every `# NAME=value` line uncommented, as a user sets them."""
    lines = [re.sub(r"^#\s*(?=[A-Z][A-Z0-9_]*=)", "", line)
             for line in (ROOT / path).read_text().splitlines()]
    copy = tmp_path / path
    copy.write_text("\n".join(lines) + "\n")
    return copy


@pytest.mark.parametrize("path", [".env.example", ".secrets.example"])
def test_skypilot_and_bash_read_the_example_files_alike(path, tmp_path):
    copy = uncommented(path, tmp_path)
    by_dotenv = run_in_sky_venv("import dotenv, json, sys; print(json.dumps(dotenv.dotenv_values("
                                "sys.argv[1])))", tmp_path, tmp_path / "home", str(copy))
    script = ('set -a; . "$1"; set +a; '
              'for name in "${@:2}"; do printf "%s\\0" "${!name-(unset)}"; done')
    result = subprocess.run([shutil.which("bash"), "-c", script, "bash", str(copy), *by_dotenv],
                            env={}, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr, result.stderr
    by_bash = dict(zip(by_dotenv, result.stdout.split("\0")))
    assert by_bash == by_dotenv
    if path == ".env.example":  # the values that need quotes are there
        assert " " in by_dotenv["SAMPLE_PROMPT"] and by_dotenv["MODEL_CACHE_DIR"].startswith("~")


def aws_snippets():
    """The README's shell snippets that run aws, whole (their variables set before), and its
    inline aws commands."""
    return [b for b in blocks("bash") if re.search(r"^\s*aws s3 ", b, flags=re.M)] + \
        [code for code in inline_code() if code.startswith("aws ") and "s3://" in code]


STAND_INS = """
aws() { printf '%s\\n' "$@" >> "$AWS_ARGS"; }
python() { cat > /dev/null; }
sky() { echo http://127.0.0.1:1; }
curl() { :; }
"""


@pytest.mark.parametrize("bucket_name, root", [("my-bucket", "s3://my-bucket/"),
                                               ("s3://my-bucket/team/a", "s3://my-bucket/team/a/")])
def test_the_aws_commands_take_either_form_of_bucket_name(bucket_name, root, tmp_path):
    (tmp_path / ".env").write_text(f"BUCKET_NAME={bucket_name}\nMODEL_NAME=Qwen/Qwen2.5-0.5B\n"
                                   "DATASET_NAME=mlabonne/FineTome-100k\n")
    (tmp_path / ".secrets").write_text("AWS_ACCESS_KEY_ID=x\nAWS_SECRET_ACCESS_KEY=y\n")
    snippets = aws_snippets()
    assert len(snippets) >= 2
    for snippet in snippets:
        args = tmp_path / "aws-args"
        args.write_text("")
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "AWS_ARGS": str(args),
               "BUCKET_NAME": bucket_name}
        result = subprocess.run(["bash", "-c", STAND_INS + snippet], cwd=tmp_path, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{result.stderr}\n{snippet}"
        urls = [arg for arg in args.read_text().splitlines() if arg.startswith("s3:")]
        assert urls, snippet
        assert all(url.startswith(root) for url in urls), (urls, snippet)


def test_the_aws_setup_writes_a_config_of_its_own(tmp_path):
    """The README's aws setup makes the CLI use virtual-hosted addressing (Tigris) without
    touching ~/.aws (the real aws CLI of the project's venv reads it back)."""
    [setup] = [b for b in blocks("bash") if "addressing_style = virtual" in b]
    check = "\naws configure get default.s3.addressing_style\n"
    venv_bin = str(ROOT / ".venv" / "bin")
    result = subprocess.run(["bash", "-c", setup + check], capture_output=True, text=True,
                            env={"PATH": f"{venv_bin}:{os.environ['PATH']}", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "virtual"
    assert not (tmp_path / ".aws").exists()
    assert not any("aws configure set" in block for block in blocks("bash"))  # a user's own config


# ---------------------------------------------------------------- the bucket layout, figures


def test_the_outputs_show_where_a_named_run_goes():
    comments = [line for line in (ROOT / "allatonce.yaml").read_text().splitlines()
                if re.match(r"#\s+(checkpoints|done)/", line)]
    contract = [line for line in README.splitlines() if re.match(r"(checkpoints|done)/", line)]
    for line in comments + contract:
        assert "<DATASET_NAME>[/<RUN_NAME>]/" in line, line
    assert len(comments) == len(contract) == 2


def test_the_time_and_cost_follow_the_bench_figures():
    """The L4 estimate: the H200's measured tokens/s of the backend TRAIN_BACKEND=auto picks for
    Qwen2.5-0.5B, scaled by the two GPUs' dense bf16 peaks (TRL's table, as metrics.json's MFU)."""
    from trl.trainer.utils import get_peak_flops

    from training.speed import measured_faster

    spec = importlib.util.spec_from_file_location("gpu_train", ROOT / "bench" / "gpu_train.py")
    gpu_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_train)
    measured = json.loads((ROOT / "bench" / "results" / "gpu_train.json").read_text())
    faster = measured_faster(json.loads(fixture_path("tokenizers", "qwen2.5-0.5b", "config.json").read_text()),
                             False, True, (9, 0))[0]
    run = measured["runs"][f"{faster}_packed"]
    assert measured["machine"]["gpu"] == "NVIDIA H200"
    l4 = run["tokens_per_second"] * get_peak_flops("NVIDIA L4", "bfloat16") \
        / get_peak_flops("NVIDIA H200", "bfloat16")
    hours = gpu_train.FINETOME_TOKENS / l4 / 3600
    assert f"{run['tokens_per_second']:,} trained tokens a second" in FLAT
    assert f"about {l4:,.0f} tokens a second" in FLAT
    assert f"**about {round(hours)} hours**" in FLAT
    prices = re.findall(r"\$([\d.]+-[\d.]+) an hour on (?:demand|spot)[^$]*?\$(\d+-\d+)", FLAT)
    assert len(prices) == 2
    for per_hour, total in prices:
        low, high = (float(x) for x in per_hour.split("-"))
        assert total == f"{round(low * hours)}-{round(high * hours)}", (per_hour, total)
