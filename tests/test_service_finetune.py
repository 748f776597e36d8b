"""Fine-tune jobs through a real `bentoml serve` on 127.0.0.1: a zip of real openfield labelled
frames -> a few training steps -> a model registered for one API key only -> a video job with
it; malicious and malformed zips refused with 4xx; cancel; restart recovery; no temp files."""

from __future__ import annotations

import importlib.util
import io
import stat
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from conftest import TINY
from test_labelled import make_copy
from test_service import KEYS, MB, assert_error, auth, key_env, start_server, wait_job

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="fine-tuning needs PyTorch")

FAST = {"base_model": TINY, "init": "imagenet", "steps": 3, "batch_size": 2, "head_width": 16}


def zip_dir(folder: Path, dest: Path, prefix: str = "labeled-data/m4s1") -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"{prefix}/{f.name}")
    return dest


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """6 real openfield frames and their labels (a trimmed CollectedData csv), outside the repository."""
    return make_copy(tmp_path_factory.mktemp("ft-project"), range(6)).parent


@pytest.fixture(scope="module")
def good_zip(labelled, tmp_path_factory) -> Path:
    return zip_dir(labelled, tmp_path_factory.mktemp("ft-zip") / "m4s1.zip")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("service-ft")
    srv = start_server(d / "data", key_env(threads=1, finetune_threads=2, max_finetune_members=50,
                                           max_finetune_bytes=8 * MB, max_finetune_steps=200))
    yield srv
    srv.stop()


def post_zip(server, content: bytes, who: str = "alice", **params) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/finetune", headers={**auth(who), "Content-Type": "application/zip"},
                      params={**FAST, **params}, content=content, timeout=60)


def assert_clean(server) -> None:
    for d in ("uploads", "work"):
        left = list((server.data_dir / d).iterdir())
        assert not left, (d, left)


def test_finetune_registers_a_model_for_that_key_only(server, good_zip, tmp_path):
    from posezoo.client import Client
    from posezoo.synthetic import make_mouse_video

    t0 = time.perf_counter()
    with Client(server.url, api_key=KEYS["alice"], progress=False) as client:
        job = client.finetune(good_zip, wait=False, **FAST)
        assert job["kind"] == "finetune" and job["status"] in ("queued", "running") and job["progress"]["steps_total"] == 3
        assert job["source"]["frames"] == 6 and job["source"]["test_frames"] == 1
        stages, lines = [], []
        for doc in client.events(job["id"], interval=0.1):  # the NDJSON feed
            lines.append(doc)
            if doc["progress"]["stage"] not in stages:
                stages.append(doc["progress"]["stage"])
    job = lines[-1]
    assert job["status"] == "succeeded", job
    print(f"fine-tune job: {time.perf_counter() - t0:.1f} s, stages {stages}")
    assert "training" in stages and stages[-1] == "done"
    assert job["progress"]["step"] == 3 and job["progress"]["loss"] is not None
    ref = job["output_model"]
    assert ref == f"{TINY}-ft@1.0.0"
    test = job["metrics"]["test"]
    assert test["overall"]["n"] == 4 and set(test) == {"overall", "snout", "leftear", "rightear", "tailbase"}
    assert {"mean_px", "rmse_px", "pck@5", "pck@10"} <= set(test["overall"])
    meta = httpx.get(f"{server.url}{job['results']['meta']}", headers=auth()).json()
    assert meta["model"] == ref and meta["card"]["training"]["base_model"] == f"{TINY}@0.1.0"

    # visible to alice only
    mine = {m["ref"]: m for m in httpx.get(f"{server.url}/v1/models", headers=auth()).json()}
    assert ref in mine and mine[ref]["ready"] and mine[ref]["owner"] == "alice"
    assert ref not in {m["ref"] for m in httpx.get(f"{server.url}/v1/models", headers=auth("bob")).json()}
    assert httpx.get(f"{server.url}/v1/models/{ref}", headers=auth()).json()["training"]["service_job"] == job["id"]
    assert_error(httpx.get(f"{server.url}/v1/models/{ref}", headers=auth("bob")), 404, "unknown_model")

    # a video job of alice's with it; bob cannot name it
    video = tmp_path / "mouse.mp4"
    make_mouse_video(video, 20, 320, 240, 30.0, seed=1)
    r = httpx.post(f"{server.url}/v1/jobs", headers={**auth(), "Content-Type": "video/mp4"},
                   params={"model": ref, "formats": "h5"}, content=video.read_bytes())
    assert r.status_code == 202, r.text
    done = wait_job(server, r.json()["id"])
    assert done["status"] == "succeeded" and done["model"] == ref and done["n_frames"] == 20, done
    assert_error(httpx.post(f"{server.url}/v1/jobs", headers={**auth("bob"), "Content-Type": "video/mp4"},
                            params={"model": ref}, content=video.read_bytes()), 404, "unknown_model")
    # the same name@version again: 409
    assert_error(post_zip(server, good_zip.read_bytes(), version="1.0.0"), 409, "conflict")
    time.sleep(0.3)
    assert_clean(server)


