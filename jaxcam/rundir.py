"""A run directory `<workdir>/<name>_<YYYYMMDD>_<HHMMSS>/`: making and finding one, and the
records that let `--resume` and explain.py trust it (config.json, history.json, and what the
checkpoints record of the data a run was trained on)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import ml_collections

from jaxcam._checks import class_names_problem, history_problem, is_number, kind_of
from jaxcam.checkpoint import make_writable_folder, write_json
from jaxcam.configuration import DATA_KEYS, config_from_json
from jaxcam.errors import CheckpointError, ConfigError, DataError


def check_run_name(name: Any, what: str = "name") -> None:
    """ValueError unless `name` can start a run directory's name: a non-empty name, not a path."""
    if not isinstance(name, str) or not name.strip() or Path(name).name != name:
        raise ValueError(f"{what} starts the run directory's name, so it must be a non-empty name without "
                         f"'/', got {name!r}.")


def create_run_dir(workdir: str | os.PathLike, name: str) -> Path:
    """`<workdir>/<name>_<YYYYMMDD>_<HHMMSS>` (with a numeric suffix if that already exists)."""
    check_run_name(name)
    workdir = make_writable_folder(workdir, "workdir")
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    run_dir = workdir / f"{name}_{stamp}"
    suffix = 1
    while True:
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            run_dir = workdir / f"{name}_{stamp}_{suffix}"
            suffix += 1


_RUN_STAMP = re.compile(r"_(\d{8}_\d{6})(?:_(\d+))?$")


def _created(run_dir: Path) -> tuple[float, int]:
    """When a run directory was created: from the `<YYYYMMDD>_<HHMMSS>[_n]` of its name, which a
    copy keeps (`cp -r` gives every folder a new mtime, and --resume rewrites a config.json);
    from its config.json's mtime for a folder named otherwise."""
    match = _RUN_STAMP.search(run_dir.name)
    if match:
        with contextlib.suppress(ValueError):
            stamp = datetime.datetime.strptime(match[1], "%Y%m%d_%H%M%S").timestamp()
            return stamp, int(match[2] or 0)
    return (run_dir / "config.json").stat().st_mtime, 0


def latest_run_dir(workdir: str | os.PathLike) -> Path:
    """The most recently created run directory (one with a config.json) in `workdir`."""
    folder = Path(workdir)
    runs = sorted((p.parent for p in folder.glob("*/config.json")), key=_created)
    if not runs:
        hint = ""
        # `--workdir RUN_DIR --resume` is a natural slip, since explain.py's --workdir is the run.
        run = folder if _is_run(folder) else _run_around(folder)
        if run is not None:
            where = ("it is a run directory itself" if run == folder
                     else f"it lies inside the run directory {str(run)!r}")
            hint = f"; {where}: train.py --resume {shlex.quote(str(run))} continues it"
        raise ConfigError(f"No run directory with a config.json in {str(workdir)!r} to resume{hint}.")
    return runs[-1]


