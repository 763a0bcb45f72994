"""Config files as Python (`get_config()` returning an ml_collections.ConfigDict) and
`--config.KEY=VALUE` overrides with type checks and clear errors."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from jaxcam._checks import kind_of
from jaxcam.errors import ConfigError

# Keys whose value may also be one of these strings.
SPECIAL_STRINGS = {"max_lr": ("auto",)}
# A value's type in words, for errors ("config.width takes an integer, got 'abc'.").
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string"}

# The keys that say where the data lies (not how to train): made absolute in a run's config.json,
# and the ones a resumed run may change.
DATA_KEYS = ("data_dir", "tfds_data_dir")
# Every top-level key the library reads; configs/default.py sets each (a test keeps them equal).
# `lr_finder` holds the LR range test's settings, read only by `train.py --find-lr`.
CONFIG_KEYS = (
    "name", "data_dir", "tfds_data_dir", "model", "width", "dtype", "epochs", "batch_size", "eval_batch_size",
    "optimizer", "momentum", "nesterov", "beta2", "weight_decay", "label_smoothing", "schedule", "max_lr",
    "pct_start", "div_factor", "final_div_factor", "anneal_strategy", "three_phase", "cycle_momentum",
    "base_momentum", "max_momentum", "augment", "crop_padding", "cutout_size", "cutout_prob", "flip", "prefetch",
    "seed", "tensorboard", "print_summary",
)
# The keys of `config.lr_finder`, as configs/default.py sets them (a test keeps them equal).
LR_FINDER_KEYS = ("start_lr", "end_lr", "num_iter", "step_mode", "smooth_f", "diverge_th", "skip_start", "skip_end",
                  "up_to_minimum")


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Import a Python config file and call its `get_config()`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"Config file {str(path)!r} is a folder; name a .py file with get_config() in it, such as "
                          "configs/default.py.")
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    if path.suffix != ".py":
        raise ConfigError(f"Config file {str(path)!r} is not a Python file; configs are .py files with get_config().")
    # Configs may import each other as `configs.<name>`: make their parent importable.
    parent = str(path.absolute().parent.parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    spec = importlib.util.spec_from_file_location(f"_jaxcam_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        raise ConfigError(f"Config file {str(path)!r} failed to load ({type(e).__name__}: {e}).") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file {str(path)!r} has no get_config() function.")
    try:
        config = module.get_config()
    except Exception as e:
        raise ConfigError(f"get_config() of {str(path)!r} failed ({type(e).__name__}: {e}).") from None
    if not isinstance(config, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"get_config() of {str(path)!r} returned {kind_of(config)}, not a ConfigDict.")
    config = ml_collections.ConfigDict(dict(config.items()) if isinstance(config, dict) else config.to_dict(),
                                       type_safe=False)
    check_keys(config, CONFIG_KEYS, f"Config file {str(path)!r}", optional=("lr_finder",))
    return config


def config_from_json(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """A run's saved config.json as a ConfigDict."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"Cannot read the run config {str(path)!r} ({e}).") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"The run config {str(path)!r} is not a JSON object of config keys.")
    check_keys(saved, CONFIG_KEYS, f"The run config {str(path)!r}", optional=("lr_finder",),
               remedy="train.py writes every key, so this file was edited or comes from elsewhere")
    return ml_collections.ConfigDict(saved, type_safe=False)


def check_keys(node: Any, expected: Sequence[str], where: str, optional: Sequence[str] = (),
               remedy: str = "start from configs/default.py's get_config() and change what differs") -> None:
    """ConfigError unless `node` has each `expected` key and no key outside `expected` and
    `optional`: a config written by hand can lack a key the library reads, or misspell one,
    which would otherwise be silently ignored. `where` names the node ("The config")."""
    missing = [key for key in expected if key not in node]
    if missing:
        raise ConfigError(f"{where} lacks {_keys_in_words(missing)}; {remedy}.")
    unknown = [key for key in node.keys() if key not in expected and key not in optional]
    if unknown:
        raise ConfigError(f"{where} has {_keys_in_words(unknown, unknown=True)}; known keys: "
                          f"{', '.join(sorted([*expected, *optional]))}.")


def _keys_in_words(keys: Sequence[str], unknown: bool = False) -> str:
    names = ", ".join(map(repr, keys))
    if len(keys) == 1:
        return f"{'an unknown' if unknown else 'the'} key {names}"
    return f"{'unknown' if unknown else 'the'} keys {names}"


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply `config.KEY=VALUE` (or `config.a.b=VALUE`) strings in place and return the config.

    Values are Python literals (`0.1`, `True`, `None`, `'str'`) or bare strings; they must
    fit the type of the existing value (ints widen to floats; None-valued keys take anything).
    """
    for item in overrides:
        body = item[len("--") :] if item.startswith("--") else item
        if not body.startswith("config.") or "=" not in body:
            raise ConfigError(f"Cannot parse {item!r}; write overrides as --config.KEY=VALUE.")
        dotted, text = body[len("config.") :].split("=", 1)
        *parents, key = dotted.split(".")
        node = config
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"Unknown config key {dotted!r}.")
            node = node[part]
        if key not in node:
            known = ", ".join(sorted(k for k in node.keys()))
            raise ConfigError(f"Unknown config key {dotted!r}; known keys: {known}.")
        value = _parse_value(text)
        current = node[key]
        if value in SPECIAL_STRINGS.get(key, ()):
            pass
        elif current is None or value is None and key.endswith("dir"):
            pass
        elif isinstance(current, ml_collections.ConfigDict):  # a group: its keys take the values
            raise ConfigError(f"config.{dotted} is a group of settings; set one of them as "
                              f"--config.{dotted}.KEY=VALUE ({', '.join(sorted(current.keys()))}).")
        elif isinstance(current, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):  # as absl's flags take them
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise ConfigError(f"config.{dotted} takes True or False, got {text!r}.")
        elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(current, str) and current in SPECIAL_STRINGS.get(key, ()) and isinstance(value, (int, float)):
            value = float(value)
        elif type(value) is not type(current):
            raise ConfigError(
                f"config.{dotted} takes {_TYPE_WORDS.get(type(current), type(current).__name__)}, got {text!r}."
            )
        node[key] = value
    return config
