"""Labelled videos: keypoints, skeleton and optional trails drawn on every frame,
encoded as browser-playable H.264 (yuv420p, even size, faststart) MP4 with PyAV."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from .errors import TruncatedVideoError
from .table import PoseTable
from .video import VideoWriter, iter_frames, probe


def keypoint_colours(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 RGB colours spread over the "jet" colour map (DeepLabCut's default)."""
    ramp = np.linspace(0, 255, max(n, 1)).astype(np.uint8).reshape(-1, 1)
    bgr = cv2.applyColorMap(ramp, cv2.COLORMAP_JET).reshape(-1, 3)
    return bgr[:, ::-1].copy()


def draw_poses(
    frame: np.ndarray,
    poses: np.ndarray,
    colours: np.ndarray,
    skeleton_idx: np.ndarray,
    *,
    pcutoff: float,
    radius: int = 4,
    trail: np.ndarray | None = None,
) -> np.ndarray:
    """Draw on an RGB frame in place.

    Parameters
    ----------
    frame : ndarray, shape (height, width, 3), uint8
    poses : ndarray, shape (n_individuals, n_keypoints, 3)
    colours : ndarray, shape (n_keypoints, 3) or (n_individuals, n_keypoints, 3)
        A colour per keypoint, or per keypoint of each individual.
    skeleton_idx : ndarray, shape (n_edges, 2), int
    pcutoff : float
        Points with a likelihood below it (or NaN) are not drawn.
    trail : ndarray, shape (n_past, n_individuals, n_keypoints, 3), optional
    """
    colours = np.broadcast_to(colours, poses.shape[:2] + (3,))
    ok = np.nan_to_num(poses[..., 2], nan=0.0) >= pcutoff
    pts = np.nan_to_num(poses[..., :2], nan=-1.0).round().astype(np.int32)
    if trail is not None and len(trail) > 1:
        t_ok = (np.nan_to_num(trail[..., 2], nan=0.0) >= pcutoff).all(axis=0)
        t_pts = np.nan_to_num(trail[..., :2], nan=-1.0).round().astype(np.int32)
        for i, k in zip(*np.nonzero(t_ok)):
            cv2.polylines(frame, [np.ascontiguousarray(t_pts[:, i, k]).reshape(-1, 1, 2)], False,
                          colours[i, k].tolist(), 1, cv2.LINE_AA)
    for i in range(poses.shape[0]):
        for a, b in skeleton_idx:
            if ok[i, a] and ok[i, b]:
                cv2.line(frame, tuple(pts[i, a]), tuple(pts[i, b]), (255, 255, 255), 2, cv2.LINE_AA)
        for k in np.flatnonzero(ok[i]):
            cv2.circle(frame, tuple(pts[i, k]), radius, colours[i, k].tolist(), -1, cv2.LINE_AA)
    return frame


def render_labeled_video(
    video: str | os.PathLike,
    table: PoseTable,
    out_path: str | os.PathLike,
    *,
    skeleton: list[tuple[str, str]] | None = None,
    pcutoff: float = 0.4,
    trail_length: int = 0,
    radius: int | None = None,
    crf: int = 23,
    preset: str = "veryfast",
    progress: Callable[[int, int], None] | None = None,
    draw_boxes: bool = False,
    max_frames: int | None = None,
) -> Path:
    """Write ``out_path`` (MP4, H.264) with the table's poses drawn on ``video``.

    The output has the same number of frames and frame rate as the input; odd frame
    sizes are padded by one pixel to the even size H.264 in yuv420p requires.
    ``draw_boxes`` also draws a top-down table's boxes, in each animal's colour.
    ``max_frames`` stops after that many frames (the table of ``predict --max-frames``).
    ``progress(done, total)`` is called after each frame written.
    """
    info = probe(video)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    kp_index = {k: i for i, k in enumerate(table.keypoints)}
    skel = np.array([(kp_index[a], kp_index[b]) for a, b in (skeleton or []) if a in kp_index and b in kp_index],
                    dtype=np.int64).reshape(-1, 2)
    colours = keypoint_colours(len(table.keypoints))
    identity = keypoint_colours(len(table.individuals))
    if len(table.individuals) > 1:  # several animals: a colour per identity, as DeepLabCut's color_by="individual"
        colours = np.repeat(identity[:, None], len(table.keypoints), axis=1)
    boxes = table.boxes if draw_boxes else None
    radius = radius or max(2, round(min(info.width, info.height) / 120))
    total = min(info.n_frames, max_frames) if max_frames and info.n_frames else (max_frames or info.n_frames)
    with VideoWriter(out_path, info.width, info.height, info.fps, crf=crf, preset=preset) as writer:
        try:
            for i, frame in enumerate(iter_frames(video, max_frames=max_frames)):
                if i < table.n_frames:
                    frame = np.ascontiguousarray(frame)
                    trail = table.data[max(0, i - trail_length) : i + 1] if trail_length else None
                    draw_poses(frame, table.data[i], colours, skel, pcutoff=pcutoff, radius=radius, trail=trail)
                    if boxes is not None:
                        for j in np.flatnonzero(np.isfinite(boxes[i, :, 0])):
                            x1, y1, x2, y2 = np.round(boxes[i, j, :4]).astype(int).tolist()
                            cv2.rectangle(frame, (x1, y1), (x2, y2), identity[j].tolist(), 2)
                writer.write(frame)
                if progress:
                    progress(i + 1, total)
        except TruncatedVideoError:
            pass  # keep the frames that decoded, as the pose table does
    return out_path
