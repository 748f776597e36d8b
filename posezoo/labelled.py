"""DeepLabCut labelled data: load and validate ``CollectedData_<scorer>.csv`` / ``.h5``.

A DeepLabCut project stores its labels beside the frames::

    labeled-data/<video>/CollectedData_<scorer>.csv   (or .h5, the same table)
    labeled-data/<video>/img0000.png ...

The table has three header rows ``scorer / bodyparts / coords`` (four with
``individuals`` in multi-animal projects: only one individual is supported here), and
its index is the image path relative to the project root, either as one column
(``labeled-data/m4s1/img0000.png``) or, in DeepLabCut 2.3+, as three columns
(``labeled-data``, ``m4s1``, ``img0000.png``). Unlabelled points are empty (NaN) and
stay NaN: they are ignored by training and evaluation, never zeroed.

Everything here is NumPy/pandas/OpenCV: no PyTorch.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, UnsafeFileError
from .safe_hdf import read_hdf_safely

LABEL_FILE_GLOB = "CollectedData_*"


@dataclass(frozen=True)
class LabelledData:
    """Labelled frames of one DeepLabCut labelled-data folder.

    Attributes
    ----------
    source : Path
        The ``CollectedData_<scorer>`` file.
    scorer : str
    keypoints : tuple of str
        Body-part names in table order.
    images : tuple of str
        Image paths as the table's index spells them (``labeled-data/m4s1/img0000.png``).
    paths : tuple of Path
        The image files on disk.
    coords : ndarray, shape (n_images, n_keypoints, 2), float64
        ``x, y`` in image pixels; NaN where a point is not labelled.
    image_size : (int, int)
        ``(width, height)`` shared by all images.
    header_rows : int
        3, or 4 with an ``individuals`` row (for error messages: data row ``i`` is
        file row ``header_rows + i + 1``).
    """

    source: Path
    scorer: str
    keypoints: tuple[str, ...]
    images: tuple[str, ...]
    paths: tuple[Path, ...]
    coords: np.ndarray
    image_size: tuple[int, int]
    header_rows: int = 3

    def __len__(self) -> int:
        return len(self.images)

    @property
    def names(self) -> tuple[str, ...]:
        """File names of the images (``img0000.png`` ...)."""
        return tuple(p.name for p in self.paths)

    @property
    def visible(self) -> np.ndarray:
        """``(n_images, n_keypoints)`` bool: the point is labelled."""
        return np.isfinite(self.coords).all(axis=-1)

    def subset(self, indices) -> "LabelledData":
        """The frames at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=int)
        return LabelledData(self.source, self.scorer, self.keypoints, tuple(self.images[i] for i in idx),
                            tuple(self.paths[i] for i in idx), self.coords[idx], self.image_size,
                            self.header_rows)

    def select_keypoints(self, names) -> "LabelledData":
        """Reorder/restrict the keypoints to ``names``.

        Raises
        ------
        InputError
            A name is not a body part of the table.
        """
        missing = [n for n in names if n not in self.keypoints]
        if missing:
            raise InputError(f"{self.source}: keypoints {missing} are not labelled in this file "
                             f"(it has {list(self.keypoints)})")
        idx = [self.keypoints.index(n) for n in names]
        return LabelledData(self.source, self.scorer, tuple(names), self.images, self.paths,
                            self.coords[:, idx], self.image_size, self.header_rows)

    def load_images(self, colour_order: str = "RGB") -> np.ndarray:
        """Read every image.

        Returns
        -------
        ndarray, shape (n_images, height, width, 3), uint8
        """
        return np.stack([read_image(p, colour_order) for p in self.paths])


def read_image(path: Path, colour_order: str = "RGB") -> np.ndarray:
    """One image as ``(height, width, 3)`` uint8 (grey and RGBA are converted)."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"{path}: cannot read this image (missing, empty or not an image)")
    return image[..., ::-1].copy() if colour_order.upper() == "RGB" else image


def find_label_file(path: str | Path) -> Path:
    """``path`` itself if it is a file, else the one ``CollectedData_*.h5``/``.csv`` in it.

    The ``.h5`` file is preferred when both exist (DeepLabCut treats it as the master).
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise InputError(f"{p}: no such labelled-data file or folder")
    for suffix in (".h5", ".csv"):
        found = sorted(p.glob(LABEL_FILE_GLOB + suffix))
        if len(found) > 1:
            raise InputError(f"{p}: several label files {[f.name for f in found]}; name one of them")
        if found:
            return found[0]
    raise InputError(f"{p}: no CollectedData_<scorer>.h5 or .csv in this folder")


