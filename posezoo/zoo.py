"""The zoo: find a model card by name and resolve its artefact to a verified local file.

A catalog is a directory laid out ``<name>/<version>/card.yaml`` (an artefact with the
location ``local`` sits next to its card). The bundled catalog is ``models/`` in the
repository (``posezoo/_models`` in an installed wheel); more catalogs come from the
``POSEZOO_CATALOG`` environment variable (``os.pathsep``-separated) or ``Zoo(catalogs=...)``.

Artefacts are fetched from the Hugging Face Hub with ``huggingface_hub`` (its cache,
pinned revisions, ``HF_HUB_OFFLINE=1``), from S3 with boto3 (``POSEZOO_S3_ENDPOINT`` or
``AWS_ENDPOINT_URL`` for S3-compatible servers), or read from a directory; the sha256 of
the card is checked before a file is used for the first time in a process.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from packaging.version import InvalidVersion, Version

from .cards import ModelCard
from .errors import (
    ArtefactNotPublishedError,
    ChecksumMismatchError,
    ModelNotCachedError,
    PrecisionError,
    UnknownModelError,
    ZooError,
)

CARD_FILE = "card.yaml"
#: Precisions a model can be asked for (``precision=`` of :meth:`Zoo.card`, :meth:`Zoo.resolve`,
#: :func:`posezoo.load`); a card other than fp32 is a variant of an fp32 card (``variant_of``).
PRECISIONS = ("fp32", "int8")
_verified: dict[tuple[str, int, int], str] = {}
_verified_lock = threading.Lock()


def bundled_catalog() -> Path:
    """The catalog shipped with posezoo (``models/`` of the source tree or the wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_models", here.parent / "models"):
        if candidate.is_dir():
            return candidate
    raise ZooError(f"the bundled catalog is missing (looked in {here / '_models'} and {here.parent / 'models'})")


def default_cache_dir() -> Path:
    return Path(os.environ.get("POSEZOO_CACHE", Path.home() / ".cache" / "posezoo"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str, ref: str) -> Path:
    """Check ``path`` against ``expected`` once per process (keyed by size and mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _verified_lock:
        if _verified.get(key) == expected:
            return path
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumMismatchError(
            f"{ref}: checksum mismatch for {path} (sha256 {actual[:12]}…, card says {expected[:12]}…); "
            "refusing to load it: delete the file and run `posezoo zoo pull` again"
        )
    with _verified_lock:
        _verified[key] = expected
    return path


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"name@version"`` -> ``(name, version)``; ``"name"`` -> ``(name, None)``."""
    name, _, version = spec.strip().partition("@")
    return name.strip().lower(), (version.strip() or None)


def _version_key(v: str):
    try:
        return (1, Version(v))
    except InvalidVersion:
        return (0, v)


def _card_key(card: ModelCard):
    """Versions in order, each precision variant right after the version it was made from."""
    if card.variant_of is None:
        return (_version_key(card.version), 0, "")
    return (_version_key(parse_spec(card.variant_of)[1] or card.version), 1, card.precision)


@dataclass(frozen=True)
class ResolvedModel:
    """A card and the verified local path of its ONNX artefact."""

    card: ModelCard
    path: Path
    source: str



#: Entry-point group of on-demand converters, ``convert(zoo, spec)``: what ``Zoo.pull`` calls
#: for an artefact that is not published yet. The conversion package registers itself here
#: (pyproject.toml), so this library never imports it: lower layers do not reach upward.
CONVERTERS_GROUP = "posezoo.converters"


def converters() -> list:
    """The registered converters that load (an entry point whose package is absent is skipped)."""
    from importlib.metadata import entry_points

    out = []
    for ep in sorted(entry_points(group=CONVERTERS_GROUP), key=lambda e: e.name):
        try:
            out.append(ep.load())
        except ImportError:
            continue
    return out


class Zoo:
    """Model catalog and artefact resolver.

    Parameters
    ----------
    catalogs : list of path, optional
        Extra catalog directories, searched before the bundled one.
    cache_dir : path, optional
        Where S3 downloads are kept (default ``$POSEZOO_CACHE`` or ``~/.cache/posezoo``).
    hf_cache_dir : path, optional
        Hugging Face cache to use (default: huggingface_hub's, ``HF_HUB_CACHE``).
    s3_endpoint : str, optional
        S3-compatible endpoint URL (default ``$POSEZOO_S3_ENDPOINT``, then boto3's own
        configuration such as ``AWS_ENDPOINT_URL``).
    """

    def __init__(
        self,
        catalogs: list[str | Path] | None = None,
        *,
        cache_dir: str | Path | None = None,
        hf_cache_dir: str | Path | None = None,
        s3_endpoint: str | None = None,
        include_bundled: bool = True,
    ):
        dirs = [Path(p) for p in (catalogs or [])]
        env = os.environ.get("POSEZOO_CATALOG")
        if env:
            dirs += [Path(p) for p in env.split(os.pathsep) if p]
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        if include_bundled:
            # models converted on this machine by `posezoo zoo pull` win over unpublished bundled cards
            dirs.append(self.converted_dir)
            dirs.append(bundled_catalog())
        self.catalogs = dirs
        self.hf_cache_dir = str(hf_cache_dir) if hf_cache_dir else None
        self.s3_endpoint = s3_endpoint or os.environ.get("POSEZOO_S3_ENDPOINT") or None
        self._cards: dict[tuple[str, str], tuple[ModelCard, Path]] | None = None

    # -- catalog --------------------------------------------------------------------------
    def _load(self) -> dict[tuple[str, str], tuple[ModelCard, Path]]:
        if self._cards is None:
            cards: dict[tuple[str, str], tuple[ModelCard, Path]] = {}
            for root in self.catalogs:
                for card_path in sorted(root.glob(f"*/*/{CARD_FILE}")):
                    card = ModelCard.from_yaml(card_path)
                    cards.setdefault((card.name, card.version), (card, card_path.parent))
            self._cards = cards
        return self._cards

    def refresh(self) -> None:
        """Forget the loaded catalog (after a new version was registered)."""
        self._cards = None

    def cards(self, all_versions: bool = False) -> list[ModelCard]:
        """Cards sorted by name; the newest version of each unless ``all_versions``.

        Precision variants (INT8 cards, ``variant_of``) are versions of their model only in
        the ``all_versions`` list: the newest version of a model is always an fp32 card."""
        by_name: dict[str, list[ModelCard]] = {}
        for card, _ in self._load().values():
            if card.variant_of is None or all_versions:
                by_name.setdefault(card.name, []).append(card)
        out = []
        for name in sorted(by_name):
            versions = sorted(by_name[name], key=_card_key)
            out.extend(versions if all_versions else versions[-1:])
        return out

    def _aliases(self) -> dict[str, str]:
        return {a.lower(): c.name for c in self.cards() for a in c.aliases}

    def _locate(self, spec: str, precision: str = "fp32") -> tuple[ModelCard, Path]:
        return self._with_precision(*self._locate_named(spec), precision)

    def _locate_named(self, spec: str) -> tuple[ModelCard, Path]:
        path = Path(spec)
        if spec.endswith((".yaml", ".yml")) and path.is_file():  # a card file outside any catalog
            return ModelCard.from_yaml(path), path.parent
        if path.is_dir() and (path / CARD_FILE).is_file():
            return ModelCard.from_yaml(path / CARD_FILE), path
        name, version = parse_spec(spec)
        name = self._aliases().get(name, name)
        versions = {v: entry for (n, v), entry in self._load().items() if n == name}
        if not versions:
            names = sorted({c.name for c in self.cards()} | set(self._aliases()))
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            close += [n for n in names if name and name in n and n not in close][:3]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownModelError(
                f"unknown model {spec!r}{hint} (`posezoo zoo list` shows all {len(names)} names)", close
            )
        if version is None:
            plain = [v for v, (c, _) in versions.items() if c.variant_of is None] or list(versions)
            version = max(plain, key=_version_key)
        if version not in versions:
            raise UnknownModelError(
                f"model {name!r} has no version {version!r}; available: {', '.join(sorted(versions, key=_version_key))}",
                [f"{name}@{v}" for v in versions],
            )
        return versions[version]

    def card(self, spec: str, precision: str = "fp32") -> ModelCard:
        """The card for ``"name[@version]"`` (an alias, or a path to a card file).

        ``precision="int8"`` is that model's INT8 variant (its own card and artefact, whose
        ``variant_of`` names the fp32 card). A spec that names a variant itself
        (``posezoo_mouse@1.1.0-int8`` or its card file) is that variant with the default
        ``precision="fp32"`` too. :class:`~posezoo.errors.PrecisionError` names the
        precisions the model has when it has none of the one asked for.
        """
        return self._locate(spec, precision)[0]

    def variants(self, card: ModelCard) -> dict[str, tuple[ModelCard, Path]]:
        """``{precision: (card, card directory)}`` of the model ``card`` (or its base) for
        each precision the catalog holds; ``fp32`` is the base card itself."""
        base = self._base(card)
        out: dict[str, tuple[ModelCard, Path]] = {}
        for c, d in sorted(self._load().values(), key=lambda e: _version_key(e[0].version)):  # newest last
            if c.variant_of is not None and parse_spec(c.variant_of) == (base[0].name, base[0].version):
                out[c.precision] = (c, d)  # the newest variant of a precision wins
        return {"fp32": base, **{p: out[p] for p in PRECISIONS if p in out and p != "fp32"}}

    def precisions(self, spec_or_card: str | ModelCard) -> list[str]:
        """The precisions the catalog has for a model (``["fp32", "int8"]``)."""
        card = spec_or_card if isinstance(spec_or_card, ModelCard) else self._locate_named(spec_or_card)[0]
        return list(self.variants(card))

    def _base(self, card: ModelCard) -> tuple[ModelCard, Path]:
        if card.variant_of is None:
            entry = self._load().get((card.name, card.version))
            return entry if entry is not None and entry[0] == card else (card, Path("."))
        name, version = parse_spec(card.variant_of)
        entry = self._load().get((name, version or ""))
        if entry is None:
            raise UnknownModelError(f"{card.ref} is a variant of {card.variant_of}, which this catalog does not hold",
                                    [card.variant_of])
        return entry

    def _with_precision(self, card: ModelCard, card_dir: Path, precision: str) -> tuple[ModelCard, Path]:
        wanted = str(precision or "fp32").strip().lower()
        if wanted not in PRECISIONS:
            raise PrecisionError(f"unknown precision {precision!r} for {card.ref}: use one of {', '.join(PRECISIONS)}")
        if card.precision == wanted:
            return card, card_dir
        if card.variant_of is not None and wanted == "fp32":  # a named variant is itself
            return card, card_dir
        variants = self.variants(card)
        if wanted in variants:
            return variants[wanted]
        base = variants["fp32"][0]
        having = sorted({c.name for c, _ in self._load().values() if c.precision == wanted})
        hint = f"; models with {wanted}: {', '.join(having)}" if having else ""
        raise PrecisionError(f"model {base.ref} has no {wanted} variant; its precisions: "
                             f"{', '.join(variants)}{hint}")

    @property
    def converted_dir(self) -> Path:
        """Catalog of models converted locally from their upstream checkpoints (``zoo pull``)."""
        return self.cache_dir / "converted"

    # -- artefacts ------------------------------------------------------------------------
    # -- species-first selection ----------------------------------------------------------
    def ready(self, card: ModelCard) -> bool:
        """Whether ``card`` can run now: its artefact is published (a top-down card's
        detector's too). A local cache may still have to fetch it."""
        if not card.artefact.published:
            return False
        if card.task == "top_down":
            try:
                return self.card(card.detector).artefact.published
            except ZooError:
                return False
        return True

    def how_to_get(self, card: ModelCard) -> str:
        """What a user runs to make ``card`` ready (one sentence)."""
        if self.ready(card):
            return "ready"
        up = card.upstream
        if up is not None and up.kind == "huggingface" and (up.filename or "").endswith(".pt"):
            # DeepLabCut 3 PyTorch checkpoints (SuperAnimal): the conversion extra converts them
            return (f"pip install 'posezoo[conversion]' && posezoo zoo pull {card.name}  "
                    "(a network is needed once, for DeepLabCut's checkpoint)")
        if up is not None and up.kind == "huggingface" and up.is_model_zoo_tarball:
            # DeepLabCut 2.x TensorFlow model-zoo tarballs: reading them needs TensorFlow
            return (f"pip install 'posezoo[conversion-tf]' && posezoo zoo pull {card.name}  "
                    "(a network is needed once, for DeepLabCut's model-zoo tarball)")
        return "not convertible by this posezoo; it becomes ready when its ONNX artefact is published"

    def recommend(self, species: str, view: str | None = None) -> ModelCard:
        """The catalog's recommended ready pose model for ``species`` (and ``view``):
        ready models first, then the highest ``priority``.

        Raises
        ------
        UnknownModelError
            No model of the catalog is for this species (and view).
        ArtefactNotPublishedError
            Models exist but none is ready; the message says how to get each.
        """
        sp = species.strip().lower()
        cands = [c for c in self.cards() if c.task != "detector" and sp in [x.lower() for x in c.species]
                 and (view is None or c.view in (view, "any"))]
        if not cands:
            known = sorted({x for c in self.cards() if c.task != "detector" for x in c.species})
            where = f" seen from the {view}" if view else ""
            raise UnknownModelError(f"no model of the zoo is for {species!r}{where}; species: {', '.join(known)}",
                                    known)
        ready = sorted((c for c in cands if self.ready(c)), key=lambda c: -c.priority)
        if ready:
            return ready[0]
        cands.sort(key=lambda c: -c.priority)
        ways = "; ".join(f"{c.name} ({c.view} view): {self.how_to_get(c)}" for c in cands)
        raise ArtefactNotPublishedError(f"no {species} model is ready yet. {ways}")

    def alternatives(self, card: ModelCard) -> list[ModelCard]:
        """Ready pose models for other species or views than ``card``'s (best first)."""
        return sorted((c for c in self.cards() if c.task != "detector" and c.name != card.name and self.ready(c)
                       and (set(c.species) != set(card.species) or c.view != card.view)),
                      key=lambda c: -c.priority)

    def pull(self, spec: str, *, convert: bool = True) -> list[ResolvedModel]:
        """Resolve ``spec`` (and the detector of a top-down model) into the local cache.

        An artefact that is not published yet is converted locally from its upstream
        DeepLabCut checkpoint when ``convert`` and the ``conversion`` extra is installed
        (``pip install 'posezoo[conversion]'``; needs a network for the checkpoint), and
        cached in :attr:`converted_dir`, where :meth:`resolve` finds it from then on.
        """
        card = self.card(spec)
        specs = [spec] + ([card.detector] if card.task == "top_down" and card.detector else [])
        try:
            return [self.resolve(s) for s in specs]
        except ArtefactNotPublishedError as exc:
            if not convert:
                raise
            found = converters()
            if not found:
                raise ArtefactNotPublishedError(
                    f"{exc} -- to convert it on this machine install the conversion extra "
                    f"(pip install 'posezoo[conversion]': PyTorch and DeepLabCut) and run `posezoo zoo pull {spec}` "
                    "with a network (no converter is registered)"
                ) from None
            found[0](self, spec)
            self.refresh()
            return [self.resolve(s) for s in specs]

    def resolve(self, spec: str, precision: str = "fp32") -> ResolvedModel:
        """A verified local ONNX path for ``"name[@version]"`` (its ``precision`` variant,
        see :meth:`card`).

        Raises
        ------
        UnknownModelError, PrecisionError, ArtefactNotPublishedError, ModelNotCachedError,
        ChecksumMismatchError, ZooError
        """
        card, card_dir = self._locate(spec, precision)
        art = card.artefact
        if not art.published:
            src = ""
            if card.upstream and (card.upstream.repo_id or card.upstream.url):
                src = f" (upstream DeepLabCut checkpoint: {card.upstream.repo_id or card.upstream.url}"
                src += f"/{card.upstream.filename})" if card.upstream.filename else ")"
            raise ArtefactNotPublishedError(
                f"{card.ref}: the ONNX artefact of this model is not published yet{src}; to get it: "
                f"{self.how_to_get(card)}; meanwhile use a model that `posezoo zoo list` marks as ready"
            )
        failures: list[ZooError] = []
        for location in art.locations:
            try:
                path, source = self._fetch(card, card_dir, location)
            except ChecksumMismatchError:
                raise
            except ZooError as exc:
                failures.append(exc)
                continue
            return ResolvedModel(card, verify_sha256(path, art.sha256, card.ref), source)
        not_cached = [f for f in failures if isinstance(f, ModelNotCachedError)]
        first = (not_cached or failures)[0]
        detail = " | ".join(str(f) for f in failures)
        raise type(first)(detail)

    def _fetch(self, card: ModelCard, card_dir: Path, location: str) -> tuple[Path, str]:
        art = card.artefact
        if location == "local":
            return self._file(card, card_dir / art.filename), f"local:{card_dir / art.filename}"
        url = urlparse(location)
        if url.scheme == "file":
            path = Path(url.path) / art.filename
            return self._file(card, path), f"file:{path}"
        if url.scheme == "hf":
            return self._from_hub(card, f"{url.netloc}{url.path}".strip("/"))
        if url.scheme == "s3":
            return self._from_s3(card, url.netloc, url.path.strip("/"))
        raise ZooError(f"{card.ref}: unsupported artefact location {location!r} (use hf://, s3://, file:// or local)")

    @staticmethod
    def _file(card: ModelCard, path: Path) -> Path:
        if not path.is_file():
            raise ModelNotCachedError(f"{card.ref}: artefact file {path} does not exist")
        return path

    def _from_hub(self, card: ModelCard, repo_id: str) -> tuple[Path, str]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        art = card.artefact
        try:
            path = hf_hub_download(repo_id, art.filename, revision=art.revision, cache_dir=self.hf_cache_dir)
        except LocalEntryNotFoundError as exc:
            raise ModelNotCachedError(
                f"{card.ref}: hf://{repo_id}/{art.filename}@{art.revision or 'main'} is not in the Hugging Face "
                f"cache and the Hub cannot be reached (offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); "
                f"fetch it once with network: `posezoo zoo pull {card.ref}` (or copy the HF cache to this machine)"
            ) from exc
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
            raise ZooError(f"{card.ref}: hf://{repo_id}/{art.filename}@{art.revision}: {type(exc).__name__}") from exc
        except (HfHubHTTPError, OSError) as exc:
            raise ModelNotCachedError(f"{card.ref}: cannot download from hf://{repo_id}: {exc}") from exc
        return Path(path), f"hf://{repo_id}@{art.revision or 'main'}"

    def s3_client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )

    def _from_s3(self, card: ModelCard, bucket: str, prefix: str) -> tuple[Path, str]:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        art = card.artefact
        key = f"{prefix}/{art.filename}" if prefix else art.filename
        target = self.cache_dir / "s3" / bucket / key
        source = f"s3://{bucket}/{key}"
        if target.is_file() and sha256_file(target) == art.sha256:
            return target, source
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        os.close(fd)
        try:
            self.s3_client().download_file(bucket, key, tmp, Config=TransferConfig(use_threads=False))
            verify_sha256(Path(tmp), art.sha256, card.ref)
            os.replace(tmp, target)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NoSuchBucket"):
                raise ZooError(f"{card.ref}: {source} does not exist") from exc
            raise ModelNotCachedError(f"{card.ref}: cannot download {source}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise ModelNotCachedError(
                f"{card.ref}: cannot reach S3 for {source} ({exc}); set POSEZOO_S3_ENDPOINT or fetch it with network"
            ) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target, source


_default_zoo: Zoo | None = None


def default_zoo() -> Zoo:
    global _default_zoo
    if _default_zoo is None:
        _default_zoo = Zoo()
    return _default_zoo


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text)
