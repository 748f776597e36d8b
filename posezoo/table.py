"""PoseTable: keypoints for every frame, and the DeepLabCut-compatible writers.

The array layout follows the ``movement`` package: ``(n_frames, n_individuals,
n_keypoints, 3)`` with ``x, y, likelihood`` in frame pixels. Missing points are NaN.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .safe_hdf import read_hdf_safely

FORMATS = ("h5", "csv", "json", "parquet", "nwb", "slp")
DLC_H5_KEY = "df_with_missing"
DLC_COLUMN_LEVELS = ["scorer", "individuals", "bodyparts", "coords"]
DLC_SINGLE_COLUMN_LEVELS = ["scorer", "bodyparts", "coords"]
COORDS = ["x", "y", "likelihood"]


@dataclass(frozen=True, eq=False)
class PoseTable:
    """Poses of every frame of one video.

    Attributes
    ----------
    data : ndarray, shape (n_frames, n_individuals, n_keypoints, 3), float32
        ``x, y`` in frame pixels and the likelihood; NaN where nothing was found.
    keypoints : tuple of str, length n_keypoints
    individuals : tuple of str, length n_individuals
    scorer : str
        DeepLabCut's "scorer" column level (here: the model, ``name@version``).
    metadata : dict
        JSON-serialisable facts: model name/version/sha256, video fps/size/frame
        count, execution providers, timings, filtering, outlier frames.
    boxes : ndarray, shape (n_frames, n_individuals, 5), float32, optional
        Top-down models: each animal's box ``x1, y1, x2, y2`` in frame pixels and the
        detector's score (NaN where the box was carried from the previous pose, or
        there was no animal). Written to the JSON output; DeepLabCut's tables have no place
        for it.
    skeleton : tuple of (str, str)
        The model's edges (written to the JSON, NWB and SLEAP outputs).
    multi_animal : bool, optional
        Whether the model finds several animals (top-down models). DeepLabCut's tables of a
        single-animal model have 3 column levels (``scorer/bodyparts/coords``), those of a
        multi-animal one 4 (with ``individuals``). Default: more than one individual.
    """

    data: np.ndarray
    keypoints: tuple[str, ...]
    individuals: tuple[str, ...] = ("animal0",)
    scorer: str = "posezoo"
    metadata: dict = field(default_factory=dict)
    boxes: np.ndarray | None = None
    skeleton: tuple[tuple[str, str], ...] = ()
    multi_animal: bool | None = None

    def __post_init__(self) -> None:
        d = np.asarray(self.data, dtype=np.float32)
        if d.ndim != 4 or d.shape[3] != 3:
            raise InputError(f"pose data must have shape (frames, individuals, keypoints, 3), got {d.shape}")
        if d.shape[1] != len(self.individuals) or d.shape[2] != len(self.keypoints):
            raise InputError(
                f"pose data {d.shape} does not match {len(self.individuals)} individuals "
                f"x {len(self.keypoints)} keypoints"
            )
        object.__setattr__(self, "data", d)
        if self.boxes is not None:
            b = np.asarray(self.boxes, dtype=np.float32)
            if b.shape != (d.shape[0], d.shape[1], 5):
                raise InputError(f"boxes must have shape (frames, individuals, 5) = {(d.shape[0], d.shape[1], 5)}, "
                                 f"got {b.shape}")
            object.__setattr__(self, "boxes", b)
        object.__setattr__(self, "keypoints", tuple(self.keypoints))
        object.__setattr__(self, "individuals", tuple(self.individuals))
        if self.multi_animal is None:
            object.__setattr__(self, "multi_animal", len(self.individuals) > 1)
        elif not self.multi_animal and len(self.individuals) != 1:
            raise InputError(f"a single-animal table has one individual, got {len(self.individuals)}")
        skeleton = tuple((str(a), str(b)) for a, b in self.skeleton)
        unknown = sorted({k for e in skeleton for k in e} - set(self.keypoints))
        if unknown:
            raise InputError(f"skeleton names keypoints the table does not have: {unknown}")
        object.__setattr__(self, "skeleton", skeleton)

    # -- shape ----------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        return self.data.shape[0]

    @property
    def xy(self) -> np.ndarray:
        """``(n_frames, n_individuals, n_keypoints, 2)`` view of the positions."""
        return self.data[..., :2]

    @property
    def likelihood(self) -> np.ndarray:
        """``(n_frames, n_individuals, n_keypoints)`` view of the likelihoods."""
        return self.data[..., 2]

    def with_metadata(self, **extra) -> "PoseTable":
        return replace(self, metadata={**self.metadata, **extra})

    # -- DeepLabCut tables ----------------------------------------------------------------
    def to_dataframe(self) -> pd.DataFrame:
        """DeepLabCut's layout: columns ``scorer / individuals / bodyparts / coords`` for a
        multi-animal table, ``scorer / bodyparts / coords`` for a single-animal one (as
        DeepLabCut writes each); integer frame index, one row per frame."""
        if self.multi_animal:
            columns = pd.MultiIndex.from_product(
                [[self.scorer], list(self.individuals), list(self.keypoints), COORDS], names=DLC_COLUMN_LEVELS)
        else:
            columns = pd.MultiIndex.from_product(
                [[self.scorer], list(self.keypoints), COORDS], names=DLC_SINGLE_COLUMN_LEVELS)
        values = self.data.reshape(self.n_frames, -1).astype(np.float64)
        return pd.DataFrame(values, columns=columns, index=pd.RangeIndex(self.n_frames))

    @classmethod
    def from_dataframe(cls, df: pd.DataFrame, metadata: dict | None = None) -> "PoseTable":
        """Inverse of :meth:`to_dataframe`; also accepts DeepLabCut's 3-level single-animal tables."""
        cols = df.columns
        multi = cols.nlevels == 4
        if cols.nlevels == 3:
            cols = pd.MultiIndex.from_tuples([(c[0], "animal0", c[1], c[2]) for c in cols], names=DLC_COLUMN_LEVELS)
            df = df.set_axis(cols, axis=1)
        if cols.nlevels != 4:
            raise InputError(f"not a DeepLabCut pose table: {cols.nlevels} column levels")
        scorer = str(cols.get_level_values(0)[0])
        individuals = list(dict.fromkeys(cols.get_level_values(1)))
        keypoints = list(dict.fromkeys(cols.get_level_values(2)))
        full = pd.MultiIndex.from_product([[scorer], individuals, keypoints, COORDS])
        values = df.reindex(columns=full).to_numpy(dtype=np.float32)
        data = values.reshape(len(df), len(individuals), len(keypoints), 3)
        return cls(data, tuple(keypoints), tuple(individuals), scorer, dict(metadata or {}),
                   multi_animal=multi or len(individuals) > 1)

    @classmethod
    def load(cls, path: str | Path, fmt: str | None = None) -> "PoseTable":
        """Read a table written by :meth:`save` (``.h5`` or ``.csv``; metadata from the sidecar).

        Parameters
        ----------
        path : str or Path
        fmt : {"h5", "csv"}, optional
            How to read the file; by default from its suffix (give it for a file whose name
            was chosen by someone else, e.g. a download).

        Raises
        ------
        UnsafeFileError
            An h5 file holds a pickled Python object (it is not run).
        InputError
            Not a pose table, or its coordinates are not numbers.
        """
        path = Path(path)
        fmt = fmt or path.suffix.lstrip(".")
        meta_path = path.with_suffix(".meta.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if fmt == "h5":
            # pd.read_hdf would unpickle whatever the file holds, i.e. run its code
            df = read_hdf_safely(path, key=DLC_H5_KEY)
        elif fmt == "csv":
            try:
                df = pd.read_csv(path, header=list(range(_csv_header_rows(path))), index_col=0)
            except (UnicodeDecodeError, ValueError, IndexError, pd.errors.ParserError) as exc:
                raise InputError(f"{path}: not a DeepLabCut pose table in CSV ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        else:
            raise InputError(f"{path}: can only load .h5 or .csv pose tables")
        _require_numeric(df, path)
        return cls.from_dataframe(df, meta)

    # -- writers --------------------------------------------------------------------------
    def to_h5(self, path: str | Path) -> Path:
        path = Path(path)
        self.to_dataframe().to_hdf(path, key=DLC_H5_KEY, mode="w", format="table")
        return path

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        self.to_dataframe().to_csv(path)
        return path

    def to_json(self, path: str | Path) -> Path:
        """Per-frame JSON for web clients: ``frames[i].poses[individual] = [[x, y, p], ...]``
        with ``null`` for missing points."""
        path = Path(path)
        rounded = np.round(self.data.astype(np.float64), 3).astype(object)
        rounded[np.isnan(self.data)] = None
        frames = [
            {"frame": i, "poses": dict(zip(self.individuals, per_frame))}
            for i, per_frame in enumerate(rounded.tolist())
        ]
        if self.boxes is not None:  # top-down: frames[i].boxes[individual] = [x1, y1, x2, y2, score]
            boxes = np.round(self.boxes.astype(np.float64), 3).astype(object)
            boxes[np.isnan(self.boxes)] = None
            for doc, per_frame in zip(frames, boxes.tolist()):
                doc["boxes"] = {ind: (box if box[0] is not None else None)
                                for ind, box in zip(self.individuals, per_frame)}
        from .render import keypoint_colours

        def hexes(n):
            return ["#%02x%02x%02x" % tuple(c) for c in keypoint_colours(n).tolist()]

        doc = {
            "scorer": self.scorer,
            "keypoints": list(self.keypoints),
            "individuals": list(self.individuals),
            "skeleton": [list(e) for e in self.skeleton],
            # the labelled video's colours: per keypoint, and per animal where there are several
            "colours": {"keypoints": hexes(len(self.keypoints)), "individuals": hexes(len(self.individuals))},
            "coords": COORDS,
            "metadata": portable(self.metadata),
            "frames": frames,
        }
        path.write_text(json.dumps(doc, allow_nan=False, separators=(",", ":")))
        return path

    def to_long_dataframe(self) -> pd.DataFrame:
        """One row per frame x individual x keypoint: ``frame, time, individual, keypoint, x, y,
        likelihood``; ``time`` in seconds from the video's fps (NaN when unknown); the
        individual and keypoint categories in the model's order."""
        nf, ni, nk, _ = self.data.shape
        flat = self.data.reshape(-1, 3)
        frame = np.repeat(np.arange(nf, dtype=np.int64), ni * nk)
        fps = (self.metadata.get("video") or {}).get("fps")
        return pd.DataFrame(
            {
                "frame": frame,
                "time": frame / float(fps) if fps else np.full(len(frame), np.nan),
                "individual": pd.Categorical(np.tile(np.repeat(np.array(self.individuals), nk), nf),
                                             categories=list(self.individuals), ordered=True),
                "keypoint": pd.Categorical(np.tile(np.array(self.keypoints), nf * ni),
                                           categories=list(self.keypoints), ordered=True),
                "x": flat[:, 0],
                "y": flat[:, 1],
                "likelihood": flat[:, 2],
            }
        )

    def to_parquet(self, path: str | Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        table = pa.Table.from_pandas(self.to_long_dataframe(), preserve_index=False)
        meta = {**(table.schema.metadata or {}), b"posezoo": json.dumps(portable(self.metadata)).encode()}
        pq.write_table(table.replace_schema_metadata(meta), path)
        return path

    def to_nwb(self, path: str | Path) -> Path:
        """NWB with ndx-pose ``PoseEstimation`` (see :func:`posezoo.exports.to_nwb`)."""
        from .exports import to_nwb

        return to_nwb(self, path)

    def to_slp(self, path: str | Path) -> Path:
        """SLEAP labels, every frame (see :func:`posezoo.exports.to_slp`)."""
        from .exports import to_slp

        return to_slp(self, path)

    def save(self, out: str | Path, formats: tuple[str, ...] | list[str] = ("h5",), stem: str | None = None,
             dlc_meta: bool = True) -> dict[str, Path]:
        """Write the table in each of ``formats`` (h5, csv, json, parquet, nwb, slp) plus a
        ``.meta.json`` sidecar and, with h5 or csv, DeepLabCut's ``_meta.pickle``.

        ``out`` is a directory or, for one format, a file path with that suffix. In a
        directory files are named ``<stem>.<ext>``; the default stem is DeepLabCut's
        ``<video><scorer>`` (see :mod:`posezoo.dlc`), or the scorer when the video is not
        known. Returns ``{format: path}`` including ``"meta"`` (and ``"dlc_meta"``).
        ``dlc_meta=False`` leaves the pickle out (a filtered table beside its raw one).
        """
        from .dlc import output_stem, write_video_metadata

        out = Path(out)
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise InputError(f"unknown output format(s) {unknown}: choose from {list(FORMATS)}")
        if out.suffix.lstrip(".") in FORMATS:
            base = out.with_suffix("")
            formats = [out.suffix.lstrip(".")]
        else:
            video = (self.metadata.get("video") or {}).get("path")
            base = out / (stem or (output_stem(video, self.scorer) if video else self.scorer))
        base.parent.mkdir(parents=True, exist_ok=True)
        writers = {"h5": self.to_h5, "csv": self.to_csv, "json": self.to_json, "parquet": self.to_parquet,
                   "nwb": self.to_nwb, "slp": self.to_slp}
        paths = {fmt: writers[fmt](base.with_name(f"{base.name}.{fmt}")) for fmt in formats}
        if dlc_meta and {"h5", "csv"} & set(formats):
            paths["dlc_meta"] = write_video_metadata(self, base.with_name(f"{base.name}_meta.pickle"))
        meta = base.with_name(f"{base.name}.meta.json")
        meta.write_text(json.dumps(self.metadata, indent=2, default=_json_default))
        paths["meta"] = meta
        return paths


def portable(metadata):
    """``metadata`` with every absolute path replaced by its file name: the outputs meant to be
    shared (JSON, Parquet) say which video and model, never where they were on the machine."""
    if isinstance(metadata, dict):
        return {k: portable(v) for k, v in metadata.items()}
    if isinstance(metadata, list):
        return [portable(v) for v in metadata]
    if isinstance(metadata, str) and (metadata.startswith("/") or (len(metadata) > 2 and metadata[1:3] == ":\\")):
        return Path(metadata).name
    return metadata


def _csv_header_rows(path: Path) -> int:
    """3 for DeepLabCut's single-animal CSV (``scorer, bodyparts, coords``), 4 when it has an
    ``individuals`` row."""
    with open(path, encoding="utf-8", errors="replace") as f:
        f.readline()
        second = f.readline()
    return 4 if second.split(",", 1)[0].strip() == "individuals" else 3


def _require_numeric(df: pd.DataFrame, path: Path) -> None:
    """Refuse a table with a non-numeric column: coordinates and likelihoods are numbers, and
    an object column is where anything else (pickled objects included) would hide."""
    for column, dtype in df.dtypes.items():
        if not pd.api.types.is_numeric_dtype(dtype):
            raise InputError(f"{path}: column {column} holds {dtype} values: a pose table holds numbers only")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if math.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
