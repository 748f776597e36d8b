import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, make_hf_cache
from posezoo import Zoo
from posezoo.cards import ModelCard
from posezoo.errors import (
    ArtefactNotPublishedError,
    ChecksumMismatchError,
    InvalidCardError,
    ModelNotCachedError,
    UnknownModelError,
)
from posezoo.zoo import sha256_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _edit_card(card_dir: Path, **changes) -> Path:
    path = card_dir / "card.yaml"
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    path.write_text(yaml.safe_dump(data))
    return path


def test_catalog_lists_the_requested_zoo_with_real_keypoint_names():
    zoo = Zoo()
    names = {c.name for c in zoo.cards()}
    for expected in ("superanimal_quadruped", "superanimal_topviewmouse", "primate_face", "full_dog",
                     "horse_sideview", TINY):
        assert expected in names
    quad, mouse = zoo.card("superanimal_quadruped"), zoo.card("superanimal_topviewmouse")
    assert quad.n_keypoints == 39 and quad.keypoints[:3] == ["nose", "upper_jaw", "lower_jaw"]
    assert mouse.n_keypoints == 27 and "tail_base" in mouse.keypoints
    assert quad.upstream.repo_id == "mwmathis/DeepLabCutModelZoo-SuperAnimal-Quadruped"
    assert quad.upstream.filename == "superanimal_quadruped_hrnet_w32.pt"
    assert zoo.card(quad.detector).task == "detector"
    # aliases: the species a user asks for
    assert zoo.card("dog").name == zoo.card("horse").name == "superanimal_quadruped"
    assert zoo.card("mouse").name == "superanimal_topviewmouse"
    assert zoo.card("primate").name == "primate_face"
    for card in zoo.cards():
        assert card.licence and card.upstream is not None


def test_unknown_names_suggest_close_ones():
    with pytest.raises(UnknownModelError) as err:
        Zoo().resolve("superanimal_quadrupd")
    assert "superanimal_quadruped" in str(err.value) and "superanimal_quadruped" in err.value.suggestions
    with pytest.raises(UnknownModelError, match="no version '9.9'"):
        Zoo().resolve(f"{TINY}@9.9")


def test_unpublished_artefact_says_so():
    with pytest.raises(ArtefactNotPublishedError, match="not published yet.*superanimal_quadruped_hrnet_w32.pt"):
        Zoo().resolve("superanimal_quadruped")


def test_local_resolution_verifies_and_picks_newest_version(tiny_card_dir):
    catalog = tiny_card_dir.parents[1]
    newer = catalog / TINY / "0.10.0"
    newer.mkdir()
    (newer / "posezoo_tiny_mouse.onnx").write_bytes((tiny_card_dir / "posezoo_tiny_mouse.onnx").read_bytes())
    (newer / "card.yaml").write_text((tiny_card_dir / "card.yaml").read_text().replace("version: 0.1.0", "version: 0.10.0"))
    zoo = Zoo([catalog], include_bundled=False)
    assert zoo.resolve(TINY).card.version == "0.10.0"  # 0.10 > 0.9 > 0.1: versions, not strings
    resolved = zoo.resolve(f"{TINY}@0.1.0")
    assert resolved.path == tiny_card_dir / "posezoo_tiny_mouse.onnx" and resolved.source.startswith("local:")
    # a card file can be used directly too
    assert Zoo(include_bundled=False).resolve(str(tiny_card_dir / "card.yaml")).card.name == TINY


def test_checksum_mismatch_refuses_to_load(tiny_card_dir):
    onnx_path = tiny_card_dir / "posezoo_tiny_mouse.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    with pytest.raises(ChecksumMismatchError, match="refusing to load"):
        Zoo([tiny_card_dir.parents[1]], include_bundled=False).resolve(TINY)


def test_invalid_card_names_file_and_field(tiny_card_dir):
    path = _edit_card(tiny_card_dir, **{"input.colour_order": "CMYK"})
    with pytest.raises(InvalidCardError, match=r"card.yaml: invalid model card at input.colour_order"):
        ModelCard.from_yaml(path)
    path = _edit_card(tiny_card_dir, **{"input.colour_order": "RGB", "skeleton": [["snout", "tail_end"]]})
    with pytest.raises(InvalidCardError, match="unknown keypoint"):
        ModelCard.from_yaml(path)


def test_huggingface_cache_offline(tiny_card_dir, tmp_path):
    onnx_path = tiny_card_dir / "posezoo_tiny_mouse.onnx"
    cache = make_hf_cache(tmp_path / "hf", "posezoo-test/zoo", COMMIT, {"posezoo_tiny_mouse.onnx": onnx_path})
    _edit_card(tiny_card_dir, **{"artefact.locations": ["hf://posezoo-test/zoo"], "artefact.revision": COMMIT})
    onnx_path.unlink()  # only the Hub cache has it now
    zoo = Zoo([tiny_card_dir.parents[1]], include_bundled=False, hf_cache_dir=cache)
    resolved = zoo.resolve(TINY)
    assert resolved.path.read_bytes()[:4] and resolved.source == f"hf://posezoo-test/zoo@{COMMIT}"
    assert sha256_file(resolved.path) == zoo.card(TINY).artefact.sha256
    # a revision that is not cached: an actionable error, not a network attempt
    _edit_card(tiny_card_dir, **{"artefact.revision": "f" * 40})
    with pytest.raises(ModelNotCachedError, match="posezoo zoo pull"):
        Zoo([tiny_card_dir.parents[1]], include_bundled=False, hf_cache_dir=cache).resolve(TINY)


