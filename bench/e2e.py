"""Where a training run's wall time goes: imports, data, set-up, compilation, epochs, evaluation,
checkpoints, and what is left.

    python -m bench.e2e [--config configs/smoke.py] [--set epochs=2 ...] [--before DIR]

Each run is a fresh process, as `python train.py` is: first with an empty persistent compilation
cache (cold, a new Colab runtime), then with the cache that run filled (warm). `--before DIR`
times another checkout of jaxcam (a `git worktree` of an earlier commit) in the same way,
interleaved with this one, so that before and after come from one run of this script.

The phases are timed by wrapping train.py's own functions (`load_dataset`, `create_train_state`,
`compile_ahead`, `predict`, `Checkpointer.save`) and from history.json's epoch times; compilations are JAX's
own backend-compile events by function name (they overlap the phases: the train step's falls in
the first epoch unless it is compiled ahead of time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("imports", "data", "train state", "compiling steps", "first epoch", "later epochs", "evaluation",
          "checkpoints", "other")


def instrument() -> tuple[dict, dict]:
    """Time train.py's phases and JAX's compilations in this process from now on: returns the
    dicts ({phase: seconds}, {function name: seconds compiling}) that fill as it trains."""
    import collections

    import jax

    from jaxcam import checkpoint, train as train_lib

    spent, compiles = collections.defaultdict(float), collections.defaultdict(float)

    def on_event(event: str, seconds: float, fun_name: str | None = None, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[fun_name or "?"] += seconds

    jax.monitoring.register_event_duration_secs_listener(on_event)

    def timed(owner, name: str, phase: str) -> None:
        original = getattr(owner, name, None)
        if original is None:  # an earlier jaxcam without it
            return

        def wrapper(*a, **k):
            begin = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[phase] += time.perf_counter() - begin

        setattr(owner, name, wrapper)

    timed(train_lib, "load_dataset", "data")
    timed(train_lib, "create_train_state", "train state")
    timed(train_lib, "compile_ahead", "compiling steps")
    timed(train_lib, "predict", "evaluation")
    timed(checkpoint.Checkpointer, "save", "checkpoints")
    return spent, compiles


def breakdown(spent: dict, history: list[dict], seconds: float) -> dict:
    """The phases of a `train_and_evaluate` of `seconds` that `instrument` timed, with the epochs'
    training from its history and "other" for the rest."""
    epochs = [record["epoch_time"] for record in history]
    phases = {**spent, "first epoch": epochs[0], "later epochs": sum(epochs[1:])}
    phases["other"] = seconds - sum(phases.get(p, 0.0) for p in PHASES[1:-1])
    return phases


def child(args) -> None:
    """One run in this process; prints its breakdown as JSON."""
    started = time.perf_counter()
    sys.path.insert(0, args.tree)
    from jaxcam import cli, configuration, train as train_lib

    imported = time.perf_counter()
    cli.use_compilation_cache()
    spent, compiles = instrument()
    config = configuration.load_config_file(args.config)
    configuration.apply_overrides(config, [f"--config.{change}" for change in args.set])
    config.tensorboard = False
    begin = time.perf_counter()
    result = train_lib.train_and_evaluate(config, workdir=args.workdir, progress=False, log=lambda message: None)
    phases = {"imports": imported - started, **breakdown(spent, result.history, time.perf_counter() - begin)}
    print(json.dumps({"phases": phases, "compiles": dict(compiles), "test_acc": result.history[-1]["test_acc"]}))


def run(tree: Path, config: str, changes: list[str], cache: str) -> dict:
    """One fresh process training `config` with the jaxcam of `tree` on the compilation cache `cache`."""
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "PYTHONPATH": str(tree)}
        command = [sys.executable, str(ROOT / "bench" / "e2e.py"), "--child", "--tree", str(tree), "--workdir",
                   workdir, "--config", config, "--set", *changes]
        begin = time.perf_counter()
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - begin
    if done.returncode:
        raise RuntimeError(f"The run of {tree} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def report(name: str, result: dict) -> str:
    phases, compiles = result["phases"], result["compiles"]
    top = sorted(compiles.items(), key=lambda item: -item[1])[:3]
    named = ", ".join(f"{fun} {seconds:.1f}" for fun, seconds in top)
    return (f"| {name} | **{result['process_s']:.1f}** | " + " | ".join(f"{phases.get(p, 0.0):.1f}" for p in PHASES)
            + f" | {sum(compiles.values()):.1f} ({len(compiles)}; {named}) |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "smoke.py"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config changes, as --config.KEY=VALUE")
    parser.add_argument("--before", type=Path, default=None, help="another jaxcam checkout to time the same way")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    trees = {"before": args.before.resolve(), "after": ROOT} if args.before else {"this checkout": ROOT}
    print(f"{Path(args.config).name} {' '.join(args.set)}: seconds (process wall time, then its phases; "
          "compilations overlap them)")
    print("| code, cache | process | " + " | ".join(PHASES) + " | compiling (programs; longest) |")
    print("|---|---:|" + "---:|" * len(PHASES) + "---|")
    with tempfile.TemporaryDirectory() as caches:
        for cache_state in ("cold", "warm"):
            for name, tree in trees.items():
                result = run(tree, args.config, args.set, str(Path(caches) / name.replace(" ", "_")))
                print(report(f"{name}, {cache_state}", result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
