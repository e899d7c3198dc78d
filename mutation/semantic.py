"""The semantic mutation suite: hand-written mutants that break one behaviour each, and a runner that
checks the fast tests notice.

Each mutant lives in ``mutation/mutants/<family>.toml``::

    [[mutant]]
    id = "fixpo-lbeta-mean-kl"          # unique, prefixed with the family
    file = "aclab/algos/fixpo.py"       # path from the repository root
    find = "max_kl = kl.max()"          # exact fragment; must occur exactly once in the file
    replace = "max_kl = kl.mean()"
    breaks = "L_beta uses the mean KL instead of the max"
    tests = ["tests/test_fixpo.py"]     # pytest arguments that must FAIL on the mutant
    # optional:
    timeout = 120                       # seconds for this mutant's tests (default: see --timeout)
    timeout_kills = true                # a timeout counts as killed (the breakage is non-termination)

The runner copies ``aclab/``, ``tests/`` and ``pyproject.toml`` into one scratch workspace per worker
(never touching the working tree), applies a mutant there, runs ``python -m pytest -x -q <tests>``
with that copy first on ``sys.path``, restores the file and moves on. A mutant is

* **killed** when its tests fail (pytest exit status 1);
* **survived** when they pass (exit 0): a hole in the tests;
* **stale** when its fragment no longer occurs exactly once, or the mutated file does not compile
  (a mutant must change behaviour, not syntax);
* **timeout** when its tests run past the time limit: counted as killed only if the mutant says
  ``timeout_kills = true`` (its documented breakage is a loop that never ends), otherwise a failure
  of the gate, since a hang proves nothing about the assertions;
* **error** for any other pytest status (2: interrupted or a collection error, 4: usage error,
  5: no test ran, e.g. a slow-marked or missing test).

Before the mutants, each distinct test selection runs once on the unmutated copy (the baseline): a
selection that fails there would "kill" every mutant for nothing, so its mutants are reported as
errors instead. ``--no-baseline`` skips this.

The run prints one line per mutant, ``<family>: killed K of N`` per family and ``killed K of N`` in
all, names every mutant that was not killed, and exits 1 unless every mutant was killed.

    python mutation/semantic.py [--only ID[,ID]] [--family F[,F]] [--jobs N] [--timeout S] [--json PATH]
    make mutation [ONLY=id] [FAMILY=f] [JOBS=n]
"""

from __future__ import annotations

import argparse
import ast
import compileall
import json
import os
import py_compile
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
MUTANT_DIR = ROOT / "mutation" / "mutants"
FAMILIES = ("ppo", "phasic", "dna", "fixpo", "stac", "offpolicy", "meta", "envs", "runs", "evaluation")
REQUIRED = {"id": str, "file": str, "find": str, "replace": str, "breaks": str, "tests": list}
OPTIONAL = {"timeout": (int, float), "timeout_kills": bool}
COPIED = ("aclab", "tests", "pyproject.toml")  # what a workspace holds (plus any other mutated top-level path)
PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider", "--no-header", "--tb=line")
DEFAULT_TIMEOUT = 300.0


@dataclass
class Mutant:
    id: str
    family: str
    file: str
    find: str
    replace: str
    breaks: str
    tests: list[str]
    timeout: float | None = None
    timeout_kills: bool = False
    source: str = ""  # the TOML file it came from


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | stale | timeout | error
    seconds: float = 0.0
    detail: str = ""
    killed_by: list[str] = field(default_factory=list)

    @property
    def killed(self) -> bool:
        return self.status == "killed" or (self.status == "timeout" and self.mutant.timeout_kills)


