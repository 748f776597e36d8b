"""Training samples: the runtime resize, label-consistent augmentation and targets.

Pure NumPy/OpenCV (no PyTorch), every random draw from an explicit
``numpy.random.Generator``.

Coordinates. Labels are DeepLabCut pixel coordinates of the full frame. posezoo's
runtime resizes a frame by ``1/s`` (``s = frame / network input``, FFmpeg area
scaling) and maps a decoded point back as ``x_frame = s * x_net`` with
``x_net = ix * stride + stride / 2 + dx * locref_std``. Training therefore aims at
``x_net = x_label / s`` in that decoder convention; OpenCV's warps put pixel centres on
integers, i.e. ``x_cv = x_net - 0.5``, which is the form used while augmenting.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..predictor import flip_permutation  # noqa: F401  (one definition: the runtime's test-time flip uses it too)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths (all applied with the given probabilities).

    ``p_geometric``: probability of any geometric change (else the exact runtime
    pixels); ``rotation``: maximum degrees either way (``p_rotation`` of the geometric
    samples); ``scale``: ``(min, max)`` zoom; ``shift``: maximum translation as a
    fraction of the image size; ``p_flip``: left/right mirror (swapping the flip pairs);
    ``brightness``: maximum added grey level; ``contrast``: ``(min, max)`` gain;
    ``p_blur``/``blur_sigma``: Gaussian blur; ``p_noise``/``noise_sigma``: pixel noise.
    """

    p_geometric: float = 0.8
    rotation: float = 180.0
    p_rotation: float = 0.5
    scale: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.25
    p_flip: float = 0.5
    brightness: float = 30.0
    contrast: tuple[float, float] = (0.7, 1.3)
    p_blur: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    p_noise: float = 0.3
    noise_sigma: float = 4.0


