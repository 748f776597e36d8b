"""The Colab notebook (notebooks/posezoo_quickstart.ipynb), executed end to end with nbclient on
a real Python kernel: a zoo model by species, a real openfield clip, trajectories, the labelled
video inline, a real `bentoml serve` through the client, and a fine-tune from real labelled
frames. A broken notebook fails here."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import OPENFIELD_VIDEO, REPO

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("nbclient", "nbformat", "ipykernel", "torch")),
    reason="the notebook test needs nbclient, nbformat, ipykernel and the train extra")
NOTEBOOK = REPO / "notebooks" / "posezoo_quickstart.ipynb"


def _clip(dst, n: int = 45):
    import av

    with av.open(str(OPENFIELD_VIDEO)) as src, av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        for i, frame in enumerate(src.decode(video=0)):
            if i == 0:
                stream.width, stream.height, stream.pix_fmt = frame.width, frame.height, "yuv420p"
            for packet in stream.encode(frame.reformat(format="yuv420p")):
                out.mux(packet)
            if i == n - 1:
                break
        for packet in stream.encode():
            out.mux(packet)
    return dst


def test_the_notebook_source_writes_the_committed_notebook(tmp_path):
    """The .ipynb is generated from notebooks/make_quickstart.py: they must not drift apart."""
    import shutil
    import subprocess
    import sys

    shutil.copy(REPO / "notebooks" / "make_quickstart.py", tmp_path / "make_quickstart.py")
    subprocess.run([sys.executable, str(tmp_path / "make_quickstart.py")], check=True, timeout=60)
    assert json.loads((tmp_path / "posezoo_quickstart.ipynb").read_text()) == json.loads(NOTEBOOK.read_text())


def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from test_labelled import make_copy
    from test_service import KEYS, key_env, start_server

    video = _clip(tmp_path / "openfield_clip.mp4")
    labelled = make_copy(tmp_path / "project", range(8)).parent
    srv = start_server(tmp_path / "data", key_env(workers=1, threads=2))
    try:
        for k, v in {"POSEZOO_NOTEBOOK_VIDEO": str(video), "POSEZOO_NOTEBOOK_LABELLED": str(labelled),
                     "POSEZOO_URL": srv.url, "POSEZOO_API_KEY": KEYS["alice"], "POSEZOO_NOTEBOOK_MAX_FRAMES": "45",
                     "POSEZOO_NOTEBOOK_STEPS": "3"}.items():
            monkeypatch.setenv(k, v)
        nb = nbformat.read(NOTEBOOK, as_version=4)
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        srv.stop()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "recommended for a top-view mouse: posezoo_mouse@" in text
    assert "45 frames, 4 keypoints" in text
    assert "succeeded - 45 frames" in text
    assert "trained my_mouse@1.0.0" in text and "10 frames with my model" in text
    kinds = [set(o.get("data", {})) for c in nb.cells for o in c.get("outputs", [])]
    assert any("image/png" in k for k in kinds)  # the trajectories
    html = [o["data"]["text/html"] for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert any("<video" in h and "base64" in h for h in html)  # the labelled video, inline
    assert "DLC_posezoo_mouse_1.4.0.h5" in text  # DeepLabCut's <video><scorer> names
    assert next((tmp_path / "posezoo_out").glob("*DLC_posezoo_mouse_1.4.0_labeled.mp4")).stat().st_size > 0
