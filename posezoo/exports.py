"""A :class:`~posezoo.table.PoseTable` in the formats of other tools: NWB (the ``ndx-pose``
extension, through pynwb) and SLEAP's ``.slp`` (through sleap-io).

Both libraries are optional (``pip install 'posezoo[formats]'``); nothing here is imported
until one of these formats is asked for.
"""

from __future__ import annotations

import importlib.util
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError

#: ndx-pose's convention for image coordinates
REFERENCE_FRAME = "(0,0) is the top-left corner of the video frame; x to the right, y down, in pixels"


def _need(fmt: str, *modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"writing {fmt} needs {', '.join(missing)}: pip install 'posezoo[formats]'")


def _video(table) -> tuple[str, float | None, tuple[int, int] | None]:
    """The video's file name (never its server path), fps and ``(width, height)`` from the metadata."""
    v = table.metadata.get("video") or {}
    name = Path(str(v.get("path") or v.get("name") or "video")).name
    size = (int(v["width"]), int(v["height"])) if v.get("width") and v.get("height") else None
    return name, (float(v["fps"]) if v.get("fps") else None), size


def pose_estimation_key(individual: str, n_individuals: int) -> str:
    """Name of an individual's ``PoseEstimation`` in the NWB file's ``behavior`` module:
    ``PoseEstimation`` (movement's default) for a single animal, else ``PoseEstimation_<name>``."""
    return "PoseEstimation" if n_individuals == 1 else f"PoseEstimation_{individual}"


def to_nwb(table, path: str | Path) -> Path:
    """Write ``table`` as an NWB file: per individual, an ``ndx_pose.PoseEstimation`` of one
    ``PoseEstimationSeries`` per keypoint (``(n_frames, 2)`` positions, confidence, the video's
    frame rate), with the model's skeleton, in the ``behavior`` processing module.

    The file's ``identifier`` is the individual's name for a single animal (movement names
    the individual after it), else a random UUID.
    """
    _need("nwb", "pynwb", "ndx_pose")
    from ndx_pose import PoseEstimation, PoseEstimationSeries, Skeleton, Skeletons
    from pynwb import NWBHDF5IO, NWBFile

    path = Path(path)
    name, fps, size = _video(table)
    fps = fps or 30.0  # NWB needs a rate; the metadata says when it was not known
    single = len(table.individuals) == 1
    nwb = NWBFile(
        session_description=f"poses predicted by posezoo ({table.scorer}) on {name}",
        identifier=table.individuals[0] if single else str(uuid.uuid4()),
        session_start_time=datetime.now(timezone.utc),
    )
    behavior = nwb.create_processing_module(name="behavior", description="pose estimation by posezoo")
    kp_index = {k: i for i, k in enumerate(table.keypoints)}
    edges = np.array([(kp_index[a], kp_index[b]) for a, b in table.skeleton], dtype=np.uint8).reshape(-1, 2)
    from pynwb.image import ImageSeries

    video = ImageSeries(name="video", description="the video the poses were predicted on (by file name)",
                        external_file=[name], format="external", starting_frame=[0], rate=fps,
                        num_samples=table.n_frames,
                        dimension=list(size) if size else None)
    nwb.add_acquisition(video)
    skeletons = []
    model = str(table.metadata.get("model", {}).get("name") or table.scorer)
    for j, individual in enumerate(table.individuals):
        skeleton = Skeleton(name=f"{model}_{individual}", nodes=list(table.keypoints), edges=edges)
        skeletons.append(skeleton)
        series = [
            PoseEstimationSeries(
                name=keypoint, description=f"{keypoint} of {individual}",
                data=table.data[:, j, k, :2].astype(np.float64), unit="pixels", reference_frame=REFERENCE_FRAME,
                confidence=table.data[:, j, k, 2].astype(np.float64),
                confidence_definition="the model's heatmap value at the keypoint (DeepLabCut's likelihood)",
                rate=fps, starting_time=0.0,
            )
            for k, keypoint in enumerate(table.keypoints)
        ]
        behavior.add(PoseEstimation(
            name=pose_estimation_key(individual, len(table.individuals)), pose_estimation_series=series,
            description=f"{individual}: {table.scorer}", source_video=video, scorer=table.scorer,
            source_software="posezoo", source_software_version=__version__, skeleton=skeleton,
        ))
    behavior.add(Skeletons(skeletons=skeletons))
    with NWBHDF5IO(str(path), mode="w") as io:
        io.write(nwb)
    return path


def to_slp(table, path: str | Path) -> Path:
    """Write ``table`` as a SLEAP labels file: one labelled frame per video frame (every
    frame, even those where nothing was found), one predicted instance per individual, a
    track per individual, the model's skeleton. The video is referenced by file name."""
    _need("slp", "sleap_io")
    import sleap_io as sio

    path = Path(path)
    name, _, size = _video(table)
    skeleton = sio.Skeleton(nodes=list(table.keypoints), edges=[list(e) for e in table.skeleton],
                            name=str(table.metadata.get("model", {}).get("name") or table.scorer))
    video = sio.Video(filename=name, open_backend=False)
    tracks = [sio.Track(name=ind) for ind in table.individuals]
    frames = []
    for i in range(table.n_frames):
        instances = []
        for j, track in enumerate(tracks):
            pts = table.data[i, j]
            scores = np.nan_to_num(pts[:, 2], nan=0.0)
            instances.append(sio.PredictedInstance.from_numpy(
                pts[:, :2].astype(np.float64), skeleton=skeleton, point_scores=scores,
                score=float(np.nanmean(pts[:, 2])) if np.isfinite(pts[:, 2]).any() else 0.0, track=track))
        frames.append(sio.LabeledFrame(video=video, frame_idx=i, instances=instances))
    labels = sio.Labels(labeled_frames=frames, videos=[video], skeletons=[skeleton], tracks=tracks)
    sio.save_slp(labels, str(path), verbose=False)
    return path
