"""Safe extraction of uploaded zip archives (labelled data for fine-tune jobs).

Refused before anything is written: member names that are absolute, hold ``..`` or a
drive letter (zip-slip), symlinks and other special files, encrypted members, duplicate
names, more members than allowed, a declared uncompressed size over the limit, and a
compression ratio over the limit (zip bombs). While extracting, the bytes actually
inflated are counted too (a header may lie about the sizes).

Only the files a DeepLabCut labelled-data folder needs are written (label tables and
frames, by suffix); everything else in the archive is skipped.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .uploads import UploadError

CHUNK = 1 << 20
#: suffixes written out of a labelled-data archive (others are skipped, not refused)
KEEP_SUFFIXES = frozenset({".csv", ".h5", ".png", ".jpg", ".jpeg"})
SMALL_MEMBER = 1 << 20  # the per-member ratio is only checked above this size


@dataclass(frozen=True)
class ZipLimits:
    max_bytes: int = 4 << 30  # total uncompressed
    max_members: int = 20_000
    max_ratio: float = 100.0  # uncompressed / compressed, per large member and overall


@dataclass(frozen=True)
class Extracted:
    root: Path
    files: int
    bytes: int
    skipped: int


def _unsafe(msg: str) -> UploadError:
    return UploadError(msg, 400, "unsafe_archive")


def member_path(name: str) -> PurePosixPath:
    """The relative path a member may be written to; raises for zip-slip names."""
    text = name.replace("\\", "/")
    if "\0" in text:
        raise _unsafe(f"zip member {name[:200]!r}: NUL in its name")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise _unsafe(f"zip member {name[:200]!r}: absolute paths are not allowed")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise _unsafe(f"zip member {name[:200]!r}: '..' in a path is not allowed")
    if not parts:
        raise _unsafe(f"zip member {name[:200]!r}: empty name")
    if len(parts) > 32 or any(len(p.encode()) > 255 for p in parts):
        raise _unsafe(f"zip member {name[:200]!r}: path too deep or too long")
    return PurePosixPath(*parts)


def _is_special(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if not kind or info.create_system != 3:  # no Unix file type recorded: a plain file or directory
        return False
    return kind not in (stat.S_IFREG, stat.S_IFDIR)


def _skip(rel: PurePosixPath) -> bool:
    return (rel.parts[0] == "__MACOSX" or any(p.startswith("._") for p in rel.parts)
            or rel.suffix.lower() not in KEEP_SUFFIXES)


def check_zip(zf: zipfile.ZipFile, limits: ZipLimits) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The members to extract, after every check on the central directory."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise UploadError(f"the zip has {len(infos)} members, over this server's limit of {limits.max_members}",
                          413, "too_large")
    seen: set[str] = set()
    out = []
    total = total_c = 0
    for info in infos:
        rel = member_path(info.filename)
        if _is_special(info):
            raise _unsafe(f"zip member {info.filename[:200]!r} is a symlink or special file: not allowed")
        if info.flag_bits & 0x1:
            raise _unsafe(f"zip member {info.filename[:200]!r} is encrypted: not supported")
        key = str(rel).lower()
        if key in seen:
            raise _unsafe(f"zip member {info.filename[:200]!r} appears twice")
        seen.add(key)
        if info.is_dir():
            continue
        total += info.file_size
        total_c += info.compress_size
        if total > limits.max_bytes:
            raise UploadError(f"the zip unpacks to more than this server's limit of {limits.max_bytes} bytes",
                              413, "too_large")
        if info.file_size > SMALL_MEMBER and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            raise UploadError(f"zip member {info.filename[:200]!r} is compressed {ratio:.0f}:1, over the limit of "
                              f"{limits.max_ratio:g}:1 (a zip bomb?)", 422, "unsafe_archive")
        if not _skip(rel):
            out.append((info, rel))
    if total > SMALL_MEMBER and total > limits.max_ratio * max(total_c, 1):
        raise UploadError(f"the zip is compressed {total / max(total_c, 1):.0f}:1 overall, over the limit of "
                          f"{limits.max_ratio:g}:1 (a zip bomb?)", 422, "unsafe_archive")
    return out


def extract_zip(path: Path, dest: Path, limits: ZipLimits = ZipLimits()) -> Extracted:
    """Check and extract the archive ``path`` into the new directory ``dest``.

    Raises :class:`UploadError` (4xx) for anything refused; ``dest`` is removed then.
    """
    dest = Path(dest)
    if not zipfile.is_zipfile(path):
        raise UploadError("the upload is not a zip archive (send the labelled-data folder zipped)", 422,
                          "invalid_archive")
    dest.mkdir(parents=True, exist_ok=False)
    root = dest.resolve()
    try:
        with zipfile.ZipFile(path) as zf:
            members = check_zip(zf, limits)
            written = nfiles = 0
            for info, rel in members:
                target = root.joinpath(*rel.parts)
                if not target.resolve().is_relative_to(root):  # belt and braces
                    raise _unsafe(f"zip member {info.filename[:200]!r} points outside the archive")
                target.parent.mkdir(parents=True, exist_ok=True)
                n = 0
                with zf.open(info) as src, open(target, "xb") as out:
                    while chunk := src.read(CHUNK):
                        n += len(chunk)
                        written += len(chunk)
                        if n > info.file_size or written > limits.max_bytes:
                            raise UploadError(f"zip member {info.filename[:200]!r} inflates beyond its declared size "
                                              "or the server's limit (a zip bomb?)", 422, "unsafe_archive")
                        out.write(chunk)
                nfiles += 1
    except UploadError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError,
            zlib.error) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UploadError(f"the zip archive is damaged or unsupported ({exc})", 422, "invalid_archive") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return Extracted(dest, nfiles, written, len(zf.infolist()) - len(members))
