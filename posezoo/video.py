"""Video in: probe a file and stream its frames in batches through a bounded queue.

Frames are decoded by PyAV (FFmpeg) on a background thread, resized and converted to
the network's colour order (OpenCV for planar YUV, FFmpeg's scaler otherwise), and
handed over in batches of at most ``batch_size`` frames through a queue of
``queue_batches`` slots. So decoding overlaps inference and at most ``(queue_batches + 2) * batch_size`` frames are in
memory, whatever the length of the video.

For a GPU, which consumes thousands of frames a second, the decoder runs FFmpeg's frame
threads (``thread_type = "AUTO"``, several frames in flight inside the decoder) and
:func:`iter_batches` can convert frames (resize + colour) on ``convert_threads`` threads
while the next ones decode; two more batches are then in flight
(``(queue_batches + 4) * batch_size`` frames at most).
"""

from __future__ import annotations

import collections
import functools
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .errors import InputError, TruncatedVideoError, VideoError

#: FFmpeg's area-averaging scaler: the right filter for the 2x-and-more downscales the
#: small models use (training resizes its images with the same kind of filter).
RESIZE_INTERPOLATION = "AREA"

#: Frames above this many pixels (a little over 1080p) are decoded with slice threads
#: only and encoded with x264's low-latency settings: frame threads, look-ahead and
#: B-frames each keep whole frames in flight, about 1.3 GB of encoder state for 4096x4096
#: with the usual settings against 0.3 GB without them.
LARGE_FRAME_PIXELS = 2_200_000


