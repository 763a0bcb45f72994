"""Value predicates shared by the argument checks across jaxcam, where each caller words its own
error, and the checks whose error is the same wherever they run."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np


def is_integer(value: Any, at_least: int) -> bool:
    """An integer (Python or numpy, not a bool) of at least `at_least`."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= at_least


def is_real(value: Any) -> bool:
    """A real number (Python or numpy, not a bool), infinities and NaN included."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (Python or numpy, not a bool)."""
    return is_real(value) and math.isfinite(value)


def is_path(value: Any) -> bool:
    """A path: a string or an os.PathLike such as pathlib.Path."""
    return isinstance(value, (str, os.PathLike))


def kind_of(value: Any) -> str:
    """The type of `value` with its article, for error messages: "a list", "an int"; None is "None"."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def check_positive_integer(value: Any, name: str) -> None:
    """ValueError unless `value` is an integer (not a bool) of at least 1; `name` names it."""
    if not is_integer(value, 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_non_negative_integer(value: Any, name: str) -> None:
    """ValueError unless `value` is an integer (not a bool) of at least 0; `name` names it."""
    if not is_integer(value, 0):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


def check_flag(value: Any, name: str) -> None:
    """ValueError unless `value` is a bool (Python or numpy): a string such as "no" or "False" is
    truthy, so a switch given one would silently be on. `name` names it ("config.augment")."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


def class_names_problem(names: Any) -> str | None:
    """What keeps `names` from being class names, one distinct non-empty string per class
    ("'cat' is given more than once"), or None. A single string would otherwise be read letter
    by letter as classes, and a repeated name would merge two classes' rows in a report keyed
    by name."""
    if isinstance(names, (str, bytes)):
        return f"give one name per class, such as ('cat', 'dog'), not the single string {names!r}"
    if not isinstance(names, (list, tuple)):
        return f"give a list or tuple of strings, got {kind_of(names)}"
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name:
            return f"each must be a non-empty string, but name {index} is {name!r}"
    repeated = next((name for index, name in enumerate(names) if name in names[:index]), None)
    if repeated is not None:
        return f"each must be distinct, but {repeated!r} is given more than once"
    return None


def in_unit_range(maps: np.ndarray, tolerance: float = 0.0) -> bool:
    """All values finite and within [0, 1], give or take `tolerance`."""
    return bool(np.isfinite(maps).all() and maps.min() >= -tolerance and maps.max() <= 1 + tolerance)


def history_problem(history: Any, keys: tuple[str, ...]) -> str | None:
    """What keeps `history` from being a list of per-epoch records, each a dict with a number for
    each of `keys` ("record 2 has no number for 'lr'"), or None. NaN is a number here: an epoch's
    test loss may be NaN and is kept as the record of it."""
    if not isinstance(history, (list, tuple)):
        return f"it must be a list of them, got {kind_of(history)}"
    for index, record in enumerate(history):
        missing = [key for key in keys if not isinstance(record, dict) or not is_real(record.get(key))]
        if missing:
            return f"record {index} has no number for {', '.join(repr(key) for key in missing)}"
    return None


def check_classes(values: Any, num_classes: int, name: str = "label") -> np.ndarray:
    """Class indices (N,) as an int64 array of classes in 0..num_classes-1, else ValueError naming
    the first outside (a negative index would pick a class name from the end without a word)."""
    check_positive_integer(num_classes, "num_classes")
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"Give one class {name} per example, as an array (N,); got shape {values.shape}.")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"Class {name}s must be integers, got {values.dtype}.")
    outside = values[(values < 0) | (values >= num_classes)]
    if outside.size:
        raise ValueError(f"Class {name} {int(outside[0])} is out of range for {num_classes} classes.")
    return values.astype(np.int64)


def check_class_indices(labels: Any, predictions: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predictions as int64 arrays (N,) of classes in 0..num_classes-1, else ValueError.

    Counting them with bincount over label * K + prediction would file an out-of-range index
    under another class without a word.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.ndim != 1 or labels.shape != predictions.shape:
        raise ValueError(f"Give one label and one prediction per example, as arrays (N,); "
                         f"got shapes {labels.shape} and {predictions.shape}.")
    return check_classes(labels, num_classes, "label"), check_classes(predictions, num_classes, "prediction")
