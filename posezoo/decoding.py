"""Heatmap decoding: pure, vectorised NumPy over the whole batch.

No Python loop runs over frames, crops or keypoints here; every function takes and
returns arrays and holds no state, so it is as easy to test as to reuse.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float32 in, float32 out."""
    x = np.asarray(x, dtype=np.float32)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32, copy=False)


def decode_heatmaps(
    heatmaps: np.ndarray,
    locref: np.ndarray | None = None,
    *,
    input_hw: tuple[int, int] | None = None,
    stride: float | tuple[float, float] | None = None,
    locref_std: float = 7.2801,
    activation: str = "none",
    clip: bool = False,
    exclusive_radius: int = 0,
) -> np.ndarray:
    """Decode heatmaps (and optional location refinement) to keypoints.

    DeepLabCut's rule, per keypoint: take the heatmap argmax ``(iy, ix)``, then
    ``x = ix * stride_x + stride_x / 2 + dx * locref_std`` (same for ``y``), and the
    heatmap value at the argmax as the likelihood. With ``exclusive_radius``, one place is
    one body part first (see :func:`exclusive_peaks`).

    Parameters
    ----------
    heatmaps : ndarray, shape (n_images, n_keypoints, h, w)
        Raw network output (``activation="sigmoid"`` applies the logistic first).
    locref : ndarray, shape (n_images, 2 * n_keypoints, h, w), optional
        Location-refinement maps, channels ordered ``dx0, dy0, dx1, dy1, ...``.
    input_hw : (int, int), optional
        Height and width of the network input; the stride is then the measured ratio
        ``input / heatmap`` per axis, as DeepLabCut computes it.
    stride : float or (float, float), optional
        Used when ``input_hw`` is not given; ``(stride_y, stride_x)`` or one value.
    locref_std : float
        Scale of the location-refinement maps, in input pixels.
    activation : {"none", "sigmoid"}
    clip : bool
        Clip the likelihood to ``[0, 1]`` after the argmax (DeepLabCut's ``clip_scores``).
    exclusive_radius : int
        Heatmap cells (Chebyshev distance): a keypoint whose peak is this near another
        keypoint's peak, where the other's heatmap is higher, takes its best cell away from
        there (0: off, DeepLabCut's rule).

    Returns
    -------
    ndarray, shape (n_images, n_keypoints, 3)
        ``x, y`` in network-input pixels and the likelihood, float32.
    """
    hm = np.asarray(heatmaps)
    if hm.ndim != 4:
        raise InputError(f"heatmaps must have shape (n, k, h, w), got {hm.shape}")
    n, k, h, w = hm.shape
    if input_hw is not None:
        sy, sx = input_hw[0] / h, input_hw[1] / w
    elif stride is not None:
        sy, sx = (stride, stride) if np.isscalar(stride) else stride
    else:
        raise InputError("decode_heatmaps needs input_hw or stride")
    if activation == "sigmoid":
        hm = sigmoid(hm)
    flat = hm.reshape(n, k, h * w)
    idx = flat.argmax(axis=2)  # (n, k)
    if exclusive_radius > 0 and k > 1:
        idx = exclusive_peaks(flat, idx, w, exclusive_radius)
    conf = np.take_along_axis(flat, idx[..., None], axis=2)[..., 0]
    if clip:
        conf = np.clip(conf, 0.0, 1.0)
    iy, ix = np.divmod(idx, w)
    x = ix * np.float32(sx) + np.float32(0.5 * sx)
    y = iy * np.float32(sy) + np.float32(0.5 * sy)
    if locref is not None:
        lr = np.asarray(locref)
        if lr.shape != (n, 2 * k, h, w):
            raise InputError(f"locref must have shape {(n, 2 * k, h, w)}, got {lr.shape}")
        lr = lr.reshape(n, k, 2, h * w)
        d = np.take_along_axis(lr, idx[:, :, None, None], axis=3)[..., 0]  # (n, k, 2)
        x = x + d[..., 0] * np.float32(locref_std)
        y = y + d[..., 1] * np.float32(locref_std)
    return np.stack([x, y, conf], axis=-1).astype(np.float32, copy=False)