def _read_table(path: Path):
    """The raw DataFrame of a label file (columns: a MultiIndex, index: image paths)."""
    import pandas as pd

    if path.suffix.lower() == ".h5":
        try:
            return read_hdf_safely(path)  # pd.read_hdf would run pickled code in the file
        except UnsafeFileError:
            raise
        except Exception as exc:  # pytables raises its own HDF5ExtError, pandas KeyError/ValueError
            raise InputError(f"{path}: cannot read this HDF5 label table ({exc})") from exc
    if path.suffix.lower() != ".csv":
        raise InputError(f"{path}: a label file must be CollectedData_<scorer>.csv or .h5")
    try:
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(f"{path}: cannot read this CSV ({exc})") from exc
    return _frame_from_csv(raw, path)


def _frame_from_csv(raw, path: Path):
    """Parse DeepLabCut's CSV layout from an all-string table (row/column numbers kept
    for error messages)."""
    import pandas as pd

    names = [str(v).strip() for v in raw.iloc[:, 0]]
    expected = ("scorer", "individuals", "bodyparts", "coords")
    n_header = 0
    while n_header < len(names) and names[n_header] in expected:
        n_header += 1
    header = names[:n_header]
    if header not in (["scorer", "bodyparts", "coords"], ["scorer", "individuals", "bodyparts", "coords"]):
        got = ", ".join(repr(h) for h in names[:4])
        raise InputError(
            f"{path}: row 1: the header rows must be scorer / [individuals] / bodyparts / coords "
            f"(first column reads {got})"
        )
    # index columns: the leading columns that are empty in the header rows (3-column
    # index of DLC >= 2.3) plus the first one
    n_index = 1
    while n_index < raw.shape[1] and all(str(raw.iat[r, n_index]).strip() == "" for r in range(n_header)):
        n_index += 1
    columns = pd.MultiIndex.from_arrays(
        [[str(v) for v in raw.iloc[r, n_index:]] for r in range(n_header)], names=header
    )
    body = raw.iloc[n_header:]
    index = ["/".join(p for p in (str(v).strip() for v in row) if p) for row in body.iloc[:, :n_index].itertuples(index=False)]
    values = np.full((len(body), len(columns)), np.nan)
    for i in range(len(body)):
        for j in range(len(columns)):
            text = str(body.iat[i, n_index + j]).strip()
            if text in ("", "nan", "NaN"):
                continue
            try:
                values[i, j] = float(text)
            except ValueError:
                raise InputError(
                    f"{path}: row {n_header + i + 1} ({index[i]}), column {n_index + j + 1}: "
                    f"{text!r} is not a number"
                ) from None
    return pd.DataFrame(values, index=index, columns=columns)


def _index_paths(df) -> list[str]:
    """Image paths from a one-level or DLC-2.3 three-level index."""
    import pandas as pd

    if isinstance(df.index, pd.MultiIndex):
        return ["/".join(str(p) for p in parts if str(p)) for parts in df.index]
    return [str(v) for v in df.index]


def _resolve_image(label_file: Path, name: str) -> Path:
    """Find an index entry on disk: relative to the project root (two levels above
    the label file) or, failing that, beside the label file."""
    rel = Path(name.replace("\\", "/"))
    folder = label_file.parent
    candidates = [folder.parent.parent / rel, folder / rel.name, folder / rel]
    for c in candidates:
        if c.is_file():
            return c
    return folder / rel.name


def load_labelled(path: str | Path, *, check_images: bool = True) -> LabelledData:
    """Load and validate a DeepLabCut label table and its frames.

    Parameters
    ----------
    path : path
        A ``CollectedData_<scorer>.csv``/``.h5`` file or the folder holding one.
    check_images : bool
        Check that every image exists and that all share one size (reads the
        image headers).

    Returns
    -------
    LabelledData

    Raises
    ------
    InputError
        Wrong header rows, non-numeric values, several individuals, no labelled
        frame, a missing or unreadable image, images of different sizes; the message
        names the file and the row (1-based, header rows included, as in a
        spreadsheet) or the image.
    """
    source = find_label_file(path)
    df = _read_table(source)
    levels = list(df.columns.names)
    if levels not in (["scorer", "bodyparts", "coords"], ["scorer", "individuals", "bodyparts", "coords"]):
        raise InputError(f"{source}: the header rows must be scorer / [individuals] / bodyparts / coords, got {levels}")
    n_header = len(levels)
    if "individuals" in levels and df.columns.get_level_values("individuals").nunique() > 1:
        raise InputError(f"{source}: multi-animal labels ({df.columns.get_level_values('individuals').nunique()} "
                         "individuals) are not supported; posezoo trains single-animal models")
    scorers = df.columns.get_level_values("scorer").unique()
    if len(scorers) != 1:
        raise InputError(f"{source}: row 1: one scorer expected, found {list(scorers)}")
    coords_level = df.columns.get_level_values("coords")
    bodyparts = list(dict.fromkeys(df.columns.get_level_values("bodyparts")))
    if not bodyparts:
        raise InputError(f"{source}: no body parts in the header")
    n_img = len(df)
    coords = np.full((n_img, len(bodyparts), 2), np.nan)
    for k, bp in enumerate(bodyparts):
        for c, axis in enumerate(("x", "y")):
            mask = (df.columns.get_level_values("bodyparts") == bp) & (coords_level == axis)
            if mask.sum() != 1:
                raise InputError(
                    f"{source}: row {n_header}: body part {bp!r} needs exactly one {axis!r} column in the "
                    f"coords row, found {int(mask.sum())}"
                )
            coords[:, k, c] = df.loc[:, mask].to_numpy(dtype=float)[:, 0]
    images = _index_paths(df)
    labelled_rows = np.isfinite(coords).all(axis=-1).any(axis=1)
    if not labelled_rows.any():
        raise InputError(f"{source}: zero labelled frames ({n_img} rows, every point empty)")
    paths = [_resolve_image(source, name) for name in images]
    size = _check_images(source, images, paths, n_header) if check_images else (0, 0)
    return LabelledData(source, str(scorers[0]), tuple(bodyparts), tuple(images), tuple(paths), coords, size,
                        n_header)