def resize_frames(images: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Area-resize ``(n, h, w, 3)`` frames to ``size_wh`` as the runtime does.

    Returns
    -------
    ndarray, shape (n, size_wh[1], size_wh[0], 3), uint8
    """
    if images.shape[2] == size_wh[0] and images.shape[1] == size_wh[1]:
        return images.copy()
    return np.stack([cv2.resize(im, size_wh, interpolation=cv2.INTER_AREA) for im in images])


def labels_to_network(coords: np.ndarray, scale_xy: tuple[float, float]) -> np.ndarray:
    """Frame labels ``(..., 2)`` to network-input coordinates (decoder convention)."""
    return np.asarray(coords, dtype=np.float64) / np.asarray(scale_xy, dtype=np.float64)


def random_affine(rng: np.random.Generator, points: np.ndarray, size_wh: tuple[int, int],
                  cfg: AugmentConfig) -> tuple[np.ndarray, bool]:
    """Draw a 2x3 affine matrix (OpenCV convention) and whether it mirrors.

    Rotation and zoom are about the centre of the labelled points; the shift keeps
    that centre inside the middle of the image.

    Parameters
    ----------
    points : ndarray, shape (n_keypoints, 2)
        OpenCV-convention coordinates, NaN where unlabelled.
    """
    w, h = size_wh
    vis = np.isfinite(points).all(axis=1)
    centre = points[vis].mean(axis=0) if vis.any() else np.array([w / 2 - 0.5, h / 2 - 0.5])
    if rng.random() >= cfg.p_geometric:
        return np.array([[1.0, 0, 0], [0, 1.0, 0]]), False
    angle = rng.uniform(-cfg.rotation, cfg.rotation) if rng.random() < cfg.p_rotation else 0.0
    zoom = float(np.exp(rng.uniform(np.log(cfg.scale[0]), np.log(cfg.scale[1]))))
    flip = bool(rng.random() < cfg.p_flip)
    target = centre + rng.uniform(-cfg.shift, cfg.shift, 2) * np.array([w, h])
    target = np.clip(target, [0.15 * w, 0.15 * h], [0.85 * w, 0.85 * h])
    a = np.deg2rad(angle)
    lin = zoom * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    if flip:
        lin = lin @ np.diag([-1.0, 1.0])
    m = np.zeros((2, 3))
    m[:, :2] = lin
    m[:, 2] = target - lin @ centre
    return m, flip


def photometric(rng: np.random.Generator, image: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """Brightness/contrast, blur and noise on one ``(h, w, 3)`` uint8 image."""
    img = image.astype(np.float32)
    gain = rng.uniform(*cfg.contrast)
    img = (img - 127.0) * gain + 127.0 + rng.uniform(-cfg.brightness, cfg.brightness)
    if rng.random() < cfg.p_blur:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(*cfg.blur_sigma))
    if rng.random() < cfg.p_noise:
        img = img + rng.normal(0.0, cfg.noise_sigma, img.shape[:2])[..., None].astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def augment(rng: np.random.Generator, image: np.ndarray, points: np.ndarray, flip_perm: np.ndarray,
            cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """Augment one network-size image and its points consistently.

    Parameters
    ----------
    image : ndarray, shape (h, w, 3), uint8
        Already at network-input size (the runtime resize applied).
    points : ndarray, shape (n_keypoints, 2)
        Decoder-convention coordinates; NaN where unlabelled.
    flip_perm : ndarray, shape (n_keypoints,)
        From :func:`flip_permutation`.

    Returns
    -------
    image : ndarray, shape (h, w, 3), uint8
    points : ndarray, shape (n_keypoints, 2)
        Points that leave the image become NaN.
    """
    h, w = image.shape[:2]
    cv_pts = points - 0.5
    m, flipped = random_affine(rng, cv_pts, (w, h), cfg)
    if not np.allclose(m, [[1, 0, 0], [0, 1, 0]]):
        image = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        cv_pts = cv_pts @ m[:, :2].T + m[:, 2]
        if flipped:
            cv_pts = cv_pts[flip_perm]
    out = cv_pts + 0.5
    outside = (out[:, 0] < 0) | (out[:, 0] >= w) | (out[:, 1] < 0) | (out[:, 1] >= h)
    out[outside] = np.nan
    return photometric(rng, image, cfg), out


def make_targets(points: np.ndarray, grid_hw: tuple[int, int], stride: float, sigma: float,
                 locref_radius: float, locref_std: float) -> dict[str, np.ndarray]:
    """Heatmap and location-refinement targets of one image.

    Parameters
    ----------
    points : ndarray, shape (n_keypoints, 2)
        Decoder-convention network-input coordinates, NaN where unlabelled.
    grid_hw : (int, int)
        Output map size.
    stride : float
        Input pixels per output cell; cell ``(iy, ix)`` is centred at
        ``(ix * stride + stride / 2, iy * stride + stride / 2)``.
    sigma : float
        Gaussian standard deviation, input pixels.
    locref_radius : float
        Cells whose centre lies within this many input pixels of a point learn its
        offset.
    locref_std : float
        Offsets are stored divided by this (the card's ``outputs.locref_std``).

    Returns
    -------
    dict
        ``heatmap`` ``(K, h, w)`` in [0, 1]; ``heatmap_weight`` ``(K, 1, 1)`` (0 for an
        unlabelled point); ``locref`` ``(2K, h, w)`` ordered ``dx0, dy0, ...``;
        ``locref_weight`` ``(2K, h, w)``.
    """
    gh, gw = grid_hw
    k = points.shape[0]
    cx = np.arange(gw) * stride + stride / 2
    cy = np.arange(gh) * stride + stride / 2
    heat = np.zeros((k, gh, gw), np.float32)
    hw = np.zeros((k, 1, 1), np.float32)
    loc = np.zeros((k, 2, gh, gw), np.float32)
    lw = np.zeros((k, 2, gh, gw), np.float32)
    for j in range(k):
        x, y = points[j]
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        dx = (x - cx)[None, :]
        dy = (y - cy)[:, None]
        d2 = dx**2 + dy**2
        heat[j] = np.exp(-d2 / (2 * sigma**2))
        hw[j] = 1.0
        near = (d2 <= locref_radius**2).astype(np.float32)
        loc[j, 0] = dx / locref_std
        loc[j, 1] = dy / locref_std
        lw[j, 0] = near
        lw[j, 1] = near
    return {"heatmap": heat, "heatmap_weight": hw, "locref": loc.reshape(2 * k, gh, gw) * lw.reshape(2 * k, gh, gw),
            "locref_weight": lw.reshape(2 * k, gh, gw)}


def normalise(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(n, h, w, 3)`` uint8 -> ``(n, 3, h, w)`` float32 ``(x - mean) / std``."""
    return ((images.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2).copy()


class SampleSource:
    """Draws augmented training batches from frames held in memory.

    Parameters
    ----------
    images : ndarray, shape (n, h, w, 3), uint8
        Frames at network-input size.
    points : ndarray, shape (n, n_keypoints, 2)
        Decoder-convention coordinates (NaN: unlabelled).
    flip_perm : ndarray, shape (n_keypoints,)
    stride, sigma, locref_radius, locref_std : float
        See :func:`make_targets`.
    augment_cfg : AugmentConfig or None
        ``None``: no augmentation.
    seed : int
    repeats : ndarray, shape (n,), optional
        How many times each frame is drawn per pass (default: once each); human labels
        weigh more than pseudo-labels this way.
    """

    def __init__(self, images: np.ndarray, points: np.ndarray, flip_perm: np.ndarray, *, stride: float,
                 sigma: float, locref_radius: float, locref_std: float, mean: float, std: float,
                 augment_cfg: AugmentConfig | None, seed: int, repeats: np.ndarray | None = None):
        self.images, self.points, self.flip_perm = images, points, flip_perm
        self.pool = np.repeat(np.arange(len(images)), 1 if repeats is None else np.asarray(repeats, dtype=int))
        self.stride, self.sigma, self.locref_radius, self.locref_std = stride, sigma, locref_radius, locref_std
        self.mean, self.std = mean, std
        self.cfg = augment_cfg
        self.rng = np.random.default_rng(seed)
        self.grid_hw = (int(np.ceil(images.shape[1] / stride)), int(np.ceil(images.shape[2] / stride)))
        self._order: list[int] = []

    def _next_index(self) -> int:
        if not self._order:
            self._order = list(self.rng.permutation(self.pool))
        return int(self._order.pop())

    def batch(self, size: int) -> dict[str, np.ndarray]:
        """One batch: ``image`` ``(B, 3, H, W)`` float32 plus stacked targets."""
        imgs, targets = [], []
        for _ in range(size):
            i = self._next_index()
            img, pts = self.images[i], self.points[i]
            if self.cfg is not None:
                img, pts = augment(self.rng, img, pts, self.flip_perm, self.cfg)
            imgs.append(img)
            targets.append(make_targets(pts, self.grid_hw, self.stride, self.sigma, self.locref_radius,
                                        self.locref_std))
        out = {key: np.stack([t[key] for t in targets]) for key in targets[0]}
        out["image"] = normalise(np.stack(imgs), self.mean, self.std)
        return out