def exclusive_peaks(flat: np.ndarray, idx: np.ndarray, width: int, radius: int) -> np.ndarray:
    """Move the peaks that sit on a place another keypoint owns.

    A single animal's snout cannot be where its tail base is: when keypoint ``a``'s argmax is
    within ``radius`` cells of keypoint ``b``'s argmax and ``b``'s heatmap is higher than
    ``a``'s at ``a``'s argmax, ``a`` takes its best cell outside the ``(2 radius + 1)``-cell
    square around its old argmax (once: no chains of moves).

    Parameters
    ----------
    flat : ndarray, shape (n, k, h * w)
        Heatmaps (after any activation).
    idx : ndarray, shape (n, k)
        Their argmax cells.
    width : int
        ``w``, to turn flat cells into rows and columns.
    radius : int

    Returns
    -------
    ndarray, shape (n, k)
        ``idx`` with the moved peaks (a new array).
    """
    n, k, hw = flat.shape
    iy, ix = np.divmod(idx, width)
    near = np.maximum(np.abs(iy[:, :, None] - iy[:, None, :]), np.abs(ix[:, :, None] - ix[:, None, :])) <= radius
    near &= ~np.eye(k, dtype=bool)
    # at[i, a, b]: keypoint b's heatmap at keypoint a's argmax
    at = flat[np.arange(n)[:, None, None], np.arange(k)[None, None, :], idx[:, :, None]]
    own = np.take_along_axis(flat, idx[..., None], axis=2)  # (n, k, 1)
    ni, ki = np.nonzero((near & (at > own)).any(axis=2))
    out = idx.copy()
    if ni.size:
        cy, cx = np.divmod(np.arange(hw), width)
        block = ((np.abs(cy[None] - iy[ni, ki][:, None]) <= radius)
                 & (np.abs(cx[None] - ix[ni, ki][:, None]) <= radius))
        out[ni, ki] = np.where(block, -np.inf, flat[ni, ki]).argmax(axis=1)
    return out


def decode_outputs(out: dict, spec, input_hw: tuple[int, int]) -> np.ndarray:
    """:func:`decode_heatmaps` as a card's ``outputs`` (an ``OutputSpec``) says: its output
    names, activation, score clipping, ``locref_std`` and stride; the nominal stride where the
    card says so (DeepLabCut decodes with it: e.g. its TF ResNets' heatmaps are
    ``ceil(size / 8)``, so the measured ratio is not 8 for other sizes), else the measured
    ratio of ``input_hw`` to the heatmaps.

    Returns
    -------
    ndarray, shape (n_images, n_keypoints, 3)
    """
    where = {"stride": spec.stride} if spec.nominal_stride else {"input_hw": input_hw}
    return decode_heatmaps(out[spec.heatmap], out.get(spec.locref) if spec.locref else None, **where,
                           locref_std=spec.locref_std, activation=spec.heatmap_activation, clip=spec.clip_scores,
                           exclusive_radius=spec.exclusive_radius)


def decode_simcc(
    simcc_x: np.ndarray,
    simcc_y: np.ndarray,
    *,
    split_ratio: float = 2.0,
    apply_softmax: bool = True,
    normalize: bool = False,
    sigma: float | tuple[float, float] = 6.0,
    beta: float = 150.0,
) -> np.ndarray:
    """Decode SimCC coordinate classifications (RTMPose heads) to keypoints.

    DeepLabCut's (and mmpose's) rule, per keypoint: scale the logits by ``sigma * beta``
    (or normalise them by their maximum), optionally softmax each axis, take each axis's
    argmax ``ix``, ``iy`` as ``x = ix / split_ratio``, ``y = iy / split_ratio``, and the
    smaller of the two maxima as the score. A keypoint whose score is not above chance
    (``1 / n_bins`` after the softmax, 0 without it) has no position (NaN).

    Parameters
    ----------
    simcc_x : ndarray, shape (n_images, n_keypoints, n_bins_x)
    simcc_y : ndarray, shape (n_images, n_keypoints, n_bins_y)
    split_ratio : float
        Bins per input pixel (SimCC's ``k``).
    apply_softmax, normalize : bool
        As DeepLabCut's ``SimCCPredictor`` (``normalize_outputs``).
    sigma : float or (float, float)
        ``(sigma_x, sigma_y)`` of the training labels; with ``beta`` the logit scale.
    beta : float

    Returns
    -------
    ndarray, shape (n_images, n_keypoints, 3)
        ``x, y`` in network-input pixels and the score, float32.
    """
    sx, sy = np.asarray(simcc_x, np.float64), np.asarray(simcc_y, np.float64)
    if sx.ndim != 3 or sy.ndim != 3 or sx.shape[:2] != sy.shape[:2]:
        raise InputError(f"SimCC outputs must be (n, k, bins) with the same (n, k), got {sx.shape} and {sy.shape}")
    sig_x, sig_y = (sigma, sigma) if np.isscalar(sigma) else sigma
    if normalize:  # each row over its maximum where that is above 1 (mmpose's get_simcc_normalized)
        def norm(a):
            a = np.clip(a, 0, None)
            peak = a.max(axis=-1, keepdims=True)
            return np.where(peak > 1, a / np.where(peak > 0, peak, 1), a)

        sx, sy = norm(sx), norm(sy)
    else:
        sx, sy = sx * (sig_x * beta), sy * (sig_y * beta)
    if apply_softmax:
        def softmax(a):
            e = np.exp(a - a.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)

        sx, sy = softmax(sx), softmax(sy)
    ix, iy = sx.argmax(axis=-1), sy.argmax(axis=-1)
    score = np.minimum(sx.max(axis=-1), sy.max(axis=-1))
    out = np.stack([ix / split_ratio, iy / split_ratio, score], axis=-1).astype(np.float32)
    chance = 1.0 / sx.shape[-1] if apply_softmax else 0.0
    out[..., :2][score <= chance] = np.nan
    return out