def _check_images(source: Path, images: list[str], paths: list[Path], n_header: int) -> tuple[int, int]:
    """Every image exists and all have one size; returns ``(width, height)``."""
    import cv2

    first: tuple[tuple[int, int], str] | None = None
    for i, (name, p) in enumerate(zip(images, paths)):
        row = n_header + i + 1
        if not p.is_file():
            raise InputError(f"{source}: row {row}: image {name} not found (looked for {p})")
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise InputError(f"{source}: row {row}: image {p} cannot be read (not an image?)")
        size = (int(img.shape[1]), int(img.shape[0]))
        if first is None:
            first = (size, name)
        elif size != first[0]:
            raise InputError(
                f"{source}: row {row}: image {name} is {size[0]}x{size[1]} but {first[1]} is "
                f"{first[0][0]}x{first[0][1]}; all labelled frames must have one size"
            )
    assert first is not None
    return first[0]


def check_keypoints(data: LabelledData, card_keypoints) -> LabelledData:
    """Restrict ``data`` to the card's keypoints, in the card's order.

    Raises
    ------
    InputError
        The table labels a keypoint the card does not know (names file and row), or
        misses one of the card's keypoints.
    """
    card_keypoints = list(card_keypoints)
    extra = [k for k in data.keypoints if k not in card_keypoints]
    if extra:
        raise InputError(
            f"{data.source}: row {data.header_rows - 1} (bodyparts): keypoints {extra} are not in the model card "
            f"(it has {card_keypoints})"
        )
    return data.select_keypoints(card_keypoints)


def split_indices(data: LabelledData, *, test: list[str] | None = None, test_fraction: float = 0.05,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train/test split.

    Parameters
    ----------
    data : LabelledData
    test : list of str, optional
        Glob patterns (``fnmatch``) matched against each image's path and file name;
        matching frames are the test set. Without it, a seeded random
        ``test_fraction`` of the frames is.
    test_fraction : float
    seed : int

    Returns
    -------
    train, test : ndarray of int
        Sorted frame indices; frames without any labelled point are left out.
    """
    labelled = np.flatnonzero(data.visible.any(axis=1))
    if test:
        is_test = np.array([any(fnmatch.fnmatch(img, pat) or fnmatch.fnmatch(Path(img).name, pat) for pat in test)
                            for img in data.images])
        if not is_test[labelled].any():
            raise InputError(f"{data.source}: no labelled frame matches the test pattern(s) {test}")
    else:
        if not 0 <= test_fraction < 1:
            raise InputError(f"test_fraction must be in [0, 1), got {test_fraction}")
        rng = np.random.default_rng(seed)
        n_test = int(round(test_fraction * len(labelled)))
        is_test = np.zeros(len(data), bool)
        is_test[rng.choice(labelled, n_test, replace=False)] = True
    train = np.array([i for i in labelled if not is_test[i]], dtype=int)
    test_idx = np.array([i for i in labelled if is_test[i]], dtype=int)
    if len(train) == 0:
        raise InputError(f"{data.source}: the split leaves no labelled frame to train on")
    return train, test_idx


def indices_of(data: LabelledData, names) -> np.ndarray:
    """Indices of the frames whose path or file name is in ``names`` (table order)."""
    wanted = set(names)
    return np.array([i for i, (img, p) in enumerate(zip(data.images, data.paths))
                     if img in wanted or p.name in wanted], dtype=int)