def _is_run(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _run_around(path: str | os.PathLike) -> Path | None:
    """The run directory that `path` (a folder of a run: its checkpoints or its report) lies in, if any."""
    # The deepest folders of a run are checkpoints/<which>/<step>/<item>; looking no higher keeps a
    # stray config.json far above (a home folder's) from being named. The parents are those of the
    # absolute path because "." and ".." have none of their own; abspath folds ".." by name.
    return next(filter(_is_run, Path(os.path.abspath(path)).parents[:4]), None)


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """`run_dir` as a Path if it is a run directory (it has a config.json); else ConfigError, naming
    the newest run inside it when the user passed the workdir that holds the runs, or the run around
    it when the user passed a folder inside one (its checkpoints or its report)."""
    run_dir = Path(run_dir)
    if _is_run(run_dir):
        return run_dir
    if not run_dir.exists():  # most often a mistyped path: "no config.json" would send the user looking for one
        raise ConfigError(f"The run directory {str(run_dir)!r} does not exist.")
    hint = ""
    if (around := _run_around(run_dir)) is not None:
        hint = f"; it lies inside the run directory {str(around)!r}, so pass that"
    elif run_dir.is_dir():
        with contextlib.suppress(ConfigError):
            hint = f"; it holds run directories, so pass one, such as the newest {str(latest_run_dir(run_dir))!r}"
    raise ConfigError(f"{str(run_dir)!r} is not a jaxcam run directory (no config.json){hint}.")


def config_record(config: ml_collections.ConfigDict) -> dict:
    """What a run's config.json holds: the config, with the data paths made absolute so that
    explain.py and --resume find the data from any working directory."""
    saved = json.loads(config.to_json_best_effort())
    for key in DATA_KEYS:
        # From the config, not its JSON: a pathlib.Path there is "unserializable object: <path>".
        if config.get(key) is not None:
            saved[key] = str(Path(config[key]).expanduser().absolute())
    return saved


def check_trained_classes(run_dir: str | os.PathLike, meta: dict, dataset, data: str,
                          remedy: str) -> None:
    """DataError unless `dataset` has the classes that a checkpoint's `meta` records as trained on
    (checkpoints written before they were recorded pass); `data` names the dataset, `remedy` the fix."""
    trained_on = meta.get("class_names")
    if trained_on is not None and list(trained_on) != list(dataset.class_names):
        raise DataError(f"{str(run_dir)!r} was trained on the classes {', '.join(trained_on)}, but {data} "
                                 f"has {', '.join(dataset.class_names)}; {remedy}.")


def recorded_normalization(run_dir: str | os.PathLike, which: str,
                           meta: dict) -> tuple[tuple[str, ...], list, list] | None:
    """The class names, channel means and stds that training recorded in the meta of the `which`
    checkpoint of `run_dir`, checked (CheckpointError if malformed); None for a checkpoint
    written before they were recorded."""
    if not {"class_names", "mean", "std"} <= meta.keys():
        return None
    names, mean, std = meta["class_names"], meta["mean"], meta["std"]

    def three_numbers(values) -> bool:
        return isinstance(values, list) and len(values) == 3 and all(map(is_number, values))

    # JSON gives lists, never tuples, so the shared check's list-or-tuple is the list this meta needs.
    if not (class_names_problem(names) is None and len(names) >= 2
            and three_numbers(mean) and three_numbers(std) and min(std) > 0):
        raise CheckpointError(f"The classes and normalization recorded in the {which} checkpoint in {str(run_dir)!r} "
                              "are malformed (expected class names, 3 channel means and 3 positive standard "
                              "deviations); it was edited or damaged.")
    return tuple(names), mean, std


def check_trained_split(run_dir: str | os.PathLike, meta: dict, dataset) -> None:
    """DataError unless `dataset`'s training split has the channel mean and std that the latest
    checkpoint's `meta` records (checkpoints written before they were recorded pass). They are
    exact sums of integers, so the same images in any order (tensorflow-datasets' or the official
    archive's) give them bitwise; other images, resumed on, would change the normalization and the
    steps per epoch, so the one-cycle schedule, half-way through a run."""
    recorded = recorded_normalization(run_dir, "latest", meta)
    if recorded is None:
        return
    _, mean, std = recorded
    if [float(v) for v in (*mean, *std)] != [float(v) for v in (*dataset.mean, *dataset.std)]:
        raise DataError(
            f"{str(run_dir)!r} was trained on other training images than those of the data given (the channel mean "
            "and std recorded in its checkpoint differ from theirs); resume it on its own data.")


def record_data_location(config: ml_collections.ConfigDict, run_dir: str | os.PathLike) -> None:
    """Write where `config` finds the data (DATA_KEYS) into the run's config.json if it moved, so
    that explain.py and a later resume find it there too; the rest of the file stays as it is."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return
    saved, given = json.loads(path.read_text()), config_record(config)
    moved = {key: given.get(key) for key in DATA_KEYS if saved.get(key) != given.get(key)}
    if moved:
        write_json(path, {**saved, **moved})


# What may differ from a run's config.json when it is resumed: where the data lies, and settings
# that do not change what is trained.
RESUME_FREE_KEYS = (*DATA_KEYS, "name", "lr_finder", "prefetch", "tensorboard", "print_summary")


def check_resume_config(config: ml_collections.ConfigDict, run_dir: str | os.PathLike) -> None:
    """ConfigError unless `config` trains as `run_dir/config.json` does (RESUME_FREE_KEYS aside):
    resumed with other settings (more epochs, say), the run would silently be neither the one
    config.json records nor an uninterrupted run of the new settings."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return
    saved, given = config_record(config_from_json(path)), config_record(config)
    differing = [key for key in sorted(saved.keys() | given.keys())
                 if key not in RESUME_FREE_KEYS and saved.get(key) != given.get(key)]
    if differing:
        detail = ", ".join(f"{key} ({saved.get(key)!r} there, {given.get(key)!r} here)" for key in differing)
        raise ConfigError(f"The config differs from the run's {str(path)!r} in {detail}; a resumed run keeps its "
                          "own settings, so resume with configuration.config_from_json of that file.")


HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")


def checkpoint_history(run_dir: str | os.PathLike, meta: dict) -> list[dict]:
    """The per-epoch records up to the checkpoint whose `meta` is given: those it holds, checked
    (CheckpointError if malformed), or for a checkpoint written before they were recorded, those
    of history.json up to its epoch."""
    if "history" not in meta:
        return [r for r in read_history(run_dir) if r["epoch"] <= meta["epoch"]]
    history = meta["history"]
    problem = history_problem(history, HISTORY_KEYS)
    if problem is None and [r["epoch"] for r in history] != list(range(1, meta["epoch"] + 1)):
        problem = f"its epochs are not 1 to {meta['epoch']}"
    if problem:
        raise CheckpointError(f"The history recorded in the latest checkpoint of epoch {meta['epoch']} in "
                              f"{str(run_dir)!r} is malformed ({problem}); it was edited or damaged.")
    return history


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """The per-epoch records of `run_dir/history.json` ([] if there is none yet); ConfigError
    naming the file if it is not valid JSON or not a list of records with HISTORY_KEYS."""
    path = Path(run_dir) / "history.json"
    if not path.exists():
        return []
    try:
        history = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({e}).") from None
    if not isinstance(history, list):
        raise ConfigError(f"{str(path)!r} must hold a list of per-epoch records, got {kind_of(history)}.")
    problem = history_problem(history, HISTORY_KEYS)
    if problem:
        raise ConfigError(f"{str(path)!r} is not a jaxcam history: {problem}.")
    return history
