"""The command-line front ends (`train.py`, `explain.py`).

jaxcam's own errors (`JaxcamError`: bad data, config, checkpoint, a diverged loss) print one
sentence to stderr and return exit status 1, and so does a stop (Ctrl-C or SIGTERM); any other
exception is a bug and keeps its traceback. Nothing already written is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Iterator, NoReturn, Sequence

from jaxcam import distributed
from jaxcam.checkpoint import has_finished_epoch, missing_folders, remove_if_empty
from jaxcam.configuration import DATA_KEYS, apply_overrides, config_from_json, load_config_file
from jaxcam.errors import ConfigError, JaxcamError

# The overrides --resume takes: `config.KEY` of where the data lies, not of how to train.
RESUME_DATA_KEYS = tuple(f"config.{key}" for key in DATA_KEYS)
_stopped = False  # set by a Ctrl-C or SIGTERM that ended the command (see exit_process)


def fail(message: str) -> int:
    """Print `error: message` to stderr; the exit status 1 to return."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def exit_process(status: int) -> NoReturn:
    """End train.py or explain.py with `status`.

    A stop ends only the main thread's wait for a compilation while JAX goes on compiling on a
    worker thread, and Python's finalization can then crash under it; after a stop the files are
    written and closed, so the process ends at once, unfinalized. So does a failed process of a
    multi-process run: JAX's shutdown would wait for the others, then abort with a stack dump.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if _stopped or (status and distributed.process_count() > 1):
        os._exit(status)
    sys.exit(status)


def use_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache in `$XDG_CACHE_HOME/jaxcam/jax` (default
    `~/.cache/jaxcam/jax`) unless a cache folder is already configured; returns the folder in
    use, or None when the cache is off.

    A re-run of the same model then loads its compiled programs instead of compiling them again,
    and on a GPU its autotuning results as well (JAX's `jax_persistent_cache_enable_xla_caches`
    keeps XLA's per-fusion autotune cache beside the programs by default).
    `JAX_COMPILATION_CACHE_DIR=DIR` picks another folder, and an empty one turns the cache off.
    """
    import jax

    configured = jax.config.jax_compilation_cache_dir
    if configured is not None:  # the user's (or JAX_COMPILATION_CACHE_DIR's) choice stands
        return configured or None
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxcam" / "jax"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable home only costs the re-compilation
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return str(folder)


