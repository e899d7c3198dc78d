"""The documentation: the site builds without a warning (strict), its examples run, the getting-started
page carries the README's commands."""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).parent / "mkdocs"
    proc = subprocess.run([str(mkdocs), "build", "--strict", "-d", str(out)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    return out


def test_site_builds_in_strict_mode_with_api_pages(site):
    api = (site / "api" / "train" / "index.html").read_text()
    assert "make_config" in api and "env_factory" in api  # rendered from the docstrings
    assert "StopOnReturn" in (site / "api" / "callbacks" / "index.html").read_text()


def test_getting_started_carries_the_readme_commands(site):
    readme = (ROOT / "README.md").read_text()
    page = html.unescape(re.sub(r"<[^>]+>", "", (site / "getting-started" / "index.html").read_text()))
    using = re.search(r"## Using it\n.*?```\n(.*?)```", readme, re.S).group(1)
    for line in using.strip().splitlines() + ["make demo", "make test"]:
        assert line in page, line
    assert "two commands do all set-up" in page


def test_own_env_example_trains_and_the_cli_makes_a_video_of_it(tmp_path, monkeypatch, capsys):
    from aclab.cli import main

    monkeypatch.syspath_prepend(str(EXAMPLES))
    own_env = _module("own_env")
    summary = own_env.main(run_dir=tmp_path / "corridor", total_steps=2048)
    assert summary["status"] == "finished"
    config = json.loads((tmp_path / "corridor" / "config.json").read_text())
    assert config["env"]["id"] == "factory:own_env:make_corridor" and config["env"]["options"] == {"length": 6}
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "corridor"), "--video", str(tmp_path / "v"), "--gif"]) == 0
    assert "steps" in capsys.readouterr().out and list((tmp_path / "v").glob("*.gif"))


def test_callbacks_example_runs(tmp_path, capsys):
    callbacks = _module("callbacks")
    summary = callbacks.main(run_dir=tmp_path / "cp", total_steps=12_000)
    out = capsys.readouterr().out
    assert summary["status"] in ("finished", "stopped") and "test return" in out and "checkpoint ckpt_" in out


def test_tune_example_spec_is_valid():
    from aclab.tune import load_tune_spec

    spec = load_tune_spec(EXAMPLES / "tune_ppo_cartpole.toml")
    assert {p.key for p in spec.space} == {"params.lr", "params.num_epochs", "params.gae_lambda", "params.ent_coef"}
