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
            commit_message: str = "posezoo: converted DeepLabCut SuperAnimal models",
            root_files: dict[str, str] | None = None) -> list[ModelCard]:
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
    root_files : dict, optional
        Text files written at the repository's / prefix's root (e.g. ``README.md``).

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
                            commit_message, root_files or {})
    elif url.scheme == "s3":
        cards = _publish_s3(entries, url.netloc, url.path.strip("/"), root_files or {})
    else:
        raise ValueError(f"unsupported publish target {target!r}: use hf://org/repo or s3://bucket/prefix")
    if catalog is not None:
        for card in cards:
            card.to_yaml(Path(catalog) / card.name / card.version / CARD_FILE)
    return cards


def _lay_out(entries, root: Path, location: str, revision: str | None, root_files: dict[str, str]) -> list[ModelCard]:
    for name, text in root_files.items():
        (root / name).write_text(text)
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


def _publish_hf(entries, repo_id: str, layout_dir, upload: bool, revision: str | None, token, message,
                root_files: dict[str, str]) -> list[ModelCard]:
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
            return _lay_out(entries, root, location, rev, root_files)
        from huggingface_hub import HfApi

        _lay_out(entries, root, location, None, root_files)
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(root), commit_message=message)
        rev = getattr(info, "oid", None) or api.model_info(repo_id).sha
        return [_published(card, path, location, rev) for card, path in entries]
    finally:
        if tmp is not None:
            tmp.cleanup()


def _publish_s3(entries, bucket: str, prefix: str, root_files: dict[str, str]) -> list[ModelCard]:
    from posezoo.zoo import Zoo

    client = Zoo(include_bundled=False).s3_client()
    location = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    for name, text in root_files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}" if prefix else name, Body=text.encode())
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


# -- the whole zoo --------------------------------------------------------------------------------
def convertible(card: ModelCard) -> bool:
    """Whether ``card`` names an upstream DeepLabCut checkpoint this package converts."""
    from posezoo.errors import ZooError

    from .pull import check_convertible

    try:
        check_convertible(card)
    except ZooError:
        return False
    return True


def hub_readme(cards: list[ModelCard], target: str) -> str:
    """The repository's Hugging Face model card: YAML front matter (licence, tags, the upstream
    DeepLabCut repositories, and per model its keypoints, sha256 and parity figure) and a
    Markdown body, rendered with ``huggingface_hub.ModelCard``."""
    from huggingface_hub import ModelCard as HubCard
    from huggingface_hub import ModelCardData

    species = sorted({s for c in cards for s in c.species if c.task != "detector"})
    models = [{
        "name": c.name, "version": c.version, "file": c.artefact.filename, "sha256": c.artefact.sha256,
        "task": c.task, "species": list(c.species), "view": c.view, "keypoints": list(c.keypoints),
        "upstream": f"hf://{c.upstream.repo_id}/{c.upstream.filename}" if c.upstream else None,
        "licence": c.licence, "parity": c.upstream.notes if c.upstream else None,
    } for c in cards]
    data = ModelCardData(
        license="other", license_name="per-model", library_name="onnx", pipeline_tag="keypoint-detection",
        tags=["pose-estimation", "animal-pose", "deeplabcut", "onnx", "posezoo", *species],
        base_model=sorted({c.upstream.repo_id for c in cards if c.upstream and c.upstream.repo_id}),
        posezoo_models=models,
    )
    rows = "\n".join(
        f"| `{m['name']}` {m['version']} | {m['task']} | {', '.join(m['species'])} | {len(m['keypoints'])} | "
        f"{m['upstream'] or '-'} | {m['licence'] or '-'} | {m['parity'] or '-'} |" for m in models)
    body = f"""# posezoo model zoo

ONNX conversions of DeepLabCut's pretrained animal pose models, published by `python -m conversion
publish-zoo` to `{target}`. Each model is verified against DeepLabCut's own inference at conversion
(the parity column); the posezoo catalog pins each file by sha256 (`cards/<name>/<version>/card.yaml`).

| model | task | species | keypoints | upstream DeepLabCut checkpoint | licence | parity |
|---|---|---|---|---|---|---|
{rows}

Use: `pip install posezoo && posezoo predict video.mp4 --species dog`.
Licences are those of the upstream weights; DeepLabCut's code is LGPL-3.0.
"""
    return str(HubCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + body))


def publish_zoo(target: str, *, catalog: str | Path, checkpoints: str | Path | None = None,
                work: str | Path | None = None, names: list[str] | None = None, verify: bool = True,
                upload: bool = True, layout_dir: str | Path | None = None, revision: str | None = None,
                token: str | None = None, hf_cache_dir: str | None = None, progress=print) -> list[ModelCard]:
    """Convert every entry of ``catalog`` that has an upstream DeepLabCut checkpoint, verify
    each against DeepLabCut, publish the artefacts with a Hugging Face model card to ``target``
    and rewrite the catalog's entries (keypoints from the checkpoint, sha256, size, revision).

    Parameters
    ----------
    target : str
        ``hf://org/repo`` or ``s3://bucket/prefix``.
    catalog : path
        The catalog to publish (e.g. the repository's ``models/``); its entries are rewritten.
    checkpoints : path, optional
        A directory holding upstream files under their upstream names (``*.pt``,
        ``*.tar.gz``); those not there are fetched with huggingface_hub (network).
    work : path, optional
        Where the converted catalog is written (default: a temporary directory).
    names : list of str, optional
        Only these entries (a top-down model brings its detector).
    """
    from posezoo.zoo import Zoo

    from .pull import _checkpoint, convert_card

    zoo = Zoo([catalog], include_bundled=False)
    todo = [c for c in zoo.cards() if convertible(c)]
    if names is not None:
        wanted = set(names) | {zoo.card(n).detector.split("@")[0] for n in names if zoo.card(n).detector}
        todo = [c for c in todo if c.name in wanted]
    if not todo:
        raise FileNotFoundError(f"{catalog}: no entry with an upstream DeepLabCut checkpoint to publish")
    tmp = tempfile.TemporaryDirectory(prefix="posezoo-zoo-") if work is None else None
    out = Path(work or tmp.name)
    try:
        for card in todo:
            local = Path(checkpoints) / card.upstream.filename if checkpoints else None
            ckpt = local if local is not None and local.is_file() else _checkpoint(card, hf_cache_dir)
            done = convert_card(zoo, card, ckpt, out, verify=verify)
            progress(f"converted {done.card.ref} ({done.seconds:.0f} s): {done.card.upstream.notes}")
        staging = out / ".staging"
        if staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()
        converted = [card for card, _ in catalog_entries(out)]
        return publish(out, target, catalog=catalog, layout_dir=layout_dir, upload=upload, revision=revision,
                       token=token, commit_message="posezoo: converted DeepLabCut models",
                       root_files={"README.md": hub_readme(converted, target)})
    finally:
        if tmp is not None:
            tmp.cleanup()
