"""Shared fixtures: real videos, real ONNX models, a real S3 server, a pre-populated
Hugging Face cache. Nothing here reaches the network."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Tests never go online: huggingface_hub reads this when it is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "openfield"
OPENFIELD_VIDEO = SHARED / "videos" / "m3v1mp4.mp4"
OPENFIELD_FRAMES = 2330
TINY = "posezoo_tiny_mouse"


@pytest.fixture(scope="session")
def openfield_video() -> Path:
    if not OPENFIELD_VIDEO.exists():
        pytest.fail(f"the real openfield data is missing: {OPENFIELD_VIDEO} (see DEVELOPERS.md)")
    return OPENFIELD_VIDEO


@pytest.fixture(scope="session")
def mouse_video(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 60-frame synthetic 320x240 H.264 mouse video and its ground truth (60, 1, 4, 3)."""
    from posezoo.synthetic import make_mouse_video

    path = tmp_path_factory.mktemp("videos") / "mouse.mp4"
    truth = make_mouse_video(path, 60, 320, 240, 30.0, seed=3)
    return path, truth


@pytest.fixture(scope="session")
def tiny_predictor():
    import posezoo

    return posezoo.load(TINY, device="cpu", threads=2)


@pytest.fixture()
def tiny_card_dir(tmp_path) -> Path:
    """A private copy of the tiny model's catalog entry (card + ONNX)."""
    src = REPO / "models" / TINY / "0.1.0"
    dst = tmp_path / "catalog" / TINY / "0.1.0"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    from s3server import start_s3

    server = start_s3(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


def make_hf_cache(cache_dir: Path, repo_id: str, commit: str, files: dict[str, Path]) -> Path:
    """Lay out a Hugging Face hub cache exactly as huggingface_hub writes it:
    ``models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main}``."""
    from posezoo.zoo import sha256_file

    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        blob = repo_dir / "blobs" / sha256_file(src)
        shutil.copyfile(src, blob)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs" / "main").write_text(commit)
    return cache_dir


def noise_video(path: Path, n_frames: int, width: int = 320, height: int = 240) -> Path:
    """An H.264 video of random noise: something no pose model of the zoo fits."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for _ in range(n_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


# -- real labelled mice, for the top-down conversion tests ------------------------------------------
def labelled_mice(n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``n`` labelled openfield frames (RGB ``(n, 480, 640, 3)``), spread over the labelled set,
    and a box ``(1, 4)`` x1, y1, x2, y2 around each mouse's labelled keypoints, 25 px wider."""
    import cv2
    import pandas as pd

    df = pd.read_hdf(next((SHARED / "labeled-data" / "m4s1").glob("CollectedData_*.h5")))
    rows = df.index[:: max(1, len(df) // n)][:n]
    frames, boxes = [], []
    for row in rows:
        img = cv2.cvtColor(cv2.imread(str(SHARED / row)), cv2.COLOR_BGR2RGB)
        xy = df.loc[row].to_numpy(dtype=float).reshape(-1, 2)
        xy = xy[np.isfinite(xy).all(axis=1)]
        lo, hi = xy.min(axis=0) - 25, xy.max(axis=0) + 25
        frames.append(img)
        boxes.append(np.array([[*lo, *hi]], np.float32))
    return np.stack(frames), boxes


def dlc_crops(frames: np.ndarray, boxes: list[np.ndarray]) -> np.ndarray:
    """DeepLabCut's own 256x256 crops (``top_down_crop``) of each frame's first box, uint8 RGB."""
    from deeplabcut.pose_estimation_pytorch.data.image import top_down_crop

    out = []
    for f, b in zip(frames, boxes):
        x1, y1, x2, y2 = b[0]
        out.append(top_down_crop(f, np.array([x1, y1, x2 - x1, y2 - y1], np.float32), (256, 256))[0])
    return np.stack(out)
