"""Argument checks shared by every public function. They raise before any launch and say what was
expected and what arrived."""

from __future__ import annotations

import math
import numbers

import numpy as np


def dtype_name(x) -> str:
    """Readable dtype of a numpy/CuPy array or torch tensor."""
    d = getattr(x, "dtype", None)
    return str(d).replace("torch.", "") if d is not None else type(x).__name__


def check_dtype(name: str, x, allowed: tuple[str, ...]) -> str:
    """Return the dtype name of ``x`` if it is one of ``allowed`` (names such as "float16")."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    got = dtype_name(x)
    if got not in allowed:
        raise TypeError(f"{name}: expected dtype {' or '.join(allowed)}, got {got}")
    return got


def shape_of(x) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def check_shape(name: str, x, want: tuple) -> None:
    """``want`` may hold None for "any size" in a position."""
    got = shape_of(x)
    if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
        shown = tuple("*" if w is None else w for w in want)
        raise ValueError(f"{name}: expected shape {shown}, got {got}")


def check_ndim(name: str, x, ndims: tuple[int, ...]) -> None:
    if len(x.shape) not in ndims:
        raise ValueError(f"{name}: expected {' or '.join(map(str, ndims))} dimensions, got shape {shape_of(x)}")


def check_multiple(name: str, what: str, value: int, multiple: int, why: str) -> None:
    if value % multiple:
        raise ValueError(f"{name}: {what} must be a multiple of {multiple} ({why}), got {value}")


def check_positive_finite(name: str, value) -> float:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {v}")
    return v


def check_finite_numpy(name: str, x: np.ndarray) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: expected finite values, got {x[idx]} at index {idx} "
            f"({int(bad.sum())} non-finite values in all); pass check_finite=False for the documented NaN-block result"
        )


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def np_dtype(name: str):
    """The numpy dtype of a dtype name; "bfloat16" is ml_dtypes.bfloat16 (CuPy >= 14 takes it too)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
