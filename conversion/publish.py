"""Publish converted artefacts and cards to a Hugging Face Hub repository or an S3 prefix,
and fill in the catalog entries' sha256, size and revision.

Layout of the published repository / prefix (the zoo's ``hf://org/repo`` and
``s3://bucket/prefix`` locations look the artefact up by its file name at the root)::

    <artefact>.onnx ...
    cards/<name>/<version>/card.yaml

``hf://``: the files are uploaded with ``huggingface_hub.HfApi.upload_folder`` (one commit;
its id becomes the cards' ``revision``, so the zoo pins exactly what was published). With
``layout_dir`` and ``upload=False`` the repository's files are only laid out locally (for
review, or to be pushed by other means); the revision is then ``revision`` or a content hash.
``s3://``: boto3 ``upload_file`` (``POSEZOO_S3_ENDPOINT``/``AWS_ENDPOINT_URL`` for S3-compatible
servers); no revision (the sha256 pins the content).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from posezoo.cards import ModelCard
from posezoo.zoo import CARD_FILE, sha256_file


def catalog_entries(catalog: str | Path) -> list[tuple[ModelCard, Path]]:
    """``(card, artefact path)`` of every entry of a local catalog written by the conversion."""
    out = []
    for card_path in sorted(Path(catalog).glob(f"*/*/{CARD_FILE}")):
        card = ModelCard.from_yaml(card_path)
        out.append((card, card_path.parent / card.artefact.filename))
    return out


def _content_revision(entries: list[tuple[ModelCard, Path]]) -> str:
    h = hashlib.sha1()
    for card, path in sorted(entries, key=lambda e: e[1].name):
        h.update(f"{path.name}:{card.artefact.sha256 or sha256_file(path)}\n".encode())
    return h.hexdigest()


def _published(card: ModelCard, path: Path, location: str, revision: str | None) -> ModelCard:
    art = card.artefact.model_copy(update={"locations": [location], "revision": revision,
                                           "sha256": sha256_file(path), "bytes": path.stat().st_size})
    return card.model_copy(update={"artefact": art})


def publish(source: str | Path, target: str, *, catalog: str | Path | None = None, layout_dir: str | Path | None = None,
            upload: bool = True, revision: str | None = None, token: str | None = None,
            commit_message: str = "posezoo: converted DeepLabCut SuperAnimal models") -> list[ModelCard]:
    """Publish every entry of the local catalog ``source`` to ``target``.

    Parameters
    ----------
    source : path
        A catalog directory written by :func:`conversion.superanimal.convert`.
    target : str
        ``hf://org/repo`` or ``s3://bucket/prefix``.
    catalog : path, optional
        A catalog (e.g. the repository's ``models/``) whose entries are (re)written with the
        published location, sha256, size and revision.
    layout_dir : path, optional
        Where the repository's files are laid out (``hf://``; default a temporary directory).
    upload : bool
        ``False``: lay out only (no network).
    revision : str, optional
        The revision to record when not uploading (default: a content hash).

    Returns
    -------
    list of ModelCard
        The published cards.
    """
    entries = catalog_entries(source)
    if not entries:
        raise FileNotFoundError(f"{source}: no converted models (card.yaml) to publish")
    url = urlparse(target)
    if url.scheme == "hf":
        cards = _publish_hf(entries, f"{url.netloc}{url.path}".strip("/"), layout_dir, upload, revision, token,
                            commit_message)
    elif url.scheme == "s3":
        cards = _publish_s3(entries, url.netloc, url.path.strip("/"))
    else:
        raise ValueError(f"unsupported publish target {target!r}: use hf://org/repo or s3://bucket/prefix")
    if catalog is not None:
        for card in cards:
            card.to_yaml(Path(catalog) / card.name / card.version / CARD_FILE)
    return cards


def _lay_out(entries, root: Path, location: str, revision: str | None) -> list[ModelCard]:
    cards = []
    for card, path in entries:
        dst = root / path.name
        if not dst.exists():
            try:
                os.link(path, dst)
            except OSError:
                shutil.copyfile(path, dst)
        pub = _published(card, path, location, revision)
        # the cards inside the repository cannot know the commit they are part of
        pub.model_copy(update={"artefact": pub.artefact.model_copy(update={"revision": None})}).to_yaml(
            root / "cards" / card.name / card.version / CARD_FILE)
        cards.append(pub)
    return cards


def _publish_hf(entries, repo_id: str, layout_dir, upload: bool, revision: str | None, token, message) -> list[ModelCard]:
    location = f"hf://{repo_id}"
    tmp = None
    if layout_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="posezoo-publish-")
        layout_dir = tmp.name
    root = Path(layout_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        if not upload:
            rev = revision or _content_revision(entries)
            return _lay_out(entries, root, location, rev)
        from huggingface_hub import HfApi

        _lay_out(entries, root, location, None)
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(root), commit_message=message)
        rev = getattr(info, "oid", None) or api.model_info(repo_id).sha
        return [_published(card, path, location, rev) for card, path in entries]
    finally:
        if tmp is not None:
            tmp.cleanup()


def _publish_s3(entries, bucket: str, prefix: str) -> list[ModelCard]:
    from posezoo.zoo import Zoo

    client = Zoo(include_bundled=False).s3_client()
    location = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    cards = []
    for card, path in entries:
        key = f"{prefix}/{path.name}" if prefix else path.name
        client.upload_file(str(path), bucket, key)
        pub = _published(card, path, location, None)
        with tempfile.TemporaryDirectory() as d:
            card_file = pub.to_yaml(Path(d) / CARD_FILE)
            card_key = f"cards/{card.name}/{card.version}/{CARD_FILE}"
            client.upload_file(str(card_file), bucket, f"{prefix}/{card_key}" if prefix else card_key)
        cards.append(pub)
    return cards