def to_frame_coordinates(keypoints: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Map keypoints from network-input (or crop) pixels back to frame pixels.

    ``x_frame = x * scale_x + offset_x`` (same for ``y``); the likelihood is kept.

    Parameters
    ----------
    keypoints : ndarray, shape (n_images, n_keypoints, 3)
    scale, offset : ndarray, shape (n_images, 2) or (2,)
        Per-image ``(sx, sy)`` and ``(ox, oy)``: a full-frame letterbox has
        ``scale = 1 / resize_factor`` and zero offset; a top-down crop has
        ``scale = box_size / crop_size`` and ``offset = box top-left``.

    Returns
    -------
    ndarray, shape (n_images, n_keypoints, 3)
    """
    kp = np.asarray(keypoints, dtype=np.float32)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float32), (kp.shape[0], 2))
    offset = np.broadcast_to(np.asarray(offset, dtype=np.float32), (kp.shape[0], 2))
    out = kp.copy()
    out[..., :2] = kp[..., :2] * scale[:, None, :] + offset[:, None, :]
    return out


def crop_boxes(boxes: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """Boxes as DeepLabCut crops them: keep the centre, grow to the crop's aspect ratio.

    Parameters
    ----------
    boxes : ndarray, shape (n_boxes, 4)
        ``x1, y1, x2, y2`` in frame pixels.
    crop_hw : (int, int)
        Height and width of the pose network's input crop.

    Returns
    -------
    ndarray, shape (n_boxes, 4)
        ``x1, y1, w, h`` of the region that is resized to ``crop_hw`` (it may extend
        past the frame; the outside is zero-padded).
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    w, h = np.maximum(b[:, 2] - b[:, 0], 1.0), np.maximum(b[:, 3] - b[:, 1], 1.0)
    aspect = crop_hw[1] / crop_hw[0]  # width / height
    w2 = np.where(w / h < aspect, h * aspect, w)
    h2 = np.where(w / h < aspect, h, w / aspect)
    return np.stack([cx - w2 / 2, cy - h2 / 2, w2, h2], axis=1)


def decode_crops(
    heatmaps: np.ndarray,
    locref: np.ndarray | None,
    regions: np.ndarray,
    *,
    crop_hw: tuple[int, int],
    locref_std: float = 7.2801,
    activation: str = "none",
) -> np.ndarray:
    """Decode top-down crops straight to frame pixels.

    Parameters
    ----------
    heatmaps : ndarray, shape (n_crops, n_keypoints, h, w)
    locref : ndarray, shape (n_crops, 2 * n_keypoints, h, w), optional
    regions : ndarray, shape (n_crops, 4)
        ``x1, y1, w, h`` of each crop region in the frame (see :func:`crop_boxes`).
    crop_hw : (int, int)
        Size of the crops fed to the network.

    Returns
    -------
    ndarray, shape (n_crops, n_keypoints, 3)
    """
    kp = decode_heatmaps(heatmaps, locref, input_hw=crop_hw, locref_std=locref_std, activation=activation)
    r = np.asarray(regions, dtype=np.float32).reshape(-1, 4)
    scale = np.stack([r[:, 2] / crop_hw[1], r[:, 3] / crop_hw[0]], axis=1)
    return to_frame_coordinates(kp, scale, r[:, :2])