def test_zoo_pull_cli_offline_from_hf_cache(tiny_card_dir, tmp_path):
    onnx_path = tiny_card_dir / "posezoo_tiny_mouse.onnx"
    cache = make_hf_cache(tmp_path / "hf", "posezoo-test/zoo", COMMIT, {"posezoo_tiny_mouse.onnx": onnx_path})
    _edit_card(tiny_card_dir, **{"artefact.locations": ["hf://posezoo-test/zoo"], "artefact.revision": COMMIT})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "POSEZOO_CATALOG": str(tiny_card_dir.parents[1])}
    ok = subprocess.run([sys.executable, "-m", "posezoo", "zoo", "pull", TINY], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "sha256 verified" in ok.stdout and str(cache) in ok.stdout
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    bad = subprocess.run([sys.executable, "-m", "posezoo", "zoo", "pull", TINY], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and "not in the Hugging Face cache" in bad.stderr


def test_s3_resolution_against_real_server(s3, tiny_card_dir, tmp_path, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    onnx_path = tiny_card_dir / "posezoo_tiny_mouse.onnx"
    s3.client().upload_file(str(onnx_path), s3.bucket, "zoo/tiny/0.1.0/posezoo_tiny_mouse.onnx")
    _edit_card(tiny_card_dir, **{"artefact.locations": [f"s3://{s3.bucket}/zoo/tiny/0.1.0"]})
    onnx_path.unlink()
    zoo = Zoo([tiny_card_dir.parents[1]], include_bundled=False, cache_dir=tmp_path / "cache")
    resolved = zoo.resolve(TINY)
    assert resolved.path.is_relative_to(tmp_path / "cache") and resolved.source.startswith("s3://")
    # second time: from the cache, even with the server unreachable
    monkeypatch.setenv("POSEZOO_S3_ENDPOINT", "http://127.0.0.1:9")
    zoo2 = Zoo([tiny_card_dir.parents[1]], include_bundled=False, cache_dir=tmp_path / "cache")
    assert zoo2.resolve(TINY).path == resolved.path
    # a tampered object is refused and not cached
    s3.client().put_object(Bucket=s3.bucket, Key="zoo/tiny/0.1.0/posezoo_tiny_mouse.onnx", Body=b"not a model")
    monkeypatch.setenv("POSEZOO_S3_ENDPOINT", s3.endpoint)
    with pytest.raises(ChecksumMismatchError):
        Zoo([tiny_card_dir.parents[1]], include_bundled=False, cache_dir=tmp_path / "cache2").resolve(TINY)
    assert not any((tmp_path / "cache2").rglob("*.onnx"))
    # a missing object is a clear error; S3 is also a mirror: the next location is tried
    _edit_card(tiny_card_dir, **{"artefact.locations": [f"s3://{s3.bucket}/nowhere", f"file://{REPO}/models/{TINY}/0.1.0"]})
    z3 = Zoo([tiny_card_dir.parents[1]], include_bundled=False, cache_dir=tmp_path / "cache3")
    assert z3.resolve(TINY).source.startswith("file:")
    _edit_card(tiny_card_dir, **{"artefact.locations": [f"s3://{s3.bucket}/nowhere"]})
    with pytest.raises(Exception, match="does not exist"):
        Zoo([tiny_card_dir.parents[1]], include_bundled=False, cache_dir=tmp_path / "cache3").resolve(TINY)


def test_tiny_model_is_reproducible(tmp_path):
    from posezoo.synthetic import write_tiny_model_card

    card = write_tiny_model_card(tmp_path)
    committed = ModelCard.from_yaml(REPO / "models" / TINY / "0.1.0" / "card.yaml")
    assert card.artefact.sha256 == committed.artefact.sha256


def test_the_library_never_imports_the_conversion_package():
    """posezoo is the lower layer: the on-demand converter is found through the
    ``posezoo.converters`` entry point that the conversion package registers."""
    import re

    from conftest import REPO
    from posezoo.zoo import converters

    for path in (REPO / "posezoo").rglob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+conversion\b", path.read_text(), re.M), path
    from conversion.pull import convert_into_cache

    assert converters() == [convert_into_cache]


def test_the_library_holds_no_service_or_job_code():
    """The job machinery and the service's settings live in service/ (HTTP, queues, stores);
    the installable library imports none of it, nor the web stack, in any module."""
    import re
    import subprocess
    import sys

    from conftest import REPO

    assert not (REPO / "posezoo" / "jobs").exists() and not (REPO / "posezoo" / "service_config.py").exists()
    for path in (REPO / "posezoo").rglob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+(service|bentoml|fastapi|starlette)\b", path.read_text(), re.M), path
    modules = [p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
               for p in (REPO / "posezoo").rglob("*.py") if p.name != "__main__.py"
               and "training" not in p.parts]  # training needs torch; checked by the grep above
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'service', 'bentoml', 'fastapi', 'starlette'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO / "tests")
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
