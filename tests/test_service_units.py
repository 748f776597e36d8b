"""The service's library parts without a server: settings, API keys, address checks,
streaming uploads, the job store and video validation."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys

import pytest

from posezoo.errors import PosezooError, TruncatedVideoError, VideoError
from service.jobs import (
    ApiKeys,
    AuthError,
    JobOptions,
    JobRecord,
    JobStore,
    SourceError,
    UploadError,
    check_declared_length,
    check_public_host,
    receive_multipart,
    receive_raw,
    redact_url,
    validate_video,
)
from service.config import hash_api_key, load_settings


def test_settings_from_environment_and_file(tmp_path, monkeypatch):
    digest = hash_api_key("k1")
    cfg = tmp_path / "service.yaml"
    cfg.write_text(f"workers: 3\nqueue_size: 7\napi_keys: {{alice: {digest}}}\nresults_s3_uri: s3://b/p\n")
    monkeypatch.setenv("POSEZOO_SERVICE_CONFIG", str(cfg))
    monkeypatch.setenv("POSEZOO_SERVICE_QUEUE_SIZE", "9")  # the environment wins over the file
    s = load_settings()
    assert (s.workers, s.queue_size, s.api_keys, s.results_s3_uri) == (3, 9, {"alice": digest}, "s3://b/p")
    assert s.public_dict()["api_keys"] == ["alice"] and digest not in json.dumps(s.public_dict())
    monkeypatch.setenv("POSEZOO_SERVICE_API_KEYS", json.dumps({"bob": "plain-text-key"}))
    with pytest.raises(PosezooError, match="sha256 hex digest"):
        load_settings()
    monkeypatch.delenv("POSEZOO_SERVICE_API_KEYS")
    cfg.write_text("wrokers: 2\n")
    with pytest.raises(PosezooError, match="unknown service setting"):
        load_settings()


def test_cli_hash_key_matches_the_configuration():
    r = subprocess.run([sys.executable, "-m", "posezoo", "remote", "hash-key", "s3cret"], capture_output=True,
                       text=True, check=True)
    assert r.stdout.strip() == hash_api_key("s3cret") == hashlib.sha256(b"s3cret").hexdigest()


def test_api_keys():
    keys = ApiKeys({"alice": hash_api_key("a-key"), "bob": hash_api_key("b-key")})
    assert keys.owner("Bearer a-key") == "alice" and keys.owner("bearer  b-key") == "bob"
    for header, code in ((None, "missing_api_key"), ("", "missing_api_key"), ("Bearer nope", "invalid_api_key"),
                         ("Basic a-key", "invalid_api_key"), ("Bearer ", "invalid_api_key")):
        with pytest.raises(AuthError) as e:
            keys.owner(header)
        assert e.value.code == code
    anon = ApiKeys({}, allow_anonymous=True)
    assert anon.owner(None) == "anonymous"
    with pytest.raises(AuthError):
        anon.owner("Bearer wrong")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.0.0.1", "192.168.1.1", "172.16.0.5", "169.254.169.254",
                                  "::1", "0.0.0.0", "100.64.0.1", "::ffff:127.0.0.1", "fd00::1"])
def test_private_addresses_are_refused(host):
    with pytest.raises(SourceError) as e:
        check_public_host(host, 443)
    assert e.value.status == 403 and "refused" in str(e.value)


def test_public_address_is_accepted_and_urls_are_redacted():
    assert check_public_host("8.8.8.8", 443) == ["8.8.8.8"]
    assert redact_url("https://user:pw@example.org:8443/v.mp4?X-Amz-Signature=abc#f") == "https://example.org:8443/v.mp4"


async def _chunks(parts):
    for p in parts:
        yield p


def test_raw_upload_streams_and_enforces_the_limit(tmp_path):
    dest = tmp_path / "u.bin"
    assert asyncio.run(receive_raw(_chunks([b"a" * 1000] * 5), dest, 5000)) == 5000
    assert dest.read_bytes() == b"a" * 5000
    with pytest.raises(UploadError) as e:
        asyncio.run(receive_raw(_chunks([b"a" * 1000] * 6), dest, 5000))
    assert e.value.status == 413 and not dest.exists()
    with pytest.raises(UploadError) as e:
        check_declared_length({"content-length": "5001"}, 5000)
    assert e.value.status == 413
    assert check_declared_length({"content-length": "5000"}, 5000) == 5000 and check_declared_length({}, 1) is None
    with pytest.raises(UploadError):
        check_declared_length({"content-length": "lots"}, 5000)


def test_multipart_upload_streams_fields_and_file(tmp_path):
    import httpx

    req = httpx.Request("POST", "http://x/", data={"model": "m", "formats": "h5,csv"},
                        files={"video": ("clip.mp4", b"\x00\x01" * 300_000, "video/mp4")})
    body = req.read()
    chunks = [body[i:i + 7777] for i in range(0, len(body), 7777)]  # boundaries split anywhere
    dest = tmp_path / "v.bin"
    up = asyncio.run(receive_multipart(_chunks(chunks), req.headers["content-type"], dest, 1 << 20))
    assert up.fields == {"model": "m", "formats": "h5,csv"} and up.filename == "clip.mp4"
    assert up.file_bytes == 600_000 and dest.read_bytes() == b"\x00\x01" * 300_000
    with pytest.raises(UploadError) as e:
        asyncio.run(receive_multipart(_chunks(chunks), req.headers["content-type"], dest, 100_000))
    assert e.value.status == 413 and not dest.exists()
    with pytest.raises(UploadError) as e:  # cut short inside the file part
        asyncio.run(receive_multipart(_chunks(chunks[: len(chunks) // 2]), req.headers["content-type"], dest, 1 << 20))
    assert e.value.status == 400 and not dest.exists()
    with pytest.raises(UploadError) as e:
        asyncio.run(receive_multipart(_chunks([b"x"]), "multipart/form-data", dest, 10))
    assert e.value.status == 415


def test_job_store_survives_reopening(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    rec = JobRecord(id="a" * 32, owner="alice", options=JobOptions(formats="h5, csv"), model="m@1")
    store.put(rec)
    rec.status = "running"
    rec.progress.frames_done = 10
    store.put(rec)
    store.put(JobRecord(id="b" * 32, owner="bob", options=JobOptions(), model="m@1", status="succeeded"))
    store.close()
    again = JobStore(tmp_path / "jobs.sqlite")
    got = again.get("a" * 32)
    assert got.status == "running" and got.progress.frames_done == 10 and got.options.formats == ["h5", "csv"]
    assert [r.id for r in again.list(owner="alice")] == ["a" * 32]
    assert [r.id for r in again.list(statuses=["succeeded"])] == ["b" * 32]
    assert again.get("c" * 32) is None


def test_job_options_validation():
    with pytest.raises(ValueError, match="xls"):
        JobOptions(formats="h5,xls")
    with pytest.raises(ValueError):
        JobOptions(batch_size=0)
    with pytest.raises(ValueError):
        JobOptions(unknown=1)
    assert JobOptions(formats=["h5,csv", "h5"]).formats == ["h5", "csv"]


def test_validate_video(mouse_video, tmp_path):
    path, truth = mouse_video
    assert validate_video(path)["n_frames"] == len(truth)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedVideoError):
        validate_video(cut)
    text = tmp_path / "t.mp4"
    text.write_text("not a video\n" * 100)
    with pytest.raises(VideoError):
        validate_video(text)


def test_validate_video_limits_and_allow_truncated(mouse_video, tmp_path):
    path, truth = mouse_video  # 320x240
    with pytest.raises(SourceError, match="MAX_VIDEO_PIXELS") as exc:
        validate_video(path, max_pixels=320 * 240 - 1)
    assert exc.value.status == 413
    assert validate_video(path, max_pixels=320 * 240)["truncated"] is None
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert "truncated" in validate_video(cut, allow_truncated=True)["truncated"]


def test_unknown_settings_in_the_environment_are_refused(monkeypatch):
    monkeypatch.setenv("POSEZOO_SERVICE_INPUT_BUCKET", '["videos"]')
    with pytest.raises(PosezooError, match="did you mean POSEZOO_SERVICE_INPUT_BUCKETS"):
        load_settings()
    monkeypatch.delenv("POSEZOO_SERVICE_INPUT_BUCKET")
    monkeypatch.setenv("POSEZOO_SERVICE_INPUT_BUCKETS", '["videos"]')
    assert load_settings().input_buckets == ["videos"]
    assert load_settings(workers=1, queue_size=4).key_share == 3
    assert load_settings(workers=1, queue_size=0).key_share == 1


def test_filter_options_are_checked_as_the_filter_applies_them():
    import numpy as np

    from posezoo.filtering import filter_poses

    for kw in ({"filter": "savgol", "filter_window": 4}, {"filter": "median", "filter_window": 2}):
        with pytest.raises(ValueError, match="odd"):
            JobOptions(**kw)
    JobOptions(filter="savgol", filter_window=3)
    data = np.random.default_rng(0).random((2, 1, 4, 3)).astype(np.float32)  # shorter than the window
    assert np.array_equal(filter_poses(data, "savgol", 5), data)


@pytest.mark.parametrize("uri, canonical", [
    ("s3://b/k.mp4", "s3://b/k.mp4"), ("S3://B//x//k.mp4", "s3://b/x/k.mp4"), ("s3://b/x/", "s3://b/x"),
    ("https://example.org/v.mp4?sig=1", "https://example.org/v.mp4?sig=1"),
])
def test_source_uris_are_normalised_before_checks(uri, canonical):
    from service.jobs.storage import normalise_source_uri

    assert normalise_source_uri(uri) == canonical


@pytest.mark.parametrize("uri", ["s3://b/../k", "s3://b/./k", "s3:///k", "s3://b/k\nx", "s3://b/k?x=1"])
def test_bad_source_uris_are_refused(uri):
    from service.jobs.storage import normalise_source_uri

    with pytest.raises(SourceError):
        normalise_source_uri(uri)


def test_results_store_recognises_its_own_keys(tmp_path):
    from service.jobs import ResultStore

    store = ResultStore(tmp_path, "s3://res/out", s3=object())
    assert store.holds("s3://res/out/j/x.mp4") and store.holds("s3://res/out")
    assert not store.holds("s3://res/outside/x.mp4") and not store.holds("s3://other/out/x")


def test_file_names_are_checked():
    from service.jobs import check_filename

    assert check_filename("dir/sub\\video.mp4") == "video.mp4" and check_filename("..") is None
    for bad in ("a\x00b.mp4", "a\nb.mp4", "x" * 201):
        with pytest.raises(UploadError) as exc:
            check_filename(bad)
        assert exc.value.status == 422 and exc.value.code == "bad_filename"


def test_uploads_that_stall_or_trickle_are_cut_off():
    from service.jobs import paced

    async def trickle(pause: float, n: int):
        for _ in range(n):
            await asyncio.sleep(pause)
            yield b"x"

    async def drain(gen):
        return [c async for c in gen]

    assert len(asyncio.run(drain(paced(trickle(0.01, 5), idle_timeout_s=1)))) == 5
    with pytest.raises(UploadError, match="stalled") as exc:
        asyncio.run(drain(paced(trickle(0.5, 2), idle_timeout_s=0.2)))
    assert exc.value.status == 408
    with pytest.raises(UploadError, match="too slow"):
        asyncio.run(drain(paced(trickle(0.05, 20), idle_timeout_s=1, min_rate=1000, grace_s=0.2)))


def test_pixel_budget_lets_one_oversized_request_through_alone():
    import threading

    from service.jobs.manager import _Budget

    b = _Budget(100)
    assert b.acquire(60, timeout=0) and not b.acquire(60, timeout=0.05)
    released = threading.Timer(0.1, b.release, (60,))
    released.start()
    assert b.acquire(500, timeout=2)  # waits for the first, then takes the whole budget
    b.release(500)
    assert b.used == 0


def test_database_url_needs_shared_storage():
    from posezoo.errors import PosezooError
    from service.config import load_settings

    with pytest.raises(PosezooError, match="database_url needs results_s3_uri"):
        load_settings(database_url="postgresql://posezoo@db:5432/posezoo")
    with pytest.raises(PosezooError, match="DATABASE_URL"):
        load_settings(database_url="mysql://db/posezoo", results_s3_uri="s3://b/p")
    s = load_settings(database_url="postgresql://posezoo@db:5432/posezoo", results_s3_uri="s3://b/p",
                      replica_id="a")
    assert s.replica == "a" and s.lease_s == 30


def test_the_bento_holds_the_whole_service(tmp_path):
    """`bentoml build` packs every module the service imports (service/jobs moved out of posezoo/
    once; a bento without it starts nowhere), and no benchmark or test."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", "-o", "tag"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (src,) = (tmp_path / "home" / "bentos" / "posezoo").glob("*/src")
    packed = {p.relative_to(src).as_posix() for p in src.rglob("*.py")}
    wanted = {p.relative_to(REPO).as_posix() for d in ("service", "posezoo") for p in (REPO / d).rglob("*.py")
              if not p.name.startswith("bench_")}
    assert wanted <= packed, sorted(wanted - packed)
    assert not any(p.startswith("tests/") or "/bench_" in p for p in packed)
    # the packed service imports from the bento's own copy
    r = subprocess.run([sys.executable, "-c", "import service.jobs.cluster, service.jobs.pg_store, service.app"],
                       cwd=src, env={**env, "PYTHONPATH": str(src)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_finetuned_model_is_decoded_as_its_base(tmp_path):
    from posezoo.zoo import Zoo
    from service.jobs.finetune import Plan, child_spec

    zoo = Zoo()
    plan = Plan("CollectedData_x.csv", ["snout", "leftear", "rightear", "tailbase"], 6, 5, ["img0005.png"],
                (640, 480), "base", (300, 400), 3, 2, None)
    for ref, decoding in (("posezoo_mouse@1.4.0", {"test_time_flip": True, "exclusive_radius": 2}),
                          ("posezoo_mouse@1.1.0", {"test_time_flip": False, "exclusive_radius": 0})):
        spec = child_spec(plan, tmp_path, zoo.card(ref), "m", "0.0.1", tmp_path, zoo, 1, 0, "job")
        assert spec["decoding"] == decoding and spec["base"] == ref
        json.dumps(spec)  # it travels to the child as JSON
