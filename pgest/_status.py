"""Kernel status codes (csrc/include/pgest/status.h) and the exceptions
they become, naming the argument at fault. A leaf: nothing here imports the
rest of the package."""
from __future__ import annotations

import math
import re

# Mirrors csrc/include/pgest/status.h.
OK = 0
NONFINITE_INPUT = 1
ALL_NEG_INF = 2
LABEL_OUT_OF_RANGE = 3
NONFINITE_REWARD = 4
NONFINITE_BASELINE = 5
UNSUPPORTED_DTYPE = 6
OUT_OF_MEMORY = 8
CUDA_ERROR = 9
ACTION_OUT_OF_RANGE = 11
ACTION_OUTSIDE_KEPT = 12


def row_index(row: int, lead_shape) -> str:
    """A flattened row number as the index of the caller's leading dimensions."""
    if len(lead_shape) <= 1:
        return str(row)
    idx = []
    for size in reversed(lead_shape):
        idx.append(row % size)
        row //= size
    return ", ".join(str(i) for i in reversed(idx))


def unflatten_message(msg: str, lead_shape) -> str:
    """Kernel messages count flattened rows; name the caller's indices instead."""
    m = re.match(r"(\w+)\[(\d+)(.*)", msg)
    if m and len(lead_shape) > 1:
        return f"{m.group(1)}[{row_index(int(m.group(2)), lead_shape)}{m.group(3)}"
    return msg


def raise_for_status(result, *, input_name: str, num_actions: int, table_is_vector: bool = False,
                     lead_shape=None, samples_per_row: int = 1, ignore_index=None) -> None:
    """Raise the exception for a kernel's (status, row, col, index, value).
    ``index`` and ``value`` are None where they were not read back (errors
    deferred from the GPU keep only the status, the row and the column)."""
    status, row, col, index, value = result
    if status == OK:
        return
    where = row_index(row, lead_shape) if lead_shape is not None else str(row)
    if status == NONFINITE_INPUT:
        what = "NaN or +inf" if value is None else value
        raise ValueError(
            f"{input_name}[{where}, {col}] is {what}: scores must be finite or -inf "
            "(NaN and +inf rows cannot be sampled from)"
        )
    if status == ALL_NEG_INF:
        raise ValueError(f"{input_name}[{where}] is all -inf: no action has positive probability")
    if status == ACTION_OUT_OF_RANGE:
        at = f"{where}, {col}" if samples_per_row > 1 else where
        also = f" and is not ignore_index ({ignore_index})" if ignore_index is not None else ""
        value_of = "" if index is None else f" = {index}"
        raise IndexError(f"actions[{at}]{value_of} is out of range for {num_actions} actions{also}")
    if status == ACTION_OUTSIDE_KEPT:
        at = f"{where}, {col}" if samples_per_row > 1 else where
        value_of = "" if index is None else f" = {index}"
        raise ValueError(f"actions[{at}]{value_of} is outside the kept set of its row (truncated by temperature / "
                         "top_k / top_p / min_p, or not among the kept tokens): it has no probability")
    if status == LABEL_OUT_OF_RANGE:
        # the kernels report the label itself in the column word
        label = col if index is None else index
        raise IndexError(f"labels[{row}] = {label} is out of range for {num_actions} actions")
    if status == NONFINITE_REWARD:
        where = f"reward_table[{col}]" if table_is_vector else f"reward_table[{row}, {col}]"
        if value is None:
            raise ValueError(f"{where} (sampled in row {row}) is not finite: rewards must be finite, and fit the "
                             "type they are kept in")
        if math.isfinite(value):
            raise ValueError(f"{where} = {value} (sampled in row {row}) overflows float32, the type rewards "
                             "are kept in")
        raise ValueError(f"{where} is {value} (sampled in row {row}): rewards must be finite")
    if status == NONFINITE_BASELINE:
        if value is None:
            raise ValueError(f"baseline[{row}] is not finite: baselines must be finite, and fit the type rewards "
                             "are kept in")
        if math.isfinite(value):
            raise ValueError(f"baseline[{row}] = {value} overflows float32, the type rewards are kept in")
        raise ValueError(f"baseline[{row}] is {value}: baselines must be finite")
    if status == OUT_OF_MEMORY:
        raise MemoryError("pgest: could not allocate per-thread scratch")
    if status == UNSUPPORTED_DTYPE:
        raise TypeError(f"{input_name}: dtype not supported by the native kernel")
    raise RuntimeError(f"pgest kernel failed with status {status} (row {row}, col {col}, index {index})")