@dataclass(frozen=True)
class VideoInfo:
    """What a video file says about itself (before any frame is decoded)."""

    path: str
    width: int
    height: int
    fps: float
    n_frames: int
    codec: str
    container: str

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``."""
        return self.width, self.height


@dataclass(frozen=True)
class FrameBatch:
    """Consecutive frames ``start .. start + len(frames) - 1``.

    ``frames`` has shape ``(n, height, width, 3)``, uint8, in the requested colour
    order and size.
    """

    start: int
    frames: np.ndarray


#: what a folder of videos is searched for (DeepLabCut's SUPPORTED_VIDEOS, and a few more)
VIDEO_EXTENSIONS = ("avi", "mp4", "mov", "mpeg", "mpg", "mpv", "mkv", "flv", "qt", "yuv", "m4v", "webm")
#: never taken from a folder or glob: labelled videos posezoo and DeepLabCut write there
_NOT_INPUTS = ("*_labeled.*", "*_full.*")


def collect_videos(inputs: list[str | os.PathLike], extensions: tuple[str, ...] | list[str] = VIDEO_EXTENSIONS) -> list[Path]:
    """The video files named by ``inputs``, as DeepLabCut's ``video_extensions`` collects them.

    Each input is a file (taken whatever its extension), a folder (its files with one of
    ``extensions``, not recursive) or a glob pattern (``cage1/*.mp4``). Labelled videos
    (``*_labeled.*``) found in a folder or by a glob are left out. Duplicates are removed;
    order is kept (folders and globs sorted by name).

    Raises
    ------
    InputError
        An input that names no file, or a folder/glob without a matching video.
    """
    import fnmatch
    import glob

    exts = {("." + e.lower().lstrip(".")) for e in extensions}
    found: list[Path] = []

    def keep(p: Path) -> bool:
        return p.is_file() and p.suffix.lower() in exts and not any(fnmatch.fnmatch(p.name, x) for x in _NOT_INPUTS)

    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append(path)
            continue
        if path.is_dir():
            hits = sorted(p for p in path.iterdir() if keep(p))
            where = f"folder {path}"
        elif any(c in str(item) for c in "*?["):
            hits = sorted(p for p in map(Path, glob.glob(str(item))) if keep(p))
            where = f"pattern {item!r}"
        else:
            raise InputError(f"{item}: no such file or folder")
        if not hits:
            raise InputError(f"no video in {where} (extensions: {', '.join(sorted(e.lstrip('.') for e in exts))}; "
                             f"--video-extensions sets them)")
        found += hits
    return list(dict.fromkeys(found))


def _open(path: str | os.PathLike, *, header_only: bool = False
          ) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open the first video stream. ``header_only``: FFmpeg's stream probing decodes no
    frame (it otherwise decodes the first one, which for a crafted 8192x8192 file is
    150 MB before its size is even known)."""
    p = Path(path)
    if not p.exists():
        raise VideoError(f"{p}: no such file")
    if p.is_dir():
        raise VideoError(f"{p}: is a directory, not a video file")
    if p.stat().st_size == 0:
        raise VideoError(f"{p}: file is empty (0 bytes)")
    try:
        container = av.open(str(p), mode="r", options={"skip_frame": "all"} if header_only else None)
    except (av.FFmpegError, OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise VideoError(f"{p}: not a readable video ({reason}); is the file complete and a video?") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"{p}: contains no video stream")
    stream = container.streams.video[0]
    if not stream.codec_context or not stream.width or not stream.height:
        container.close()
        raise VideoError(f"{p}: video stream has no decodable frames (unknown codec or size)")
    return container, stream


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _stream_frames(container, stream, fps: float) -> int:
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base:  # estimate from duration
        return int(round(float(stream.duration * stream.time_base) * fps))
    if container.duration:
        return int(round(container.duration / av.time_base * fps))
    return 0


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a video's header, without decoding a frame.

    Raises
    ------
    VideoError
        The file is missing, empty, not a video, or has no video stream.
    """
    container, stream = _open(path, header_only=True)
    try:
        fps = _stream_fps(stream)
        return VideoInfo(
            path=str(path),
            width=int(stream.width),
            height=int(stream.height),
            fps=fps,
            n_frames=_stream_frames(container, stream, fps),
            codec=stream.codec_context.name,
            container=container.format.name,
        )
    finally:
        container.close()


def _fraction_fps(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001 * 1000)


class _Stop(Exception):
    pass


# Planar 8-bit YUV formats converted by OpenCV instead of FFmpeg's scaler: resizing
# the planes first and converting colour at the (smaller) network size is several
# times cheaper, which matters because decoding shares the cores with inference.
_PLANAR_YUV = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p"})
_KR_KB = {1: (0.2126, 0.0722)}  # BT.709; everything else as FFmpeg's default, BT.601
_BT601 = (0.299, 0.114)


@functools.lru_cache(maxsize=16)
def yuv_to_rgb_matrix(colorspace: int, full_range: bool, colour_order: str = "RGB") -> np.ndarray:
    """The 3x4 affine matrix taking ``(Y, Cb, Cr, 1)`` to ``(R, G, B)`` (or BGR).

    ``colorspace`` is FFmpeg's code (1: BT.709; anything else: BT.601, FFmpeg's
    default); limited ("MPEG", 16-235) range unless ``full_range``.
    """
    kr, kb = _KR_KB.get(int(colorspace), _BT601)
    kg = 1.0 - kr - kb
    ys, cs = (1.0, 1.0) if full_range else (255.0 / 219.0, 255.0 / 224.0)
    yo = 0.0 if full_range else 16.0
    m = np.array([
        [1.0, 0.0, 2 * (1 - kr)],
        [1.0, -2 * (1 - kb) * kb / kg, -2 * (1 - kr) * kr / kg],
        [1.0, 2 * (1 - kb), 0.0],
    ])
    m = m * np.array([ys, cs, cs])
    offset = -(m @ np.array([yo, 128.0, 128.0]))
    out = np.concatenate([m, offset[:, None]], axis=1)
    out = out[::-1].copy() if colour_order.upper() == "BGR" else out
    out.setflags(write=False)  # shared by the cache
    return out


def frame_to_array(frame, size: tuple[int, int] | None, colour_order: str = "RGB") -> np.ndarray:
    """A decoded PyAV frame as ``(height, width, 3)`` uint8 RGB/BGR, resized to ``size``
    (``(width, height)``) with area averaging."""
    import cv2

    w, h = frame.width, frame.height
    tw, th = size if size is not None else (w, h)
    if frame.format.name not in _PLANAR_YUV:  # anything else: FFmpeg's scaler does it all
        kwargs = {"format": "rgb24" if colour_order.upper() == "RGB" else "bgr24"}
        if (tw, th) != (w, h):
            kwargs.update(width=tw, height=th, interpolation=RESIZE_INTERPOLATION)
        return frame.to_ndarray(**kwargs)
    planes = []
    for plane in frame.planes:
        arr = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
        if arr.shape != (th, tw):
            shrink = arr.shape[0] > th or arr.shape[1] > tw
            arr = cv2.resize(arr, (tw, th), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        planes.append(arr)
    full = frame.format.name.startswith("yuvj") or frame.color_range == 2
    m = yuv_to_rgb_matrix(frame.colorspace, full, colour_order)
    return cv2.transform(cv2.merge(planes), m)


def iter_frames(
    path: str | os.PathLike,
    *,
    size: tuple[int, int] | None = None,
    colour_order: str = "RGB",
    max_frames: int | None = None,
    decode_threads: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield frames one by one, shape ``(height, width, 3)`` uint8, in the same thread.

    ``size`` is ``(width, height)`` to resize to (see :func:`frame_to_array`);
    ``max_frames`` stops early; ``decode_threads`` FFmpeg decoder threads (default: FFmpeg's
    choice, one per core). At the end, if fewer frames decoded than the header
    announced, or the decoder hit damaged data, :class:`TruncatedVideoError` is raised
    after the good frames were yielded.
    """
    size = (int(size[0]), int(size[1])) if size is not None else None
    for frame in decoded_frames(path, max_frames=max_frames, decode_threads=decode_threads):
        yield frame_to_array(frame, size, colour_order)


def decoded_frames(path: str | os.PathLike, *, max_frames: int | None = None,
                   decode_threads: int | None = None) -> Iterator:
    """The decoded PyAV frames of :func:`iter_frames`, before conversion (same checks and errors).

    FFmpeg decodes with frame threads (``thread_type = "AUTO"``: several frames in flight,
    the throughput a GPU needs), slice threads only for frames over
    :data:`LARGE_FRAME_PIXELS`.
    """
    container, stream = _open(path)
    header_pixels = int(stream.width) * int(stream.height)
    # Frame threads each hold their own frames: for large frames, slice threads only.
    stream.thread_type = "AUTO" if header_pixels <= LARGE_FRAME_PIXELS else "SLICE"
    if decode_threads is not None:
        stream.thread_count = max(0, int(decode_threads))
    expected = _stream_frames(container, stream, _stream_fps(stream))
    n = 0
    try:
        try:
            for frame in container.decode(stream):
                if max_frames is not None and n >= max_frames:
                    return
                if frame.width * frame.height > header_pixels:  # limits are checked against the header
                    raise VideoError(f"{path}: frame {n} is {frame.width}x{frame.height}, larger than the "
                                     f"{stream.width}x{stream.height} its header announces")
                yield frame
                n += 1
        except (av.FFmpegError, EOFError) as exc:
            raise TruncatedVideoError(
                f"{path}: damaged or truncated video: decoding stopped after frame {n} "
                f"of {expected or '?'} ({exc})",
                frames_read=n,
            ) from exc
        if n == 0:
            raise VideoError(f"{path}: no frame could be decoded (empty or corrupt video stream)")
        # Containers announce their frame count; fewer decoded frames means the file
        # was cut short (a few percent of slack: some muxers count imprecisely).
        if expected and n < expected and expected - n > max(2, 0.01 * expected):
            raise TruncatedVideoError(
                f"{path}: truncated video: only {n} of {expected} frames decode; "
                f"decoding stopped at frame {n}",
                frames_read=n,
            )
    finally:
        container.close()


def default_convert_threads(cpu_count: int | None = None) -> int:
    """Frame-conversion threads :func:`iter_batches` uses by default: one below 8 cores (the
    cores are ONNX Runtime's), else a quarter of them, at most 4 (enough to feed a GPU)."""
    n = int(cpu_count or os.cpu_count() or 1)
    return 1 if n < 8 else min(4, n // 4)


def iter_batches(
    path: str | os.PathLike,
    batch_size: int,
    *,
    size: tuple[int, int] | None = None,
    colour_order: str = "RGB",
    queue_batches: int = 3,
    max_frames: int | None = None,
    convert_threads: int | None = None,
    decode_threads: int | None = None,
) -> Iterator[FrameBatch]:
    """Stream a video as :class:`FrameBatch` es decoded on a background thread.

    Parameters
    ----------
    path : path-like
    batch_size : int
        Frames per batch (the last batch may be shorter).
    size : (int, int), optional
        ``(width, height)`` to resize every frame to while decoding.
    colour_order : {"RGB", "BGR"}
    queue_batches : int
        Batches in flight: the bound of the hand-over queue; with the batch being filled
        and the one being consumed, at most ``queue_batches + 2`` batches exist at once.
    max_frames : int, optional
        Stop after this many frames.
    convert_threads : int, optional
        Threads converting decoded frames (resize, colour) while the next ones decode
        (default :func:`default_convert_threads`; 1: in the decoding thread). With more
        than one, two more batches are in flight.
    decode_threads : int, optional
        FFmpeg decoder threads (default: FFmpeg's choice).

    Raises
    ------
    VideoError, TruncatedVideoError
        As :func:`iter_frames`; a truncation is raised after the frames that did decode.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    probe(path)  # fail fast, in the caller's thread, on unreadable files
    q: queue.Queue = queue.Queue(maxsize=max(1, queue_batches))
    stop = threading.Event()
    done = object()

    def put(item) -> None:
        while True:
            if stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    convert_threads = default_convert_threads() if convert_threads is None else max(1, int(convert_threads))

    def pooled_worker() -> None:
        """Decode here, convert on ``convert_threads`` threads, keep frame order."""
        wh = (int(size[0]), int(size[1])) if size is not None else None
        pending: collections.deque = collections.deque()  # (start, [futures]) of full batches
        futures: list = []
        start = 0

        def hand_over(keep: int) -> None:
            while len(pending) > keep:
                first, items = pending.popleft()
                put(FrameBatch(first, np.stack([f.result() for f in items])))

        with ThreadPoolExecutor(convert_threads, thread_name_prefix="posezoo-video-convert") as pool:
            try:
                for frame in decoded_frames(path, max_frames=max_frames, decode_threads=decode_threads):
                    futures.append(pool.submit(frame_to_array, frame, wh, colour_order))
                    if len(futures) == batch_size:
                        pending.append((start, futures))
                        start += len(futures)
                        futures = []
                        hand_over(keep=1)  # the newest batch converts while the next one decodes
                if futures:
                    pending.append((start, futures))
                hand_over(keep=0)
                put(done)
            except _Stop:
                for f in futures + [f for _, items in pending for f in items]:
                    f.cancel()
                return
            except BaseException as exc:  # handed to the consumer, raised there
                try:
                    if futures:
                        pending.append((start, futures))
                    hand_over(keep=0)
                    put(exc)
                except _Stop:
                    return
                except BaseException as again:  # a conversion failed too: that error goes first
                    try:
                        put(again)
                    except _Stop:
                        return

    def worker() -> None:
        buf: list[np.ndarray] = []
        start = 0
        try:
            for frame in iter_frames(path, size=size, colour_order=colour_order, max_frames=max_frames,
                                     decode_threads=decode_threads):
                buf.append(frame)
                if len(buf) == batch_size:
                    put(FrameBatch(start, np.stack(buf)))
                    start += len(buf)
                    buf = []
            if buf:
                put(FrameBatch(start, np.stack(buf)))
            put(done)
        except _Stop:
            return
        except BaseException as exc:  # handed to the consumer, raised there
            try:
                if buf:
                    put(FrameBatch(start, np.stack(buf)))
                put(exc)
            except _Stop:
                return

    thread = threading.Thread(target=pooled_worker if convert_threads > 1 else worker,
                              name="posezoo-video-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class VideoWriter:
    """Encode RGB frames to a video file with PyAV; written to a temporary name and
    moved into place on success, so a failed write leaves nothing behind.

    ``codec="libx264"`` gives browser-playable H.264 (yuv420p, faststart for MP4);
    frames of odd size are padded to even by one black row/column.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float, *,
                 codec: str = "libx264", crf: int = 23, preset: str = "veryfast"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.width, self.height = int(width), int(height)
        self.even_w, self.even_h = self.width + self.width % 2, self.height + self.height % 2
        self._tmp = self.path.with_name(f".{self.path.stem}.part{self.path.suffix}")
        options = {"movflags": "+faststart"} if self.path.suffix.lower() in (".mp4", ".mov", ".m4v") else {}
        self._container = av.open(str(self._tmp), mode="w", options=options)
        rate = _fraction_fps(fps) if fps > 0 else Fraction(30)
        self._stream = self._container.add_stream(codec, rate=rate)
        self._stream.width, self._stream.height, self._stream.pix_fmt = self.even_w, self.even_h, "yuv420p"
        if codec == "libx264":
            options = {"crf": str(crf), "preset": preset}
            if self.even_w * self.even_h > LARGE_FRAME_PIXELS:  # bounded encoder memory (see LARGE_FRAME_PIXELS)
                options.update(preset="ultrafast", tune="zerolatency")
            self._stream.options = options
        self._canvas = np.zeros((self.even_h, self.even_w, 3), np.uint8)
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        """Append one ``(height, width, 3)`` uint8 RGB frame."""
        if frame.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame of shape {frame.shape} does not fit a {self.width}x{self.height} video")
        self._canvas[: self.height, : self.width] = frame
        vf = av.VideoFrame.from_ndarray(self._canvas, format="rgb24").reformat(format="yuv420p")
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> Path:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._container.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
