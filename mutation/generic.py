"""The generic mutation run: mutmut (pinned in constraints.txt, the ``mutation`` extra) over the maths core
(``aclab/core``) and the env layer's autoreset / truncation code (``VecEnv.reset`` and ``VecEnv.step`` in
``aclab/envs/vec.py``), against the fast tests listed under ``[tool.mutmut]`` in pyproject.toml.

Each surviving mutant must be killed by a test or recorded in ``mutation/equivalent.toml`` with the reason
it cannot change behaviour::

    [[equivalent]]
    mutant = "aclab.core.losses.x_value_loss__mutmut_12"   # mutmut's name
    line = "clipped_values = old_values + ..."             # the mutated line (checked: names drift)
    reason = "why no input can tell it from the original"

Score = (killed + timeouts) / (all mutants - equivalents); mutmut's own convention counts a timeout as
killed. A mutant no selected test reaches ("no tests") counts as a survivor. The run prints the score and
every survivor (with ``mutmut show``'s diff), and exits 1 below ``--min-score`` (default 90) or when a
recorded equivalent no longer matches its mutant.

    python mutation/generic.py [--max-children N] [--min-score S] [--report-only]
    make mutation-generic
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SCOPE = ("aclab.core.*", "aclab.envs.vec.xǁVecEnvǁstep__mutmut_*", "aclab.envs.vec.xǁVecEnvǁreset__mutmut_*")
EQUIVALENT = ROOT / "mutation" / "equivalent.toml"
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def _mutmut() -> list[str]:
    exe = Path(sys.executable).with_name("mutmut")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mutmut"]


def load_results(root: Path = ROOT) -> dict[str, str]:
    """mutant name -> status, for the mutants in :data:`SCOPE`, from mutmut's ``mutants/**/*.meta``."""
    out = {}
    for meta in (root / "mutants").rglob("*.meta"):
        data = json.loads(meta.read_text(encoding="utf-8"))
        for name, code in data.get("exit_code_by_key", {}).items():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in SCOPE):
                out[name] = STATUS.get(code, "suspicious")
    return out


def load_equivalents(path: Path = EQUIVALENT) -> list[dict]:
    if not path.exists():
        return []
    entries = tomllib.loads(path.read_text(encoding="utf-8")).get("equivalent", [])
    for entry in entries:
        missing = {"mutant", "line", "reason"} - set(entry)
        if missing:
            raise SystemExit(f"{path.name}: entry {entry.get('mutant', '?')} lacks {sorted(missing)}")
    return entries


def show(name: str) -> str:
    return subprocess.run([*_mutmut(), "show", name], cwd=ROOT, capture_output=True, text=True).stdout


def mutated_line(diff: str) -> str:
    """The first added line of ``mutmut show``'s diff, stripped."""
    for line in diff.splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            return line[1:].strip()
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--min-score", type=float, default=90.0)
    parser.add_argument("--report-only", action="store_true", help="score the last run without running mutmut")
    args = parser.parse_args(argv)
    if not args.report_only:
        # a fresh run: mutmut caches verdicts and the test-to-function map in mutants/, which would
        # otherwise outlive changes to the code or the tests
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        subprocess.run([*_mutmut(), "run", "--max-children", str(args.max_children), *SCOPE], cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL)
    results = load_results()
    if not results:
        print("no mutmut results for the scope; run without --report-only", file=sys.stderr)
        return 2
    equivalents = load_equivalents()
    stale, equivalent_names = [], set()
    for entry in equivalents:
        if entry["mutant"] not in results:
            stale.append(f"{entry['mutant']}: no such mutant any more")
            continue
        line = mutated_line(show(entry["mutant"]))
        if line != entry["line"].strip():
            stale.append(f"{entry['mutant']}: now mutates {line!r}, recorded {entry['line']!r}")
            continue
        equivalent_names.add(entry["mutant"])
    counted = {name: status for name, status in results.items() if name not in equivalent_names}
    killed = sum(status in ("killed", "timeout") for status in counted.values())
    survivors = sorted(name for name, status in counted.items() if status not in ("killed", "timeout"))
    by_status: dict[str, int] = {}
    for status in results.values():
        by_status[status] = by_status.get(status, 0) + 1
    score = 100.0 * killed / max(len(counted), 1)
    print(f"mutmut over {', '.join(SCOPE)}: {len(results)} mutants {by_status}")
    print(f"equivalent (mutation/equivalent.toml): {len(equivalent_names)}")
    for name in survivors:
        print(f"\n{counted[name]}: {name}\n{show(name)}")
    for problem in stale:
        print(f"stale equivalent: {problem}")
    print(f"\ngeneric mutation score: killed {killed} of {len(counted)} = {score:.1f}% "
          f"(after {len(equivalent_names)} equivalents; {len(survivors)} not killed)")
    return 0 if score >= args.min_score and not stale else 1


if __name__ == "__main__":
    sys.exit(main())
