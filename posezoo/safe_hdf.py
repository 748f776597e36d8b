"""Read pandas/DeepLabCut h5 tables without running code hidden in them.

PyTables unpickles two things while pandas reads an h5 file: every HDF5 attribute stored as
bytes that "may be pickled" (``tables.attributeset``; pandas' table format keeps its
metadata, e.g. ``non_index_axes``, ``info``, ``levels``, that way) and every row of a VLArray
of ``ObjectAtom`` (``tables.atom``; pandas' fixed format stores object arrays that way).
``pickle.loads`` calls whatever the data names, so a crafted file runs code on the machine
that reads it. :func:`read_hdf_safely` reads with every such unpickle going through an
unpickler that builds plain data only (builtin containers and scalars, numpy arrays, scalars
and dtypes) and raises :class:`~posezoo.errors.UnsafeFileError` for anything else.

A legitimate table needs no global at all with the pickle protocols pandas and PyTables use
today (lists, tuples, dicts, str and None have opcodes of their own); the allowed globals are
what older protocols (0-2, Python 2 files) and numpy objects inside pickles reference.
"""

from __future__ import annotations

import _compat_pickle
import functools
import io
import pickle
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError, UnsafeFileError

if TYPE_CHECKING:
    import pandas as pd

# Builtin types that only build data. Their classes are immutable, so a BUILD opcode
# cannot change them either.
_BUILTIN_TYPES = (list, tuple, dict, set, frozenset, str, bytes, bytearray, int, float, complex, bool,
                  slice, range)

# One patched read at a time: the swap is process-wide (module attributes of PyTables).
_LOCK = threading.Lock()


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something that is not plain data; ``what`` names it."""

    def __init__(self, what: str):
        super().__init__(f"refused to unpickle {what}")
        self.what = what


def _latin1_encode(text, encoding):
    """``_codecs.encode`` as pickle protocols 0-2 use it to store bytes, latin-1 only: a codec
    name is looked up by importing a module, so a pickle does not get to choose one."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin-1")


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], object]:
    """``{(module, name): object}`` a pickle may reference: builtin data types, latin-1
    bytes, numpy's array/scalar/dtype reconstruction (under both numpy 1 and 2 module names)."""
    import numpy as np

    try:  # numpy >= 2 (numpy 1.26 has a forwarding shim under this name too)
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy < 1.26
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {("builtins", t.__name__): t for t in _BUILTIN_TYPES}
    allowed[("_codecs", "encode")] = _latin1_encode
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        # protocol 5 (PyTables' ObjectAtom uses the highest) stores contiguous arrays this way
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals come from :func:`_allowed_globals` only."""

    def find_class(self, module: str, name: str):
        # Python 2 names (``__builtin__.set``), as the stock unpickler maps them; the
        # mapped name must still be allowed.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}")
        if not isinstance(obj, type) and hasattr(obj, "__dict__"):
            # A Python function is mutable (BUILD could set its __defaults__ or __dict__ for
            # the rest of the process): hand out a fresh wrapper instead.
            return functools.partial(obj)
        return obj

    def persistent_load(self, pid):
        raise _Refused("a persistent id")


class _PickleShim:
    """Stands in for the ``pickle`` module inside PyTables during a safe read.

    ``loads`` in the reading thread uses :class:`_RestrictedUnpickler` and records every
    refusal in ``refused`` (PyTables catches unpickling errors of attributes and returns the
    raw bytes instead, so the caller must check it). Other threads, and everything but
    ``loads``, get the real module.
    """

    def __init__(self, owner: int):
        self._owner = owner
        self.refused: list[str] = []

    def __getattr__(self, name: str):
        return getattr(pickle, name)

    def loads(self, data, /, *, fix_imports=True, encoding="ASCII", errors="strict", buffers=None):
        if threading.get_ident() != self._owner:
            return pickle.loads(data, fix_imports=fix_imports, encoding=encoding, errors=errors, buffers=buffers)
        unpickler = _RestrictedUnpickler(io.BytesIO(bytes(data)), fix_imports=fix_imports, encoding=encoding,
                                         errors=errors, buffers=buffers)
        try:
            return unpickler.load()
        except _Refused as exc:
            self.refused.append(exc.what)
            raise


def _pytables_pickle_users() -> list:
    """The PyTables modules that call ``pickle.loads``; fails closed if one no longer does it
    through a module attribute ``pickle`` (another PyTables version), since then the swap
    would protect nothing."""
    import tables.atom
    import tables.attributeset

    modules = [tables.attributeset, tables.atom]
    for module in modules:
        if getattr(module, "pickle", None) is not pickle:
            raise RuntimeError(f"{module.__name__} does not use the pickle module as posezoo expects "
                               f"(PyTables {tables.__version__}): h5 files cannot be read safely")
    return modules


@contextmanager
def restricted_unpickling() -> Iterator[list[str]]:
    """Within the block, every unpickle PyTables does in this thread builds plain data only.

    Yields
    ------
    list of str
        The globals refused so far (``module.name``); empty when nothing was refused.
    """
    with _LOCK:
        modules = _pytables_pickle_users()
        shim = _PickleShim(threading.get_ident())
        saved = [module.pickle for module in modules]
        for module in modules:
            module.pickle = shim
        try:
            yield shim.refused
        finally:
            for module, original in zip(modules, saved):
                module.pickle = original


def _unsafe(path: Path, refused: list[str]) -> UnsafeFileError:
    what = ", ".join(dict.fromkeys(refused))
    return UnsafeFileError(f"{path}: refused to load: it contains a pickled Python object ({what}); "
                           "posezoo's h5 tables hold plain numbers and strings only")


def read_hdf_safely(path: str | Path, key: str | None = None) -> "pd.DataFrame":
    """``pandas.read_hdf(path, key)`` without unpickling anything but plain data.

    Parameters
    ----------
    path : str or Path
        An h5 file written by pandas (``to_hdf``, table or fixed format), e.g. DeepLabCut's.
    key : str, optional
        The table in the file; by default its only one (as ``pandas.read_hdf``).

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    UnsafeFileError
        The file holds a pickled object other than plain data (nothing of it was run).
    InputError
        The key holds something other than a DataFrame.
    """
    import pandas as pd

    path = Path(path)
    with restricted_unpickling() as refused:
        try:
            with pd.HDFStore(path, mode="r") as store:
                df = pd.read_hdf(store, key)
        except Exception as exc:
            # a refused attribute may make pandas fail further on: the refusal is the cause
            if refused:
                raise _unsafe(path, refused) from exc
            raise
        # PyTables returns an attribute it failed to unpickle as raw bytes and carries on:
        # a read that "succeeded" may still have met a refused object.
        if refused:
            raise _unsafe(path, refused)
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"{path}: the h5 key {key or '(the only one)'} holds a {type(df).__name__}, not a table")
    return df
