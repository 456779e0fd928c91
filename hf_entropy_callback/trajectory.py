"""`Trajectory`: one tracked set's log-probabilities over the tracking points, in one growing array.

The tracker records a point as one row (examples, classes); the history is never re-stacked. Rows
live in a preallocated float32 array of shape (capacity, examples, classes) whose capacity doubles
when full, so recording a point costs one row's copy (amortised: a doubling copies the rows so far
once, which over n points adds at most n row copies in all), and every reader gets a view:
`view()` is the recorded rows as a C-contiguous array without a copy, which `np.savez` writes in
chunks and pickle serialises as it is.

Memory: the recorded rows, plus a capacity of untouched rows (allocated but not written: on Linux
those pages are not resident), plus at a doubling, for a moment, the old rows again.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

#: Capacity of a new trajectory, in points (the first doubling comes after this many).
INITIAL_CAPACITY = 16


class Trajectory:
    """Log-probabilities (points, examples, classes) of one tracked set, appended one point at a time.

    Args:
        num_examples (`int`): examples of the set (the second axis).
        num_classes (`int`): classes (the third axis).
        capacity (`int`, *optional*): points to allocate room for up front (default `INITIAL_CAPACITY`).

    Example:
        >>> t = Trajectory(4, 3)
        >>> t.append(np.log(np.full((4, 3), 1 / 3)))
        >>> t.view().shape, t.view().flags.writeable
        ((1, 4, 3), False)
    """

    def __init__(self, num_examples: int, num_classes: int, capacity: Optional[int] = None):
        self._data = np.empty((max(int(capacity or INITIAL_CAPACITY), 1), num_examples, num_classes), np.float32)
        self._n = 0

    @classmethod
    def from_array(cls, values: np.ndarray) -> "Trajectory":
        """A trajectory holding a copy of `values` (points, examples, classes), with room to grow."""
        values = np.asarray(values)
        if values.ndim != 3:
            raise ValueError(f"Trajectory.from_array: expected (points, examples, classes), got shape {values.shape}")
        out = cls(values.shape[1], values.shape[2], capacity=max(INITIAL_CAPACITY, 2 * len(values)))
        out._data[: len(values)] = values
        out._n = len(values)
        return out

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return len(self._data)

    @property
    def shape(self):
        return (self._n,) + self._data.shape[1:]

    def append(self, row: np.ndarray) -> None:
        """Store one point's (examples, classes) log-probabilities (copied, as float32)."""
        if row.shape != self._data.shape[1:]:
            raise ValueError(f"Trajectory.append: a point has shape {self._data.shape[1:]}, got {row.shape}")
        if self._n == len(self._data):
            grown = np.empty((2 * len(self._data),) + self._data.shape[1:], np.float32)
            grown[: self._n] = self._data[: self._n]
            # Views handed out before keep the old array alive and unchanged: rows are never rewritten.
            self._data = grown
        self._data[self._n] = row
        self._n += 1

    def point(self, index: int) -> np.ndarray:
        """One point's (examples, classes) log-probabilities, a read-only view (negative indices count back)."""
        return self.view()[index]

    def view(self) -> np.ndarray:
        """The recorded points, (points, examples, classes) float32: a read-only view, not a copy.

        Read-only so that a caller cannot change the history through it; rows it shows are never
        written again (appends go to later rows, a doubling moves them to a new array).
        """
        out = self._data[: self._n]
        out.flags.writeable = False
        return out