# ---------------------------------------------------------------------------------------------- loading
def load_file(path: Path) -> tuple[list[Mutant], list[str]]:
    """The mutants of one family file and the problems found while reading it (bad TOML, missing or
    mistyped fields, unknown keys)."""
    family = path.stem
    problems: list[str] = []
    if family not in FAMILIES:
        problems.append(f"{path.name}: unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        return [], [*problems, f"{path.name}: not valid TOML: {exc}"]
    extra = set(data) - {"mutant"}
    if extra:
        problems.append(f"{path.name}: unknown top-level keys {sorted(extra)}; only [[mutant]] tables")
    entries = data.get("mutant", [])
    if not isinstance(entries, list):
        return [], [*problems, f"{path.name}: 'mutant' must be an array of tables ([[mutant]])"]
    mutants = []
    for n, entry in enumerate(entries, 1):
        where = f"{path.name} mutant #{n} ({entry.get('id', '?')})"
        bad = False
        for key, kind in REQUIRED.items():
            if key not in entry:
                problems.append(f"{where}: missing required field {key!r}")
                bad = True
            elif not isinstance(entry[key], kind):
                problems.append(f"{where}: field {key!r} must be a {kind.__name__}")
                bad = True
        for key, kinds in OPTIONAL.items():
            if key in entry and (not isinstance(entry[key], kinds) or isinstance(entry[key], bool) != (kinds is bool)):
                problems.append(f"{where}: optional field {key!r} has the wrong type")
                bad = True
        unknown = set(entry) - set(REQUIRED) - set(OPTIONAL)
        if unknown:
            problems.append(f"{where}: unknown fields {sorted(unknown)}; allowed: "
                            f"{', '.join([*REQUIRED, *OPTIONAL])}")
            bad = True
        if bad:
            continue
        if not entry["tests"] or not all(isinstance(t, str) and t for t in entry["tests"]):
            problems.append(f"{where}: 'tests' must be a non-empty list of pytest arguments")
            continue
        mutants.append(Mutant(id=entry["id"], family=family, file=entry["file"], find=entry["find"],
                              replace=entry["replace"], breaks=entry["breaks"], tests=list(entry["tests"]),
                              timeout=entry.get("timeout"), timeout_kills=entry.get("timeout_kills", False),
                              source=path.name))
    return mutants, problems


def load_all(directory: Path = MUTANT_DIR) -> tuple[list[Mutant], list[str]]:
    """Every mutant of every family file, in file order, and every problem found reading them."""
    mutants, problems = [], []
    for path in sorted(directory.glob("*.toml")):
        found, issues = load_file(path)
        mutants += found
        problems += issues
    return mutants, problems


# ---------------------------------------------------------------------------------------------- integrity
def _test_paths(args: list[str]) -> list[str]:
    """The node ids among pytest arguments (skipping options and the values of -k / -m)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-k", "-m"):
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def _node_exists(root: Path, node: str) -> str | None:
    """None if ``tests/x.py[::Class][::test[param]]`` names a file (and functions) that exist, else why not."""
    parts = node.split("::")
    path = root / parts[0]
    if not path.exists():
        return f"test path {parts[0]!r} does not exist"
    if len(parts) == 1:
        return None
    scope: list[ast.stmt] = ast.parse(path.read_text(encoding="utf-8")).body
    for name in parts[1:]:
        name = name.split("[", 1)[0]
        match = [s for s in scope if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                 and s.name == name]
        if not match:
            return f"{node!r}: no test or class named {name!r}"
        scope = match[0].body
    return None


def check_mutant(m: Mutant, root: Path = ROOT) -> list[str]:
    """Why the mutant cannot run as written (empty when it can): its file or tests missing, its fragment
    absent or ambiguous, a no-op replacement, a mutated Python file that does not compile, or an id
    without its family prefix."""
    problems = []
    if not m.id.startswith(f"{m.family}-"):
        problems.append(f"{m.id}: id must start with '{m.family}-'")
    path = root / m.file
    if not path.is_file():
        problems.append(f"{m.id}: file {m.file!r} does not exist")
    else:
        text = path.read_text(encoding="utf-8")
        count = text.count(m.find)
        if count != 1:
            problems.append(f"{m.id}: fragment occurs {count} times in {m.file} (must be exactly once): {m.find!r}")
        elif m.find == m.replace:
            problems.append(f"{m.id}: replacement equals the fragment")
        elif path.suffix == ".py":
            try:
                compile(text.replace(m.find, m.replace, 1), m.file, "exec")
            except SyntaxError as exc:
                problems.append(f"{m.id}: the mutated file does not compile: {exc}")
    for node in _test_paths(m.tests):
        why = _node_exists(root, node)
        if why:
            problems.append(f"{m.id}: {why}")
    if not _test_paths(m.tests):
        problems.append(f"{m.id}: 'tests' names no test file")
    return problems


def integrity_problems(directory: Path = MUTANT_DIR, root: Path = ROOT) -> list[str]:
    """Every problem with the mutant files: reading errors, duplicate ids, and :func:`check_mutant`."""
    mutants, problems = load_all(directory)
    seen: dict[str, str] = {}
    for m in mutants:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id (in {seen[m.id]} and {m.source})")
        seen[m.id] = m.source
        problems += check_mutant(m, root)
    return problems


# ---------------------------------------------------------------------------------------------- running
class Workspace:
    """A scratch copy of the repository's code and tests, precompiled with hash-checked .pyc files so a
    mutated module is recompiled (and never cached) while the others load from their .pyc."""

    def __init__(self, base: Path, paths: set[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ws-", dir=base))
        for name in sorted(paths):
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, self.dir / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.exists():
                shutil.copy2(src, self.dir / name)
        compileall.compile_dir(self.dir / "aclab", quiet=1,
                               invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)


def _environment(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(workdir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutated module must never leave a .pyc behind
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


def run_tests(workdir: Path, tests: list[str], timeout: float) -> tuple[int | None, float, str]:
    """Run ``pytest -x -q`` on ``tests`` in ``workdir``; (exit status or None on timeout, seconds, output)."""
    cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=workdir, env=_environment(workdir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, time.monotonic() - start, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, time.monotonic() - start, out


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_mutant(m: Mutant, ws: Workspace, timeout: float) -> Outcome:
    path = ws.dir / m.file
    original = path.read_bytes()
    text = original.decode("utf-8")
    count = text.count(m.find)
    if count != 1:
        return Outcome(m, "stale", detail=f"fragment occurs {count} times in {m.file}: {m.find!r}")
    mutated = text.replace(m.find, m.replace, 1)
    if path.suffix == ".py":
        try:
            compile(mutated, m.file, "exec")
        except SyntaxError as exc:
            return Outcome(m, "stale", detail=f"mutated file does not compile: {exc}")
    try:
        path.write_text(mutated, encoding="utf-8")
        rc, seconds, out = run_tests(ws.dir, m.tests, timeout)
    finally:
        path.write_bytes(original)
    if rc is None:
        return Outcome(m, "timeout", seconds, f"no result within {timeout:.0f} s")
    if rc == 0:
        return Outcome(m, "survived", seconds, _tail(out, 3))
    if rc == 1:
        return Outcome(m, "killed", seconds, killed_by=_FAILED.findall(out)[:3])
    return Outcome(m, "error", seconds, f"pytest exit status {rc}:\n{_tail(out)}")


def select(mutants: list[Mutant], only: str | None, family: str | None) -> list[Mutant]:
    if only:
        wanted = {x.strip() for x in only.split(",") if x.strip()}
        unknown = wanted - {m.id for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutant id(s): {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m.id in wanted]
    if family:
        wanted = {x.strip() for x in family.split(",") if x.strip()}
        unknown = wanted - set(FAMILIES)
        if unknown:
            raise SystemExit(f"unknown family: {', '.join(sorted(unknown))}; expected one of {', '.join(FAMILIES)}")
        mutants = [m for m in mutants if m.family in wanted]
    return mutants


def _line(o: Outcome, done: int, total: int) -> str:
    status = o.status if not (o.status == "timeout" and o.killed) else "killed (timeout)"
    text = f"[{done:>3}/{total}] {status:<9} {o.mutant.id}  ({o.seconds:.1f} s)"
    if o.killed_by:
        text += f"  by {o.killed_by[0]}"
    if not o.killed:
        text += f"\n      breaks: {o.mutant.breaks}"
        if o.detail:
            text += "\n" + "\n".join("      " + line for line in o.detail.splitlines())
    return text


def summarize(outcomes: list[Outcome]) -> tuple[str, bool]:
    """The closing report (per family and in all) and whether every mutant was killed."""
    lines = []
    for fam in FAMILIES:
        mine = [o for o in outcomes if o.mutant.family == fam]
        if mine:
            lines.append(f"{fam}: killed {sum(o.killed for o in mine)} of {len(mine)}")
    killed = sum(o.killed for o in outcomes)
    lines.append(f"killed {killed} of {len(outcomes)}")
    for status in ("survived", "timeout", "stale", "error"):
        bad = [o for o in outcomes if o.status == status and not o.killed]
        if bad:
            lines.append(f"{status} ({len(bad)}):")
            lines += [f"  {o.mutant.id}  [{o.mutant.source}]: {o.mutant.breaks}" for o in bad]
    return "\n".join(lines), killed == len(outcomes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated mutant ids")
    parser.add_argument("--family", help=f"comma-separated families ({', '.join(FAMILIES)})")
    parser.add_argument("--jobs", type=int, default=2, help="parallel workers (default 2)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per mutant (default: the mutant's own, else 3x its baseline + 60, "
                             f"else {DEFAULT_TIMEOUT:.0f})")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    parser.add_argument("--list", action="store_true", help="list the selected mutants and exit")
    parser.add_argument("--json", type=Path, help="write every outcome to this JSON file")
    args = parser.parse_args(argv)

    mutants, problems = load_all()
    seen = set()
    for m in mutants:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
    if problems:
        print("mutant files are broken:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    mutants = select(mutants, args.only, args.family)
    if not mutants:
        print("no mutant selected", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.id:<40} {m.file:<32} {m.breaks}")
        return 0

    jobs = max(1, min(args.jobs, len(mutants)))
    paths = set(COPIED) | {Path(m.file).parts[0] for m in mutants}
    base = Path(tempfile.mkdtemp(prefix="aclab-mutation-"))
    start = time.monotonic()
    outcomes: list[Outcome] = []
    try:
        print(f"{len(mutants)} mutant(s), {jobs} worker(s), scratch copies in {base}", flush=True)
        pool: queue.Queue[Workspace] = queue.Queue()
        with ThreadPoolExecutor(jobs) as ex:
            for ws in ex.map(lambda _: Workspace(base, paths), range(jobs)):
                pool.put(ws)

        def with_workspace(fn, *a):
            ws = pool.get()
            try:
                return fn(ws, *a)
            finally:
                pool.put(ws)

        # baseline: each distinct test selection must pass on the unmutated code
        baseline: dict[tuple[str, ...], tuple[bool, float, str]] = {}
        if not args.no_baseline:
            selections = sorted({tuple(m.tests) for m in mutants})
            print(f"baseline: {len(selections)} test selection(s) on the unmutated code", flush=True)

            def base_run(ws, sel):
                rc, seconds, out = run_tests(ws.dir, list(sel), args.timeout or 2 * DEFAULT_TIMEOUT)
                return sel, rc == 0, seconds, out

            with ThreadPoolExecutor(jobs) as ex:
                for sel, ok, seconds, out in ex.map(lambda s: with_workspace(base_run, s), selections):
                    baseline[sel] = (ok, seconds, out)
                    if not ok:
                        print(f"baseline FAILS for {' '.join(sel)} ({seconds:.1f} s):\n{_tail(out)}", flush=True)

        def timeout_for(m: Mutant) -> float:
            if args.timeout:
                return args.timeout
            if m.timeout:
                return float(m.timeout)
            if tuple(m.tests) in baseline:
                return 3 * baseline[tuple(m.tests)][1] + 60
            return DEFAULT_TIMEOUT

        lock = threading.Lock()

        def one(ws, m):
            if tuple(m.tests) in baseline and not baseline[tuple(m.tests)][0]:
                o = Outcome(m, "error", detail="its tests fail on the unmutated code (see the baseline above)")
            else:
                o = run_mutant(m, ws, timeout_for(m))
            with lock:
                outcomes.append(o)
                print(_line(o, len(outcomes), len(mutants)), flush=True)
            return o

        with ThreadPoolExecutor(jobs) as ex:
            list(ex.map(lambda m: with_workspace(one, m), mutants))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    order = {m.id: i for i, m in enumerate(mutants)}
    outcomes.sort(key=lambda o: order[o.mutant.id])
    report, ok = summarize(outcomes)
    print(f"\n{report}\n({time.monotonic() - start:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps([{
            "id": o.mutant.id, "family": o.mutant.family, "status": o.status, "killed": o.killed,
            "seconds": round(o.seconds, 1), "killed_by": o.killed_by, "detail": o.detail,
        } for o in outcomes], indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
