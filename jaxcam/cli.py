"""The command-line front ends (`train.py`, `explain.py`): argument handling and error reporting.

Every expected failure (bad data, config, checkpoint, a diverged loss) prints one sentence
to stderr and returns exit status 1; nothing already written is removed.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, NoReturn, Sequence

from jaxcam.checkpoint import STOP_SIGNALS, CheckpointError, has_finished_epoch, missing_folders, remove_if_empty
from jaxcam.configuration import DATA_KEYS, ConfigError, apply_overrides, config_from_json, load_config_file
from jaxcam.data import DataError

EXPECTED_ERRORS = (DataError, ConfigError, CheckpointError, ValueError, OSError, RuntimeError)
# The overrides --resume takes: `config.KEY` of where the data lies, not of how to train.
RESUME_DATA_KEYS = tuple(f"config.{key}" for key in DATA_KEYS)
# Set when a Ctrl-C or SIGTERM stops the command (see _ended_by and exit_process).
_STOPPED = threading.Event()
# Set when _ended_by has reported the stop: the command ends next, and is not stopped again.
_STOP_REPORTED = threading.Event()


def fail(message: str) -> int:
    """Print `error: message` to stderr; the exit status 1 to return."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def exit_process(status: int) -> NoReturn:
    """End train.py or explain.py with `status`.

    A Ctrl-C or SIGTERM stops only the main thread's wait for a compilation; JAX goes on compiling
    on a worker thread. Python's finalization then destroyed JAX's client under that thread and the
    process crashed with a segmentation fault after its one-sentence error (2 of 10 train.py runs
    stopped in their first compilation, and a core file where core dumps are on). By then the
    run's files are written and closed, so after a stop the process ends at once, unfinalized.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if _STOPPED.is_set():
        os._exit(status)
    sys.exit(status)


def use_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache in `$XDG_CACHE_HOME/jaxcam/jax` (default
    `~/.cache/jaxcam/jax`) unless a cache folder is already configured; returns the folder in
    use, or None when the cache is off.

    A re-run of the same model then loads its compiled init, train and eval programs instead
    of compiling them again (about 14 s on 2 CPU cores at width 16; the first bfloat16 train
    step alone compiles for about 20 s on an H100). `JAX_COMPILATION_CACHE_DIR=DIR` picks
    another folder and an empty `JAX_COMPILATION_CACHE_DIR=` turns the cache off.
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


def after_interrupt(run_dir: Path | None, epochs: int | None) -> str:
    """What train.py says after a Ctrl-C or SIGTERM: the command that continues the run, once it
    has begun and until its last epoch (of `epochs`, None while its config is not read) is saved."""
    if run_dir is None or not (run_dir / "config.json").exists():  # an LR range test may have run, not training
        return "interrupted before training began."
    if epochs is not None and has_finished_epoch(run_dir, epochs):
        # Stopped while the TensorBoard gallery or the per-class accuracy was made: --resume said
        # "nothing to resume" right after the advice to run it.
        return "interrupted after the last epoch was saved: the run is complete, and explain.py reports on it."
    return f"interrupted; python train.py --resume {shlex.quote(str(run_dir))} continues from the last epoch that ended."


@contextlib.contextmanager
def stop_signals_as_keyboard_interrupt() -> Iterator[None]:
    """Within the block SIGTERM stops as Ctrl-C does, with a KeyboardInterrupt, and neither is lost.

    `kill`, `timeout`, a batch scheduler's time limit and a preempted cloud VM send SIGTERM,
    which had ended the CLIs at once, without a word: train.py now writes the epoch's checkpoint
    whole (`checkpoint.interrupts_deferred`) and prints the --resume advice, and explain.py
    removes its half-made staging folder. Each stop is noted in `_STOPPED` (`_ended_by`,
    `exit_process`). Only the main thread can set a handler, and one installed from C (None to
    Python) is left as it is, as is an ignored SIGINT or one with another handler.

    The KeyboardInterrupt can be lost where it is raised: Python prints and drops one raised in a
    garbage-collector callback (JAX has one) or a finalizer, and C code that runs the handler
    may clear it (JAX's MLIR bindings, imported at the first compilation, do). The command then
    ran on to the end. So after a stop a watcher thread raises it again, silently, each time it
    finds the main thread handling no exception, until `_ended_by` reports the stop.
    """
    _STOPPED.clear()
    _STOP_REPORTED.clear()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is None:
        yield
        return
    main_thread = threading.get_ident()
    handled_before = sys.exc_info()[1]  # the block may run inside an except clause
    closing = threading.Event()
    raising_again = threading.Lock()  # no stop raised again once the block is left

    def raise_again_until_it_takes() -> None:
        while not closing.wait(0.1):
            with raising_again:
                # Handling the KeyboardInterrupt (or an error C code made of it) is the stop taking effect.
                if closing.is_set() or _STOP_REPORTED.is_set():
                    return
                if _exception_handled_by(main_thread) in (None, handled_before):
                    # Through SIGTERM, whose handler is ours: SIGINT may be ignored (a background job).
                    _thread.interrupt_main(signal.SIGTERM)

    def note_stop() -> None:
        if not _STOPPED.is_set():  # the first stop starts the watcher (one _ended_by notes is reported)
            _STOPPED.set()
            threading.Thread(target=raise_again_until_it_takes, daemon=True).start()

    def stop(signum: int, frame) -> None:
        if _STOP_REPORTED.is_set():
            return  # a second Ctrl-C while the first one's sentence is printed
        note_stop()
        raise KeyboardInterrupt

    def silence_dropped_interrupts(unraisable) -> None:
        if unraisable.exc_type is None or not issubclass(unraisable.exc_type, KeyboardInterrupt):
            previous_hook(unraisable)
            return
        note_stop()  # the watcher raises it again once the main thread is back in ordinary code

    previous_handlers = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS
                         if signum == signal.SIGTERM or signal.getsignal(signum) is signal.default_int_handler}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = silence_dropped_interrupts
    try:
        yield
    finally:
        with raising_again:
            closing.set()
        sys.unraisablehook = previous_hook
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def _exception_handled_by(thread_id: int) -> BaseException | None:
    """The exception that thread is handling (in an except, finally or __exit__), or None."""
    handled = sys._current_exceptions().get(thread_id)
    return handled[1] if isinstance(handled, tuple) else handled  # Python 3.11 gives (type, value, traceback)


def _ended_by(error: BaseException, stop_message: str) -> int:
    """The exit status after `error`, 1 after one sentence: `stop_message` for a KeyboardInterrupt
    or any error after a Ctrl-C or SIGTERM (the process then ends unfinalized, `exit_process`),
    the error's own for an expected one; any other error propagates.

    C code that calls back into Python can catch the KeyboardInterrupt raised there and raise an
    error of its own: explain.py stopped while matplotlib drew said "error: Invalid affine
    transformation matrix" instead of "error: interrupted.".
    """
    if isinstance(error, KeyboardInterrupt) or _STOPPED.is_set():
        _STOPPED.set()
        _STOP_REPORTED.set()
        return fail(stop_message)
    if isinstance(error, EXPECTED_ERRORS):
        return fail(str(error))
    raise error


def _empty_path_error(args: argparse.Namespace, flags: Sequence[str]) -> str | None:
    """The error for the first of `flags` (such as "--out") given as an empty string, else None.

    An empty path would mean the working directory: `--out "$DIR"` with DIR unset wrote a whole
    report there, and `--workdir "$DIR"` a run directory, where another folder had been meant.
    """
    flag = next((flag for flag in flags if getattr(args, flag[2:].replace("-", "_")) == ""), None)
    return None if flag is None else f"{flag} is an empty string (an unset shell variable?); give a path."


def run_train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """train.py: check the config and data, make the run directory, optionally run the LR range
    test, train (or resume); 0, or 1 after one sentence on stderr (also after Ctrl-C or SIGTERM)."""
    with stop_signals_as_keyboard_interrupt():
        return _train(args, overrides)


def _train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from jaxcam import train as train_lib

    if empty := _empty_path_error(args, ("--workdir", "--config", "--resume")):
        return fail(empty)
    use_compilation_cache()
    run_dir = config = None  # named in the advice after a Ctrl-C, once they are known
    made: list[Path] = []  # the folders this command made, the deepest first
    try:
        if args.resume:
            # Where the data lies may change (a run copied to another machine); the recipe may not.
            moved = [o for o in overrides if o.lstrip("-").split("=", 1)[0] in RESUME_DATA_KEYS]
            ignored = {"--config": args.config is not None,
                       "--config.* overrides other than the data's location": len(moved) < len(overrides),
                       "--find-lr": args.find_lr or args.find_lr_only}
            given = " and ".join(name for name, present in ignored.items() if present)
            if given:
                raise ConfigError(f"--resume continues a run with its saved config.json, so drop {given}.")
            run_dir = train_lib.check_run_dir(
                train_lib.latest_run_dir(args.workdir) if args.resume == "latest" else args.resume)
            config = apply_overrides(config_from_json(run_dir / "config.json"), moved)
            # A moved data location is recorded in config.json once the data is found to be the run's.
            train_lib.train_and_evaluate(config, run_dir, resume=True)
            return 0

        config = apply_overrides(load_config_file(args.config), overrides)
        train_lib.validate_config(config)
        find_lr = args.find_lr or args.find_lr_only or config.max_lr == "auto"
        if find_lr:
            from jaxcam import lr_finder

            lr_finder.validate_settings(config.get("lr_finder"))
        # Load the data before creating the run directory: bad data leaves nothing behind.
        dataset = train_lib.load_dataset(config)
        train_lib.check_batch_sizes(config, dataset)
        made = missing_folders(args.workdir)
        run_dir = train_lib.create_run_dir(args.workdir, config.name)
        made.insert(0, run_dir)
        print(f"Run directory: {run_dir}")
        if find_lr:
            suggestion = lr_finder.run_for_config(config, dataset, run_dir)
            if args.find_lr_only:
                return 0
            if config.max_lr == "auto":
                if suggestion is None:
                    raise RuntimeError("The LR range test gave no suggestion, so max_lr=auto cannot be resolved.")
                config.max_lr = float(suggestion)
                print(f"Training with the suggested max_lr {suggestion:.3g}.")
            else:  # the user might expect the suggestion to be used: say that it is not
                print(f"Training with the config's max_lr {config.max_lr:.3g}; --config.max_lr=auto would train "
                      "with the suggestion.")
        train_lib.train_and_evaluate(config, run_dir, dataset=dataset)
        return 0
    except (KeyboardInterrupt, Exception) as e:
        # Stopped, or failed, during the LR range test, before its plot: the run directory (and a
        # new --workdir) had been left empty beside the real runs.
        remove_if_empty(made)
        return _ended_by(e, after_interrupt(run_dir, None if config is None else config.epochs))


def run_explain(args: argparse.Namespace) -> int:
    """explain.py: write the report of a run; 0, or 1 after one sentence on stderr (also after Ctrl-C
    or SIGTERM, which leave the output folder as it was)."""
    with stop_signals_as_keyboard_interrupt():
        return _explain(args)


def _explain(args: argparse.Namespace) -> int:
    from jaxcam import explain

    if empty := _empty_path_error(args, ("--workdir", "--out", "--data-dir")):
        return fail(empty)
    use_compilation_cache()
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
    try:
        if args.images_only:
            explain.explain_image_files(args.workdir, args.images, args.out, layer=args.layer, method=args.method,
                                        data_dir=args.data_dir)
        else:
            explain.explain_run(args.workdir, args.out, layers=args.layer, method=args.method, image_files=args.images,
                                data_dir=args.data_dir, **dict(report_settings.values()))
        return 0
    except (KeyboardInterrupt, Exception) as e:
        return _ended_by(e, "interrupted.")
