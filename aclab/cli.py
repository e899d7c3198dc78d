"""Command line: ``aclab train | eval | list | report | sweep | tune | analyze``.

Bad input (unknown algorithm, env id, preset or config key, invalid value, missing or unreadable run
directory, a run directory in use by another process) prints one line ``aclab: error: ...`` naming the
problem and the valid choices, and exits with 2, before any run directory is created. A run that fails
exits with 3; an interrupted command with 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILED_RUN = 3
EXIT_INTERRUPTED = 130


def _threads(text: str) -> int:
    """``--threads N``: an integer >= 0 (0: the automatic setting of :mod:`aclab.core.threads`)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--threads must be an integer >= 0 (0: automatic), got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aclab", description="Actor-critic algorithms: train, evaluate, compare.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an algorithm (or resume a run)")
    p.add_argument("algo", nargs="?", help="algorithm name (see 'aclab list')")
    p.add_argument("--env", dest="env_id", help="env id, e.g. CartPole-v1, procgen:bigfish, atari:Breakout, "
                                                 "mujoco:HalfCheetah-v4, dmc:cheetah-run, metaworld:reach-v3; your "
                                                 "own: gym:MODULE:EnvId or factory:MODULE:FUNCTION")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE before the env is made (it registers your env ids); saved as env.imports "
                        "(repeatable)")
    p.add_argument("--preset", help="preset name (see 'aclab list') or a path to a .toml file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set params.lr=3e-4 --set env.num_envs=8 (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--total-steps", help="env steps to train for (e.g. 1e6)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--run-dir", type=Path, help="where to write the run (default runs/<algo>-<env>-s<seed>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --run-dir")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue a run from its latest readable checkpoint (--set may change total_steps, eval.*, "
                        "logging and checkpoint keys; the new values are saved to its config.json)")
    p.add_argument("--start-over", action="store_true",
                   help="with --resume: if no checkpoint can be read, restart from step 0 (the old logs are moved "
                        "to RUN_DIR/discarded-<time>/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=_threads, metavar="N",
                   help="torch intra-op threads (default: automatic: 1, all cores for image observations on CPU)")

    p = sub.add_parser("eval", help="evaluate a run's latest checkpoint on separate envs")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--episodes", type=int, default=None, help="episodes, >= 1 (default: the run's eval.episodes)")
    p.add_argument("--split", choices=["train", "test", "both"], default="test",
                   help="Procgen: train or held-out test levels (other envs: new seeds)")
    p.add_argument("--deterministic", action="store_true", help="greedy/mean actions instead of sampling")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV file the result is appended to (default RUN_DIR/evals_adhoc.csv; the run's own "
                        "evals.csv, which 'aclab report' reads, is never written by this command)")
    p.add_argument("--no-log", action="store_true", help="print the result only, write no file")
    p.add_argument("--threads", type=_threads, metavar="N",
                   help="torch intra-op threads (default: automatic: 1, all cores for image observations on CPU)")
    p.add_argument("--checkpoint", default="final", metavar="final|best|PATH",
                   help="final: the latest checkpoint (default); best: the checkpoint of the run's best evaluation "
                        "(checkpoints/best.pt); or a checkpoint file")
    p.add_argument("--video", type=Path, metavar="DIR",
                   help="write videos of --episodes episodes (default 1) into DIR instead of evaluating")
    p.add_argument("--gif", action="store_true", help="with --video: GIFs (for docs) instead of MP4s")
    p.add_argument("--fps", type=int, help="with --video: frames per second (default: the env's own, else 30)")

    sub.add_parser("list", help="algorithms, env families and presets")

    p = sub.add_parser("report", help="plots, tables and statistics over run directories")
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories, or folders of run directories")
    p.add_argument("--out", type=Path, default=Path("report"))
    p.add_argument("--normalization", default="auto", choices=["auto", "none", "procgen_minmax", "atari_hns"])
    p.add_argument("--metric", default="episode_return", help="training metric for curves and final scores")
    p.add_argument("--last-episodes", type=int, default=100,
                   help="final training score: mean return of the last N finished episodes (episodes.csv)")
    p.add_argument("--last-k", type=int, default=10,
                   help="final training score of runs without episodes.csv: mean of the last k logged points")
    p.add_argument("--last-k-evals", type=int, default=1, help="final eval score: mean of the last k evaluations")
    p.add_argument("--ppo-baseline", help="algorithm to normalise against (PPO-normalised score)")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap repetitions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default="aclab report")
    p.add_argument("--threads", type=_threads, metavar="N",
                   help="torch intra-op threads (default 1)")
    p.add_argument("--evals", default="evals.csv", metavar="FILE",
                   help="evaluation file of each run directory for the eval scores (default evals.csv: the training "
                        "loop's own evaluations; e.g. evals_adhoc.csv for 'aclab eval' results)")

    p = sub.add_parser("analyze", help="analyses of a run's latest checkpoint")
    p.add_argument("analysis", choices=["stiffness", "value-bias", "ood-actions", "gradient-accuracy",
                                        "gradient-noise"],
                   help="stiffness (DCPG App. A), value-bias (App. C), ood-actions (Table 8, dynamics models), "
                        "gradient-accuracy (TD3/SAC critics, hypernetwork paper Sec. 3.2), gradient-noise "
                        "(MAML, hypernetwork paper Fig. 5)")
    p.add_argument("path", type=Path, help="a run directory (latest checkpoint) or a checkpoint file")
    p.add_argument("--num-states", type=int, default=None,
                   help="stiffness: states (default and paper: 2^14); gradient-accuracy: states (default 15)")
    p.add_argument("--sign", choices=["exact", "subset", "off"], default="subset", help="stiffness: sign mode")
    p.add_argument("--episodes", type=int, default=None,
                   help="value-bias: episodes (default 100); gradient-noise: evaluation episodes per task")
    p.add_argument("--truncation", choices=["bootstrap", "partial", "exclude"], default="bootstrap",
                   help="value-bias: truncated episodes count with gamma^L V(s_L) added (bootstrap), their partial "
                        "return (partial, the DCPG authors' logging) or not at all (exclude)")
    p.add_argument("--updates", type=int, default=50, help="gradient-noise: independent meta-updates")
    p.add_argument("--horizon", type=int, default=0,
                   help="gradient-accuracy: rollout horizon (0: to the time limit, the authors' choice)")
    p.add_argument("--independent-states", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient-accuracy: each state from its own reset (default: the run's "
                        "params.grad_accuracy_independent_states, true unless set: the authors' procedure); "
                        "--no-independent-states snapshots one policy run")
    p.add_argument("--num-transitions", type=int, default=4096, help="ood-actions: transitions")
    p.add_argument("--value", default="value", help="which critic (e.g. separate_value for sdcpg)")
    p.add_argument("--num-envs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, help="also write the JSON result to this file")
    p.add_argument("--threads", type=_threads, metavar="N",
                   help="torch intra-op threads (default: the run's torch_threads, else automatic)")

    p = sub.add_parser("tune", help="hyperparameter search (Optuna) from a TOML spec; resumes a killed tuning")
    p.add_argument("spec", type=Path)
    p.add_argument("--max-parallel", type=int, help="trials at a time (default: the spec's, else 1)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report of the study, run no trial")

    p = sub.add_parser("sweep", help="run a grid of algorithms x envs x seeds from a TOML spec")
    p.add_argument("spec", type=Path)
    p.add_argument("--dry-run", action="store_true", help="print the jobs without running them")
    p.add_argument("--max-parallel", type=int, help="runs at a time (default: the spec's, else the CPU count)")
    p.add_argument("--threads", type=_threads, metavar="N",
                   help="passed to every run's 'aclab train --threads' (default: each run's automatic setting)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from aclab.sweep import die_with_parent

    die_with_parent()  # a run started by 'aclab sweep' stops when the sweep dies
    args = _parser().parse_args(argv)
    from aclab.config import ConfigError
    from aclab.envs import EnvIdError
    from aclab.runs import RunError

    try:
        return {"train": cmd_train, "eval": cmd_eval, "list": cmd_list, "report": cmd_report,
                "sweep": cmd_sweep, "analyze": cmd_analyze, "tune": cmd_tune}[args.command](args)
    except (ConfigError, EnvIdError, RunError, FileExistsError, FileNotFoundError, NotADirectoryError,
            *_domain_errors()) as exc:
        print(f"aclab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("aclab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _domain_errors() -> tuple[type[Exception], ...]:
    """Input errors of the reporting and sweep layers (imported only when present)."""
    errors: list[type[Exception]] = []
    for module, name in (("aclab.evaluate.report", "ReportError"), ("aclab.evaluate.runs_io", "RunDirError"),
                         ("aclab.evaluate.stats", "StatsError"), ("aclab.sweep", "SweepError"),
                       ("aclab.evaluate.video", "VideoError"), ("aclab.tune", "TuneError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def cmd_train(args) -> int:
    import json

    from aclab.config import ConfigError
    from aclab.train import make_config, resume_config, train

    overrides = list(args.overrides)
    if args.imports:
        overrides.append("env.imports=" + json.dumps(args.imports))
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.total_steps is not None:
        overrides.append(f"total_steps={args.total_steps}")  # validated as an integer >= 1 like any key
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.quiet:
        overrides.append("progress=false")
    if args.threads is not None:
        overrides.append(f"torch_threads={args.threads}")
    if args.resume is not None:
        if args.algo or args.env_id or args.preset:
            raise ConfigError("--resume takes the run's saved config; drop ALGO/--env/--preset "
                              "(use --set to change keys)")
        config = resume_config(args.resume, overrides)
        summary = train(config, args.resume, resume=True, start_over=args.start_over, callbacks=_trial_callbacks())
    else:
        if not args.algo:
            raise ConfigError("missing algorithm: 'aclab train ALGO --env ID' (see 'aclab list')")
        if args.start_over:
            raise ConfigError("--start-over goes with --resume RUN_DIR")
        if args.env_id is None and args.preset is None and not any(
                o.split("=", 1)[0].strip() == "env.id" for o in overrides):
            raise ConfigError(f"missing --env: which environment should {args.algo} train on? e.g. 'aclab train "
                              f"{args.algo} --env CartPole-v1' (families and presets: 'aclab list'; a --preset "
                              "that names an env also works)")
        config = make_config(args.algo, args.env_id, args.preset, overrides)
        summary = train(config, args.run_dir, overwrite=args.overwrite, callbacks=_trial_callbacks())
    if _is_rank_0():
        _print_summary(summary, args.resume or args.run_dir)
    return 0 if summary["status"] in ("finished", "interrupted", "stopped") else EXIT_FAILED_RUN


def _is_rank_0() -> bool:
    """Under ``torchrun`` (a data-parallel run) only rank 0 prints."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _trial_callbacks() -> list:
    """A tuning trial (``aclab tune`` started this process) reports its evaluations and can be pruned."""
    import os

    if "ACLAB_TUNE_TRIAL_ID" not in os.environ:
        return []
    from aclab.tune import callbacks_from_environment

    return callbacks_from_environment()


def _print_summary(summary: dict, run_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="aclab run summary", show_header=True)
    table.add_column("key")
    table.add_column("value")
    for key in ("status", "algo", "env_id", "preset", "seed", "steps", "overshoot_steps", "wall_time_s", "steps_per_s",
                "final_return", "final_return_episodes", "eval_test_return", "eval_train_return", "stop_reason",
                "error"):
        if summary.get(key) is not None and not (key == "overshoot_steps" and summary[key] == 0):
            value = summary[key]
            table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)


def cmd_eval(args) -> int:
    import numpy as np

    from aclab.algos.common import resolve_device
    from aclab.config import ConfigError
    from aclab.core.threads import flush_denormals, set_threads
    from aclab.envs import build_envs
    from aclab.evaluate.policy import evaluate_splits
    from aclab.runs import ADHOC_EVALS_FILE, EVALS_FILE, append_eval, eval_record
    from aclab.train import build_algorithm, load_run_checkpoint, load_run_config

    if args.episodes is not None and args.episodes < 1:
        raise ConfigError(f"invalid value --episodes {args.episodes}: expected an integer >= 1")
    config = load_run_config(args.run_dir)
    out = None if args.no_log or args.video is not None else (args.out or args.run_dir / ADHOC_EVALS_FILE)
    if out is not None and out.resolve() == (args.run_dir / EVALS_FILE).resolve():
        raise ConfigError(f"--out {out}: evals.csv holds the training loop's own evaluations (the report reads it); "
                          "write ad-hoc evaluations to another file (default evals_adhoc.csv)")
    checkpoint, which = load_run_checkpoint(args.run_dir, args.checkpoint)
    envs = build_envs(config)  # the training envs' shape, to restore their normalisation statistics
    algo = None
    device = resolve_device(config.device)
    set_threads(args.threads or config.torch_threads, obs_shape=envs.spec.obs_shape, device=device)
    flush_denormals(config.flush_denormal)
    try:
        algo = build_algorithm(config, envs.spec, device)
        algo.load_state_dict(checkpoint["algo"])
        envs.load_state_dict(checkpoint["envs"])
        splits = ["train", "test"] if args.split == "both" else [args.split]
        if args.video is not None:
            from aclab.evaluate.video import record_videos

            for split in splits:
                written = record_videos(algo, config, args.video, episodes=args.episodes or 1, split=split,
                                        fmt="gif" if args.gif else "mp4", deterministic=args.deterministic or None,
                                        train_envs=envs, fps=args.fps, prefix=f"{split}-step{checkpoint['step']}")
                for path, ret, length in written:
                    print(f"{path}: return {ret:.2f}, {length} steps ({which} checkpoint, step {checkpoint['step']})")
            return 0
        results = evaluate_splits(algo, config, splits, episodes=args.episodes, train_envs=envs,
                                  deterministic=args.deterministic, step=int(checkpoint["step"]))
        for split, result in results.items():
            returns = result.returns
            levels = "" if result.levels is None else str(result.levels)
            print(f"{split}: mean return {np.mean(returns):.2f} +- {np.std(returns):.2f} over {len(returns)} episodes "
                  f"({which} checkpoint, step {checkpoint['step']}{', levels ' + levels if levels else ''})")
            if out is not None:
                append_eval(out, eval_record(int(checkpoint["step"]), split, returns, levels=levels, checkpoint=which,
                                             deterministic=bool(args.deterministic or config.eval.deterministic)))
    finally:
        envs.close()
        if algo is not None and hasattr(algo, "close"):
            algo.close()
    if out is not None:
        print(f"appended to {out}")
    return 0


def cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from aclab.config import list_presets
    from aclab.registry import all_algorithms

    console = Console()
    t = Table(title="algorithms")
    t.add_column("name")
    t.add_column("description")
    for name, entry in all_algorithms().items():
        t.add_row(name, entry.description)
    console.print(t)
    t = Table(title="env families")
    t.add_column("family")
    t.add_column("example id")
    for family, example in (("classic", "CartPole-v1, Pendulum-v1"), ("procgen", "procgen:bigfish"),
                            ("atari", "atari:Breakout"), ("mujoco", "mujoco:HalfCheetah-v4"),
                            ("dmc", "dmc:cheetah-run"), ("metaworld", "metaworld:reach-v3"),
                            ("gym", "gym:<any registered Gymnasium id>, gym:<module>:<EnvId> (your own)"),
                            ("factory", "factory:<module>:<function returning a gymnasium.Env>")):
        t.add_row(family, example)
    console.print(t)
    t = Table(title="presets")
    t.add_column("name")
    t.add_column("algo")
    t.add_column("description")
    for name, info in list_presets().items():
        t.add_row(name, str(info["algo"]), info["description"])
    console.print(t)
    return 0


def cmd_report(args) -> int:
    from aclab.core.threads import set_threads
    from aclab.evaluate.report import build_report

    set_threads(args.threads)

    path = build_report(args.run_dirs, args.out, normalization=args.normalization, last_k=args.last_k,
                        last_episodes=args.last_episodes,
                        last_k_evals=args.last_k_evals, metric=args.metric, seed=args.seed, reps=args.reps,
                        ppo_baseline=args.ppo_baseline, title=args.title, evals_file=args.evals)
    print(f"report written to {path}")
    return 0


def cmd_analyze(args) -> int:
    import json

    from aclab import analyze as run_analysis

    common = {"num_envs": args.num_envs, "seed": args.seed, "device": args.device, "threads": args.threads}
    try:
        result = _run_analysis(run_analysis, args, common)
    except (ValueError, KeyError, TypeError) as exc:  # wrong algorithm for the analysis, unknown critic
        from aclab.config import ConfigError

        raise ConfigError(str(exc.args[0]) if exc.args else str(exc)) from exc
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


def _run_analysis(run_analysis, args, common) -> dict:
    if args.analysis == "stiffness":
        return run_analysis.run_stiffness(args.path, num_states=args.num_states or 2 ** 14, value=args.value,
                                            sign=args.sign, **common)
    elif args.analysis == "value-bias":
        return run_analysis.run_value_bias(args.path, episodes=args.episodes or 100, value=args.value,
                                           truncation=args.truncation, **common)
    elif args.analysis == "gradient-accuracy":
        return run_analysis.run_gradient_accuracy(args.path, num_states=args.num_states or 15,
                                                  horizon=args.horizon, independent_states=args.independent_states,
                                                  **common)
    elif args.analysis == "gradient-noise":
        return run_analysis.run_gradient_noise(args.path, updates=args.updates, episodes=args.episodes, **common)
    return run_analysis.run_ood_actions(args.path, num_transitions=args.num_transitions, **common)


def cmd_tune(args) -> int:
    from aclab.tune import report_only, run_tune

    path = report_only(args.spec) if args.report_only else run_tune(args.spec, max_parallel=args.max_parallel)
    print(f"tuning report written to {path}")
    print(path.read_text())
    return 0


def cmd_sweep(args) -> int:
    from aclab.sweep import format_results, run_sweep

    results = run_sweep(args.spec, dry_run=args.dry_run, max_parallel=args.max_parallel, threads=args.threads)
    print(format_results(results))
    return EXIT_FAILED_RUN if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