def _zip(members: dict[str, bytes], *, symlink: str | None = None, compress=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as z:
        for name, data in members.items():
            z.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return buf.getvalue()


def test_malicious_and_malformed_zips_are_4xx_and_the_server_keeps_serving(server, labelled, good_zip):
    frames = {f"labeled-data/m4s1/{p.name}": p.read_bytes() for p in sorted(labelled.glob("*.png"))}
    csv = (labelled / "CollectedData_Pranav.csv").read_text()
    good = {**frames, "labeled-data/m4s1/CollectedData_Pranav.csv": csv.encode()}
    lines = csv.splitlines()
    renamed = "\n".join([lines[0], lines[1].replace("tailbase", "tail"), *lines[2:]]) + "\n"
    cells = lines[4].split(",")
    cells[3] = "abc"
    bad_value = "\n".join([*lines[:4], ",".join(cells), *lines[5:]]) + "\n"
    cases = {
        "zip-slip": (_zip({**good, "../../evil.png": b"x"}), 400, "unsafe_archive", "'..'"),
        "absolute": (_zip({**good, "/tmp/evil.png": b"x"}), 400, "unsafe_archive", "absolute"),
        "symlink": (_zip(good, symlink="labeled-data/m4s1/link.png"), 400, "unsafe_archive", "symlink"),
        "bomb": (_zip({**good, "labeled-data/m4s1/big.png": b"\0" * (30 * MB)}), 422, "unsafe_archive", "zip bomb"),
        "members": (_zip({f"f{i}.png": b"x" for i in range(60)}), 413, "too_large", "members"),
        "not a zip": (b"this is not a zip file" * 10, 422, "invalid_archive", "not a zip"),
        "empty": (b"", 422, "invalid_archive", "empty"),
        "no labels": (_zip(frames), 422, "no_labelled_data", "CollectedData"),
        "h5 only": (_zip({**frames, "labeled-data/m4s1/CollectedData_x.h5": b"\x89HDF"}), 422,
                    "invalid_labelled_data", ".csv"),
        "keypoints": (_zip({**frames, "labeled-data/m4s1/CollectedData_Pranav.csv": renamed.encode()}), 422,
                      "invalid_labelled_data", "labeled-data/m4s1/CollectedData_Pranav.csv: row 2 (bodyparts): "
                                               "keypoints ['tail'] are not in the model card"),
        "bad value": (_zip({**frames, "labeled-data/m4s1/CollectedData_Pranav.csv": bad_value.encode()}), 422,
                      "invalid_labelled_data", "CollectedData_Pranav.csv: row 5"),
    }
    for what, (body, status, code, needle) in cases.items():
        body_ = assert_error(post_zip(server, body), status, code, needle)
        assert str(server.data_dir) not in body_["detail"], (what, body_)
    # options and limits
    assert_error(post_zip(server, good_zip.read_bytes(), steps=500), 422, "bad_options", "limit of 200")
    assert_error(post_zip(server, good_zip.read_bytes(), base_model="nope"), 404, "unknown_model")
    assert_error(post_zip(server, good_zip.read_bytes(), name="Bad Name"), 422, "bad_options")
    assert_error(post_zip(server, b"\0" * (9 * MB)), 413, "too_large")
    assert_error(post_zip(server, good_zip.read_bytes(), who=None), 401)
    assert_error(httpx.post(f"{server.url}/v1/finetune", headers={**auth(), "Content-Type": "application/json"},
                            content=b"{}"), 415)
    # still serving, nothing left behind, nothing registered
    info = httpx.get(f"{server.url}/v1/server", headers=auth()).json()
    assert info["finetune"]["status"] == "available" and info["finetune"]["queued"] == 0, info
    assert info["finetune"]["workers"] == 1 and "queue_size" in info["finetune"]
    time.sleep(0.3)
    assert_clean(server)
    assert {p.parts[-3] for p in (server.data_dir / "catalogs").glob("*/*/*/card.yaml")} <= {f"{TINY}-ft"}


def test_cancel_a_running_finetune_job(server, good_zip):
    r = post_zip(server, good_zip.read_bytes(), steps=200, name="cancelled-model")
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.time() + 60
    while True:
        job = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=auth()).json()
        if job["progress"]["stage"] == "training" and (job["progress"]["step"] or 0) >= 1:
            break
        assert job["status"] in ("queued", "running") and time.time() < deadline, job
        time.sleep(0.1)
    assert httpx.delete(f"{server.url}/v1/jobs/{job_id}", headers=auth()).status_code == 200
    job = wait_job(server, job_id, timeout=30)
    assert job["status"] == "cancelled" and job["output_model"] is None, job
    time.sleep(0.5)
    assert_clean(server)
    assert not (server.data_dir / "catalogs" / "alice" / "cancelled-model").exists()


