"""Plausibility checks of predicted poses over a whole video, where no labels exist.

The failure they look for is a head/tail confusion of an elongated animal (a mouse's snout
predicted on its tail base, or the two swapped), which per-frame test errors on a few labelled
frames can miss. Three signs, each counted only where the points involved are confident:

- the head-tail distance leaves the animal's plausible body length (a collapsed or torn body);
- the head-tail axis turns by more than ``max_turn_deg`` between consecutive frames (a swap: an
  animal does not reverse in 1/30 s);
- the head is farther from the ears than the tail is (a swap, when the model has ears).

:func:`left_right_check` looks for the other confusion, of a left/right pair (the ears swapped),
in predictions or in human labels alike: in a top view the left ear stays on one side of the
tail-to-head axis, so a frame where a pair sits the other way round from most frames is flagged.
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


def _names_with(keypoints, wanted) -> list[str]:
    """``keypoints`` as a list; an :class:`InputError` naming those of ``wanted`` it lacks."""
    names = list(keypoints)
    missing = [k for k in wanted if k not in names]
    if missing:
        raise InputError(f"keypoints {missing} are not among {names}")
    return names


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
    names = _names_with(keypoints, (head, tail, *(ears or ())))
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


@dataclass(frozen=True)
class LeftRightReport:
    """What :func:`left_right_check` found; ``ok`` when no frame has a pair the other way round.

    Attributes
    ----------
    n_checked : int
        Frames where the head, the tail and both members of at least one pair are present.
    side : dict of str to int
        For each pair's left keypoint, the side of the tail-to-head axis it is on in most
        checked frames: +1 or -1 (the sign of the cross product in image coordinates).
    swapped : dict of str to list of int
        For each pair's left keypoint, the frames where the left point is on the other side and
        the right point on the left's usual side (the pair swapped).
    """

    n_checked: int
    side: dict[str, int]
    swapped: dict[str, list[int]]

    @property
    def ok(self) -> bool:
        return not any(self.swapped.values())


def left_right_check(xy: np.ndarray, keypoints, *, head: str, tail: str, pairs) -> LeftRightReport:
    """Find frames whose left/right pairs sit the other way round from most frames.

    Parameters
    ----------
    xy : ndarray, shape (n_frames, n_keypoints, 2)
        Points in pixels, NaN where missing (``LabelledData.coords``, or a table's ``x, y`` with
        the unconfident points set to NaN).
    keypoints : sequence of str, length n_keypoints
    head, tail : str
        The body axis, e.g. ``"snout"`` and ``"tailbase"``.
    pairs : sequence of (str, str)
        Left/right pairs, e.g. ``[("leftear", "rightear")]`` (a card's ``flip_pairs``).

    Notes
    -----
    Only for views that do not mirror the animal between frames (top or bottom views); a
    side view sees the left ear from either side.
    """
    names = _names_with(keypoints, (head, tail, *(k for pair in pairs for k in pair)))
    d = np.asarray(xy, dtype=float)
    tail_xy = d[:, names.index(tail)]
    axis = d[:, names.index(head)] - tail_xy

    def side(name: str) -> np.ndarray:  # sign of axis x (point - tail); NaN where missing
        v = d[:, names.index(name)] - tail_xy
        return np.sign(axis[:, 0] * v[:, 1] - axis[:, 1] * v[:, 0])

    checked = np.zeros(len(d), bool)
    usual, swapped = {}, {}
    for left, right in pairs:
        sl, sr = side(left), side(right)
        both = np.isfinite(sl) & np.isfinite(sr) & (sl != 0) & (sr != 0)
        checked |= both
        majority = 1 if np.sum(sl[both] > 0) >= np.sum(sl[both] < 0) else -1
        usual[left] = majority
        swapped[left] = np.flatnonzero(both & (sl == -majority) & (sr == majority)).tolist()
    return LeftRightReport(n_checked=int(checked.sum()), side=usual, swapped=swapped)
