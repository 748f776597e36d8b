"""Temporal filtering and outlier-frame detection on pose arrays (scipy.signal)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import InputError


def _fill_gaps(xy: np.ndarray) -> np.ndarray:
    """Linearly interpolate NaNs along time, per series. ``xy``: (n_frames, ...)."""
    flat = xy.reshape(xy.shape[0], -1)
    filled = pd.DataFrame(flat).interpolate(limit_direction="both", axis=0).to_numpy()
    return filled.reshape(xy.shape)


FILTERS = ("median", "savgol")


def check_filter(method: str, window: int, polyorder: int = 2) -> None:
    """Refuse filter settings :func:`filter_poses` cannot apply, before any work is done
    (the service checks a job's options with it before accepting the job).

    Raises
    ------
    InputError
        Unknown method, a window that is not a positive odd number, or a Savitzky-Golay
        ``polyorder`` not smaller than the window.
    """
    if method not in FILTERS:
        raise InputError(f"unknown filter {method!r}: use median or savgol")
    if window < 1 or window % 2 == 0:
        raise InputError(f"filter window must be a positive odd number of frames, got {window}")
    if method == "savgol" and window > 1 and polyorder >= window:
        smallest = polyorder + 1 if polyorder % 2 == 0 else polyorder + 2  # odd and > polyorder
        raise InputError(f"savgol polyorder ({polyorder}) must be smaller than the filter window ({window}): "
                         f"use a window of at least {smallest}")


def filter_poses(data: np.ndarray, method: str = "median", window: int = 5, polyorder: int = 2) -> np.ndarray:
    """Smooth ``x, y`` over time; likelihoods and missing points are kept.

    Parameters
    ----------
    data : ndarray, shape (n_frames, n_individuals, n_keypoints, 3)
    method : {"median", "savgol"}
        A running median (robust to single-frame jumps, as DeepLabCut's
        ``filterpredictions``) or a Savitzky-Golay polynomial fit.
    window : int
        Odd window length in frames.
    polyorder : int
        Polynomial order for ``savgol``.

    Returns
    -------
    ndarray, same shape as ``data``
    """
    check_filter(method, window, polyorder)
    data = np.asarray(data, dtype=np.float32)
    n = data.shape[0]
    w = min(window, n if n % 2 else n - 1)  # a video shorter than the window: the longest odd window
    if n < 2 or w <= 1 or (method == "savgol" and polyorder >= w):
        return data.copy()  # too few frames to smooth
    xy = data[..., :2]
    missing = np.isnan(xy)
    filled = _fill_gaps(xy)
    series = np.isfinite(filled).all(axis=0)  # a series with no point at all stays NaN
    filled = np.where(series[None], filled, 0.0)
    if method == "median":
        from scipy.ndimage import median_filter

        smooth = median_filter(filled, size=(w,) + (1,) * (filled.ndim - 1), mode="nearest")
    elif method == "savgol":
        from scipy import signal  # imported when used: scipy.signal costs ~1 s at start-up

        smooth = signal.savgol_filter(filled, w, polyorder, axis=0, mode="interp" if n >= w else "nearest")
    out = data.copy()
    out[..., :2] = np.where(missing, np.nan, smooth)
    return out


def outlier_frames(data: np.ndarray, pcutoff: float, max_jump: float) -> dict:
    """Frames worth relabelling (active learning): low confidence or implausible jumps.

    Parameters
    ----------
    data : ndarray, shape (n_frames, n_individuals, n_keypoints, 3)
    pcutoff : float
        A keypoint with likelihood below this is "uncertain".
    max_jump : float
        A keypoint that moves more than this many pixels from the previous frame,
        both frames confident, "jumped".

    Returns
    -------
    dict
        ``{"frames": [...], "low_confidence": n, "jumps": n, "pcutoff": p, "max_jump": d}``
        with ``frames`` the sorted frame indices.
    """
    data = np.asarray(data, dtype=np.float32)
    p = data[..., 2]
    low = (np.nan_to_num(p, nan=0.0) < pcutoff).any(axis=(1, 2))
    step = np.linalg.norm(np.diff(data[..., :2], axis=0), axis=-1)  # (n-1, i, k)
    confident = (p[1:] >= pcutoff) & (p[:-1] >= pcutoff)
    jumped = np.zeros_like(low)
    jumped[1:] = (np.nan_to_num(step, nan=0.0) * confident > max_jump).any(axis=(1, 2))
    frames = np.flatnonzero(low | jumped)
    return {
        "frames": frames.tolist(),
        "low_confidence": int(low.sum()),
        "jumps": int(jumped.sum()),
        "pcutoff": float(pcutoff),
        "max_jump": float(max_jump),
    }
