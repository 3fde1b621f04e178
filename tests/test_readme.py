"""The README's settings table lists every setting of every step, as --help does."""

import importlib.util

import common
from conftest import ROOT

STEPS = ["import-dataset.py", "import-model.py", "pretokenize.py", "dotrain.py"]


def settings_of(script):
    spec = importlib.util.spec_from_file_location(script[:-3].replace("-", "_"), ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return common.SHARED_SETTINGS + module.SETTINGS


def test_every_setting_is_in_the_readme_table_with_its_flag():
    readme = (ROOT / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in readme.splitlines()
            if line.startswith("| `")}
    for script in STEPS:
        for setting in settings_of(script):
            assert setting.env in rows, f"{setting.env} ({script}) is missing from README.md"
            if not setting.secret:
                assert f"`{setting.flag}`" in rows[setting.env], setting.env


def test_readme_shows_the_two_commands_and_the_launch_line():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "sky launch -c train allatonce.yaml --env-file .env --secret-file .secrets" in readme
