"""The semantic mutation suite's data (mutation/mutants/*.toml) stays runnable: valid TOML, the required
fields, unique family-prefixed ids, each fragment found exactly once in its file, each mutated file still
compiling, and each named test path existing. `make mutation` runs the mutants themselves."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def semantic():
    spec = importlib.util.spec_from_file_location("mutation_semantic", ROOT / "mutation" / "semantic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_mutant_can_be_applied_and_names_existing_tests(semantic):
    mutants, _ = semantic.load_all()
    assert len(mutants) >= 1
    problems = semantic.integrity_problems()
    assert not problems, "stale or malformed mutants:\n" + "\n".join(problems)


def test_the_integrity_check_catches_stale_and_malformed_mutants(semantic, tmp_path):
    (tmp_path / "aclab").mkdir()
    (tmp_path / "aclab" / "m.py").write_text("x = 1\ny = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_m.py").write_text("def test_a():\n    pass\n")
    mutants = tmp_path / "mutants"
    mutants.mkdir()
    (mutants / "ppo.toml").write_text('''
[[mutant]]
id = "ppo-ok"
file = "aclab/m.py"
find = "x = 1"
replace = "x = 2"
breaks = "b"
tests = ["tests/test_m.py::test_a"]

[[mutant]]
id = "ppo-ambiguous"
file = "aclab/m.py"
find = "= 1"
replace = "= 2"
breaks = "b"
tests = ["tests/test_m.py"]

[[mutant]]
id = "ppo-syntax"
file = "aclab/m.py"
find = "y = 1"
replace = "y = ("
breaks = "b"
tests = ["tests/test_m.py::test_missing"]

[[mutant]]
id = "ppo-ok"
file = "aclab/gone.py"
find = "a"
replace = "b"
breaks = "b"
tests = ["tests/test_gone.py"]

[[mutant]]
id = "fixpo-wrong-prefix"
file = "aclab/m.py"
find = "x = 1"
replace = "x = 3"
breaks = "b"
tests = []

[[mutant]]
id = "ppo-typo"
file = "aclab/m.py"
find = "x = 1"
replace = "x = 3"
break = "b"
tests = ["tests/test_m.py"]
''')
    (mutants / "nofamily.toml").write_text("[[mutant]\n")
    loaded, _ = semantic.load_all(mutants)
    assert semantic.check_mutant(loaded[0], tmp_path) == []  # the well-formed one passes
    problems = "\n".join(semantic.integrity_problems(mutants, tmp_path))
    for expected in ("ppo-ambiguous: fragment occurs 2 times", "ppo-syntax: the mutated file does not compile",
                     "no test or class named 'test_missing'", "ppo-ok: duplicate id",
                     "ppo-ok: file 'aclab/gone.py' does not exist", "test path 'tests/test_gone.py' does not exist",
                     "'tests' must be a non-empty list", "missing required field 'breaks'", "unknown fields ['break']",
                     "nofamily.toml: unknown family", "nofamily.toml: not valid TOML"):
        assert expected in problems, expected
