"""Write a trained model's card and publish its files into a zoo store.

Stores (``store`` argument of :func:`register`):

* a directory: a catalog laid out ``<dir>/<name>/<version>/card.yaml`` with the ONNX
  beside the card (artefact location ``local``) -- e.g. the repository's ``models/``;
* ``file:///dir``: the files go flat into ``dir`` (a Hub-repo-like layout on disk),
  the card into ``catalog``;
* ``s3://bucket/prefix``: uploaded with boto3 (``POSEZOO_S3_ENDPOINT`` honoured) to
  ``prefix/<name>/<version>/``, the card into ``catalog``;
* ``hf://org/repo``: uploaded with ``huggingface_hub.HfApi`` (injectable, so tests
  use a mock), pinned to the commit it created; the card into ``catalog``.

Nothing here needs PyTorch.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

from ..cards import Artefact, ModelCard
from ..errors import PosezooError
from ..zoo import CARD_FILE, Zoo, sha256_file


def with_artefact(card: ModelCard, onnx_path: Path, locations: list[str], revision: str | None = None) -> ModelCard:
    """``card`` with its artefact pointing at ``onnx_path``'s name, sha256 and size."""
    art = Artefact(locations=locations, revision=revision, filename=onnx_path.name,
                   sha256=sha256_file(onnx_path), bytes=onnx_path.stat().st_size)
    return card.model_copy(update={"artefact": art})


def _copy(files: list[Path], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for f in files:
        if f.resolve() != (directory / f.name).resolve():
            shutil.copyfile(f, directory / f.name)


def register(card: ModelCard, onnx_path: str | Path, store: str | Path, *, extra_files: list[Path] = (),
             catalog: str | Path | None = None, hf_api=None, s3_client=None) -> Path:
    """Publish ``onnx_path`` (and ``extra_files``) and write the card.

    Parameters
    ----------
    card : ModelCard
        Everything but the artefact, which is filled in here.
    onnx_path : path
    store : path or URL
        See the module docstring.
    extra_files : list of path
        Published beside the ONNX (e.g. the fine-tuning checkpoint).
    catalog : path, optional
        Catalog directory for the card when the store is remote or ``file://``
        (required then).
    hf_api : huggingface_hub.HfApi, optional
    s3_client : boto3 S3 client, optional

    Returns
    -------
    Path
        The written ``card.yaml``.
    """
    onnx_path = Path(onnx_path)
    files = [onnx_path, *map(Path, extra_files)]
    text = str(store)
    scheme = urlparse(text).scheme if "://" in text else ""
    if not scheme:
        directory = Path(store) / card.name / card.version
        _copy(files, directory)
        final = with_artefact(card, directory / onnx_path.name, ["local"])
        return final.to_yaml(directory / CARD_FILE)
    if catalog is None:
        raise PosezooError(f"publishing to {text} needs a catalog directory for the card (--catalog)")
    card_dir = Path(catalog) / card.name / card.version
    url = urlparse(text)
    revision = None
    if scheme == "file":
        _copy(files, Path(url.path))
        location = text
    elif scheme == "s3":
        prefix = "/".join(p for p in (url.path.strip("/"), card.name, card.version) if p)
        client = s3_client or Zoo().s3_client()
        for f in files:
            client.upload_file(str(f), url.netloc, f"{prefix}/{f.name}")
        location = f"s3://{url.netloc}/{prefix}"
    elif scheme == "hf":
        repo_id = f"{url.netloc}{url.path}".strip("/")
        if hf_api is None:
            from huggingface_hub import HfApi

            hf_api = HfApi()
        info = None
        for f in files:
            info = hf_api.upload_file(path_or_fileobj=str(f), path_in_repo=f.name, repo_id=repo_id,
                                      commit_message=f"posezoo: {card.ref} {f.name}")
        revision = getattr(info, "oid", None)
        location = f"hf://{repo_id}"
    else:
        raise PosezooError(f"unsupported store {text!r}: use a directory, file://, s3:// or hf://")
    final = with_artefact(card, onnx_path, [location], revision)
    path = final.to_yaml(card_dir / CARD_FILE)
    if scheme == "s3":
        client.upload_file(str(path), url.netloc, f"{prefix}/{CARD_FILE}")
    return path