def test_unavailable_without_torch_and_when_disabled(monkeypatch):
    from service.jobs import finetune
    from service.config import load_settings

    assert "disabled" in finetune.unavailable_reason(load_settings(finetune_enabled=False))
    real = importlib.util.find_spec
    monkeypatch.setattr(finetune.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert "PyTorch is not installed" in finetune.unavailable_reason(load_settings())


def test_interrupted_finetune_jobs_resume_or_fail_with_a_reason(tmp_path, good_zip):
    """After a restart (records left 'running'): a job whose data is there runs again; one whose data
    is gone fails with the reason."""
    import shutil

    from service.jobs import FinetuneOptions, JobManager, JobOptions, JobRecord
    from service.jobs.archive import extract_zip
    from service.config import load_settings

    settings = load_settings(data_dir=tmp_path / "data", finetune_threads=2)
    m = JobManager(settings)
    opts = FinetuneOptions(**FAST)
    recs = []
    for job_id, keep in (("a" * 32, True), ("b" * 32, False)):
        root = m.uploads / job_id / "labelled"
        if keep:
            extract_zip(good_zip, root)
        recs.append(JobRecord(id=job_id, owner="alice", kind="finetune", status="running", attempts=1,
                              options=JobOptions(), finetune=opts, model=f"{TINY}@0.1.0", input_path=str(root),
                              source={"kind": "upload"}))
        m.store.put(recs[-1])
    m.stop()
    m = JobManager(settings).start(warm=False)
    try:
        lost = m.get("b" * 32, "alice")
        assert lost.status == "failed" and "lost in a server restart" in lost.error["detail"]
        deadline = time.time() + 90
        while not (job := m.get("a" * 32, "alice")).terminal:
            assert time.time() < deadline
            time.sleep(0.3)
        assert job.status == "succeeded" and job.output_model == f"{TINY}-ft@1.0.0", job.error
        assert any("resumed after a server restart" in n for n in job.notes) and job.attempts == 2
    finally:
        m.stop()
    assert not list((tmp_path / "data" / "uploads").iterdir()) and not list((tmp_path / "data" / "work").iterdir())
    shutil.rmtree(tmp_path / "data", ignore_errors=True)
