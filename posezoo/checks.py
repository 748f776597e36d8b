"""Plausibility checks of predicted poses over a whole video, where no labels exist.

The failure they look for is a head/tail confusion of an elongated animal (a mouse's snout
predicted on its tail base, or the two swapped), which per-frame test errors on a few labelled
frames can miss. Three signs, each counted only where the points involved are confident:

- the head-tail distance leaves the animal's plausible body length (a collapsed or torn body);
- the head-tail axis turns by more than ``max_turn_deg`` between consecutive frames (a swap: an
  animal does not reverse in 1/30 s);
- the head is farther from the ears than the tail is (a swap, when the model has ears).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class HeadTailReport:
    """What :func:`head_tail_check` found; ``ok`` when no frame shows any sign.

    Attributes
    ----------
    n_frames, n_checked : int
        Frames in the table; frames where head and tail are both confident.
    length_px : tuple of float
        The 1st, 50th and 99th percentile of the head-tail distance over the checked frames.
    bad_length, turned, head_behind_ears : list of int
        Frame indices showing each sign.
    """

    n_frames: int
    n_checked: int
    length_px: tuple[float, float, float]
    bad_length: list[int] = field(default_factory=list)
    turned: list[int] = field(default_factory=list)
    head_behind_ears: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.bad_length or self.turned or self.head_behind_ears)


def body_length_bounds(lengths: np.ndarray, slack: float = 0.5) -> tuple[float, float]:
    """Plausible head-tail distances from labelled ones: ``(1 - slack) * min`` to
    ``(1 + slack) * max`` (a mouse stretches and curls, but not by half again)."""
    lengths = np.asarray(lengths, dtype=float)
    lengths = lengths[np.isfinite(lengths)]
    if lengths.size == 0:
        raise InputError("no labelled frame has both the head and the tail")
    return float((1 - slack) * lengths.min()), float((1 + slack) * lengths.max())


def head_tail_check(data: np.ndarray, keypoints, *, head: str, tail: str, length_bounds: tuple[float, float],
                    pcutoff: float, ears: tuple[str, str] | None = None, max_turn_deg: float = 120.0,
                    individual: int = 0) -> HeadTailReport:
    """Look for head/tail confusions of one animal over a whole video.

    Parameters
    ----------
    data : ndarray, shape (n_frames, n_individuals, n_keypoints, 3)
        ``x, y, likelihood`` (e.g. ``PoseTable.data``).
    keypoints : sequence of str, length n_keypoints
    head, tail : str
        Keypoint names, e.g. ``"snout"`` and ``"tailbase"``.
    length_bounds : (float, float)
        Plausible head-tail distance in pixels (see :func:`body_length_bounds`).
    pcutoff : float
        Points under this likelihood are not checked.
    ears : (str, str), optional
        Left and right ear: the head must be nearer their midpoint than the tail is.
    max_turn_deg : float
        The largest turn of the head-tail axis between two consecutive frames.
    """
    names = list(keypoints)
    missing = [k for k in (head, tail, *(ears or ())) if k not in names]
    if missing:
        raise InputError(f"keypoints {missing} are not among the model's {names}")
    d = np.asarray(data, dtype=float)[:, individual]
    h, t = d[:, names.index(head)], d[:, names.index(tail)]
    both = (h[:, 2] >= pcutoff) & (t[:, 2] >= pcutoff)
    axis = h[:, :2] - t[:, :2]
    length = np.hypot(axis[:, 0], axis[:, 1])
    lo, hi = length_bounds
    bad_length = np.flatnonzero(both & ((length < lo) | (length > hi)))
    angle = np.arctan2(axis[:, 1], axis[:, 0])
    turn = np.abs((np.diff(angle) + np.pi) % (2 * np.pi) - np.pi)
    turned = np.flatnonzero(both[1:] & both[:-1] & (turn > np.deg2rad(max_turn_deg))) + 1
    behind: np.ndarray = np.zeros(0, dtype=int)
    if ears:
        left, right = d[:, names.index(ears[0])], d[:, names.index(ears[1])]
        ok = both & (left[:, 2] >= pcutoff) & (right[:, 2] >= pcutoff)
        mid = (left[:, :2] + right[:, :2]) / 2
        behind = np.flatnonzero(ok & (np.linalg.norm(h[:, :2] - mid, axis=1) > np.linalg.norm(t[:, :2] - mid, axis=1)))
    pct = np.percentile(length[both], [1, 50, 99]) if both.any() else np.full(3, np.nan)
    return HeadTailReport(n_frames=len(d), n_checked=int(both.sum()), length_px=tuple(float(v) for v in pct),
                          bad_length=bad_length.tolist(), turned=turned.tolist(), head_behind_ears=behind.tolist())