def after_interrupt(run_dir: Path | None, epochs: int | None, stopped: str = "interrupted") -> str:
    """What train.py says after a Ctrl-C or SIGTERM (or, `stopped`, another end): the command that
    continues the run, once it has begun and until its last epoch (of `epochs`, None while its
    config is not read) is saved."""
    if run_dir is None or not (run_dir / "config.json").exists():  # an LR range test may have run, not training
        return f"{stopped} before training began."
    if epochs is not None and has_finished_epoch(run_dir, epochs):
        return f"{stopped} after the last epoch was saved: the run is complete, and explain.py reports on it."
    command = f"python train.py --resume {shlex.quote(str(run_dir))}"
    if distributed.process_count() > 1:
        command += ", started in every process as this run was,"
    return f"{stopped}; {command} continues from the last epoch that ended."


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within the block SIGTERM (`kill`, `timeout`, a scheduler's time limit, a preempted VM)
    raises KeyboardInterrupt, as Ctrl-C does, so that a run stops between whole checkpoints.
    Both set `_stopped`: C code that catches the interrupt (matplotlib's) may raise its own error.

    Python drops an exception raised in a gc callback or `__del__` ("Exception ignored in"), and
    JAX runs one on every collection, so the interrupt is raised again each second (SIGALRM)
    until the block ends."""
    def stop(signum, frame):
        global _stopped
        _stopped = True
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        raise KeyboardInterrupt

    # An ignored Ctrl-C (a background job) stays ignored.
    signums = [signal.SIGTERM, signal.SIGALRM]
    signums += [signal.SIGINT] * (signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    previous = {signum: signal.signal(signum, stop) for signum in signums}
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _empty_path_error(args: argparse.Namespace, flags: Sequence[str]) -> str | None:
    """The error for the first of `flags` (such as "--out") given as an empty string (an unset
    shell variable), which would otherwise mean the working directory; else None."""
    flag = next((flag for flag in flags if getattr(args, flag[2:].replace("-", "_")) == ""), None)
    return None if flag is None else f"{flag} is an empty string (an unset shell variable?); give a path."


def _run(command, stop_message, lost_message=None) -> int:
    """Run `command()` with SIGTERM as Ctrl-C; 0, or 1 after one sentence for a stop, a JaxcamError
    or (with `lost_message(error)`) another process of a multi-process run gone."""
    global _stopped
    _stopped = False
    try:
        with sigterm_as_ctrl_c():
            command()
        return 0
    except (KeyboardInterrupt, Exception) as e:
        if isinstance(e, KeyboardInterrupt) or _stopped:
            _stopped = True
            return fail(stop_message())
        if isinstance(e, JaxcamError):
            return fail(str(e))
        if lost_message is not None and distributed.lost_another_process(e):
            _stopped = True  # JAX's shutdown would wait on the lost process, then abort with a stack dump
            return fail(lost_message(e))
        raise


def run_train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """train.py: train a new run (optionally after the LR range test), or resume one; returns
    the exit status."""
    if empty := _empty_path_error(args, ("--workdir", "--config", "--resume")):
        return fail(empty)
    if problem := join_processes(args):
        return fail(problem)
    use_compilation_cache()
    made = [] if args.resume else missing_folders(args.workdir)  # a stop before training removes these
    progress = {"run_dir": None, "epochs": None}

    def stop_message() -> str:
        return after_interrupt(progress["run_dir"], progress["epochs"])

    def lost_message(error: BaseException) -> str:
        reason = str(error).strip().splitlines()[0][:200]
        return after_interrupt(progress["run_dir"], progress["epochs"],
                               f"another process of this run stopped or lost contact ({reason}), so this one stopped "
                               "too")

    def on_run_dir(run_dir: Path, epochs: int) -> None:
        made.insert(0, run_dir)
        progress.update(run_dir=run_dir, epochs=epochs)

    try:
        return _run(lambda: _train(args, overrides, on_run_dir), stop_message, lost_message)
    finally:
        remove_if_empty(made)


def join_processes(args: argparse.Namespace) -> str | None:
    """Join the processes of a multi-process run that train.py's flags describe (none: one
    process); the one-sentence problem with them, else None."""
    given = {flag: getattr(args, flag[2:]) for flag in ("--coordinator_address", "--num_processes", "--process_id")}
    named = [flag for flag, value in given.items() if value is not None]
    if args.distributed and named:
        return f"--distributed detects the processes itself, so drop {' and '.join(named)}."
    if not args.distributed and not named:
        return None
    if named and len(named) < 3:
        return f"{' and '.join(f for f in given if f not in named)} must be given with {' and '.join(named)}."
    if named:
        address, count, index = given.values()
        if count < 1 or not 0 <= index < count:
            return f"--process_id must lie in 0..{count - 1} for --num_processes {count}, got {index}."
        if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", address):
            return f"--coordinator_address must be HOST:PORT (process 0's), got {address!r}."
    try:
        distributed.initialize(*given.values())
    except (ValueError, RuntimeError) as e:  # nothing to detect, or the coordinator never answered
        reason = str(e).strip().splitlines()[0][:300].rstrip(".")
        if args.distributed:
            return (f"--distributed found no TPU pod slice, SLURM or Open MPI job to join ({reason}); name the "
                    "processes with --coordinator_address, --num_processes and --process_id instead.")
        return f"Could not join the other processes of the run ({reason})."
    return None


def _train(args: argparse.Namespace, overrides: Sequence[str], on_run_dir) -> None:
    from jaxcam import rundir, train as train_lib

    if args.resume:
        # Where the data lies may change (a run copied to another machine); the recipe may not.
        moved = [o for o in overrides if o.lstrip("-").split("=", 1)[0] in RESUME_DATA_KEYS]
        ignored = {"--config": args.config is not None,
                   "--config.* overrides other than the data's location": len(moved) < len(overrides),
                   "--find-lr": args.find_lr or args.find_lr_only}
        given = " and ".join(name for name, present in ignored.items() if present)
        if given:
            raise ConfigError(f"--resume continues a run with its saved config.json, so drop {given}.")
        run_dir = rundir.check_run_dir(
            rundir.latest_run_dir(args.workdir) if args.resume == "latest" else args.resume)
        config = apply_overrides(config_from_json(run_dir / "config.json"), moved)
        on_run_dir(run_dir, config.get("epochs"))
        train_lib.train_and_evaluate(config, run_dir, resume=True)
        return
    config = apply_overrides(load_config_file(args.config), overrides)
    if args.find_lr_only:
        from jaxcam import lr_finder

        config, dataset, _, run_dir = train_lib.prepare_run(config, workdir=args.workdir, find_lr=True)
        on_run_dir(run_dir, config.epochs)
        lr_finder.run_for_config(config, dataset, run_dir)
        return
    train_lib.train_and_evaluate(config, workdir=args.workdir, find_lr=args.find_lr or config.max_lr == "auto",
                                 on_run_dir=lambda run_dir: on_run_dir(run_dir, config.epochs))


def run_explain(args: argparse.Namespace) -> int:
    """explain.py: write the report of a run, or explain only the user's images; returns the exit
    status (a stop leaves the output folder as it was)."""
    from jaxcam import explain

    if empty := _empty_path_error(args, ("--workdir", "--out", "--data-dir")):
        return fail(empty)
    # The report's own settings where given, by flag: explain_run holds their defaults.
    report_settings = {flag: (key, value) for flag, key, value in (("--num", "num", args.num),
                                                                  ("--faithfulness", "faithfulness_images",
                                                                   args.faithfulness))
                       if value is not None}
    if args.images_only:
        if not args.images:
            return fail("--images-only explains your own images; name them with --images.")
        if report_settings:
            verb = "sets" if len(report_settings) == 1 else "set"
            return fail(f"{' and '.join(report_settings)} {verb} up the test-set report, which --images-only does "
                        "not write.")
    use_compilation_cache()

    def command() -> None:
        if args.images_only:
            explain.explain_image_files(args.workdir, args.images, args.out, layer=args.layer, method=args.method,
                                        data_dir=args.data_dir)
        else:
            explain.explain_run(args.workdir, args.out, layers=args.layer, method=args.method, image_files=args.images,
                                data_dir=args.data_dir, **dict(report_settings.values()))

    return _run(command, lambda: "interrupted.")
