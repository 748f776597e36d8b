"""h5 tables are read without running pickled code, and the client never reads an h5 at all.

Every crafted file here holds a pickle that runs ``touch MARKER``; a test passes only when
the marker is still missing afterwards (and, once, that stock pandas does create it, so the
payloads are known to be live).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import pickle
import shlex
import threading
import warnings
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest
import tables

import posezoo
from posezoo import client as client_module
from posezoo.client import Client, InsecureTransportWarning
from posezoo.errors import InputError, UnsafeFileError
from posezoo.labelled import load_labelled
from posezoo.safe_hdf import read_hdf_safely, restricted_unpickling
from posezoo.table import DLC_H5_KEY, PoseTable


class Payload:
    """Pickles as ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path):
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture()
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


@pytest.fixture()
def table() -> PoseTable:
    rng = np.random.default_rng(1)
    data = rng.uniform(0, 100, (4, 1, 2, 3)).astype(np.float32)
    data[1, 0, 1] = np.nan
    return PoseTable(data, ("nose", "tail"), ("animal0",), "model@1.0")


def table_format_with_bad_attribute(table, path: Path, marker: Path, name: str = "non_index_axes") -> Path:
    """posezoo's own h5 (pandas table format) with one of pandas' pickled metadata attributes
    (or a new one) replaced by the payload."""
    table.to_h5(path)
    with tables.open_file(path, "a") as f:
        f.get_node(f"/{DLC_H5_KEY}")._v_attrs[name] = Payload(marker)
    return path


def fixed_format_with_object_column(table, path: Path, marker: Path) -> Path:
    """A DeepLabCut-like table in pandas' fixed format whose first column holds the payload."""
    df = table.to_dataframe()
    first = df.columns[0]
    df[first] = df[first].astype(object)
    df.loc[0, first] = Payload(marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas' PerformanceWarning about pickling objects
        df.to_hdf(path, key=DLC_H5_KEY, mode="w", format="fixed")
    return path


def crafted_files(table, tmp_path, marker) -> list[Path]:
    return [
        table_format_with_bad_attribute(table, tmp_path / "axes.h5", marker),
        # an attribute pandas never uses: PyTables still unpickles it, and the read "succeeds"
        table_format_with_bad_attribute(table, tmp_path / "extra.h5", marker, name="note"),
        fixed_format_with_object_column(table, tmp_path / "fixed.h5", marker),
    ]


# -- the crafted files ---------------------------------------------------------------------
def test_the_payloads_are_live_with_stock_pandas(table, tmp_path, marker):
    for path in crafted_files(table, tmp_path, marker):
        with contextlib.suppress(Exception):
            pd.read_hdf(path)
        assert marker.exists(), path.name
        marker.unlink()


@pytest.mark.parametrize("crafted", [0, 1, 2], ids=["table-axes", "table-extra-attr", "fixed-object-column"])
def test_pose_table_load_refuses_pickled_code(table, tmp_path, marker, crafted):
    path = crafted_files(table, tmp_path, marker)[crafted]
    with pytest.raises(UnsafeFileError, match=r"refused to load: .*pickled Python object \(posix\.system\)") as info:
        PoseTable.load(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, InputError) and posezoo.UnsafeFileError is UnsafeFileError
    assert not marker.exists()


@pytest.mark.parametrize("payload, refused", [
    (b"cposix\nsystem\n(S'touch MARKER'\ntR.", "posix.system"),  # protocol 0
    (b"c__builtin__\neval\n(S'1'\ntR.", "builtins.eval"),  # a Python 2 name, mapped as pickle does
    (b"cbuiltins\ngetattr\n.", "builtins.getattr"),
    (b"\x80\x04\x8c\nsubprocess\x94\x8c\x05Popen\x94\x93\x94.", "subprocess.Popen"),  # protocol 4
])
def test_raw_pickled_attribute_is_refused(table, tmp_path, marker, payload, refused):
    path = table.to_h5(tmp_path / "raw.h5")
    with tables.open_file(path, "a") as f:  # stored as bytes: PyTables tries to unpickle it
        f.get_node(f"/{DLC_H5_KEY}")._v_attrs["note"] = np.bytes_(payload.replace(b"MARKER", str(marker).encode()))
    with pytest.raises(UnsafeFileError, match=rf"\({refused}\)"):
        read_hdf_safely(path, DLC_H5_KEY)
    assert not marker.exists()


def test_label_files_are_read_safely(table, tmp_path, marker):
    path = fixed_format_with_object_column(table, tmp_path / "CollectedData_x.h5", marker)
    with pytest.raises(UnsafeFileError, match="posix.system"):
        load_labelled(path, check_images=False)
    assert not marker.exists()


def test_object_columns_are_refused(table, tmp_path):
    df = table.to_dataframe()
    df[df.columns[0]] = "a string"
    df.to_hdf(tmp_path / "strings.h5", key=DLC_H5_KEY, mode="w", format="table")
    with pytest.raises(InputError, match="holds object values: a pose table holds numbers only"):
        PoseTable.load(tmp_path / "strings.h5")


# -- legitimate files ----------------------------------------------------------------------
def test_posezoo_h5_loads_unchanged(table, tmp_path):
    paths = table.save(tmp_path, ["h5"], stem="vid")
    back = PoseTable.load(paths["h5"])
    np.testing.assert_array_equal(back.data, table.data)
    assert (back.keypoints, back.individuals, back.scorer) == (table.keypoints, table.individuals, table.scorer)
    pd.testing.assert_frame_equal(read_hdf_safely(paths["h5"]), pd.read_hdf(paths["h5"]))


@pytest.mark.parametrize("fmt", ["table", "fixed"])
def test_single_animal_deeplabcut_table_loads(table, tmp_path, fmt):
    """DeepLabCut's 3-level single-animal layout (scorer / bodyparts / coords)."""
    df = table.to_dataframe()  # a single-animal table is written with DeepLabCut's 3 levels
    assert df.columns.names == ["scorer", "bodyparts", "coords"]
    df.to_hdf(tmp_path / "dlc.h5", key=DLC_H5_KEY, mode="w", format=fmt)
    back = PoseTable.load(tmp_path / "dlc.h5")
    np.testing.assert_array_equal(back.data, table.data)
    assert back.keypoints == table.keypoints and back.individuals == ("animal0",)


def test_plain_data_unpickles_and_nothing_else(tmp_path):
    """The restricted unpickler builds builtin data and numpy arrays, scalars and dtypes, at
    old and new protocols; a refusal is recorded (PyTables would swallow the exception)."""
    import tables.attributeset

    data = {"list": [1, 2.5, None, "s", b"b"], "set": {1}, "frozen": frozenset("ab"), "complex": 1j,
            "slice": slice(1, 2), "bytearray": bytearray(b"x"), "floats": np.arange(3.0),
            "strings": np.array(["ab"]), "objects": np.array([1, "a", None], dtype=object),
            "scalar": np.float32(2), "text": np.str_("t"), "dtype": np.dtype("f8")}
    with restricted_unpickling() as refused:
        for protocol in (0, 2, 5):
            back = tables.attributeset.pickle.loads(pickle.dumps(data, protocol))
            assert back.keys() == data.keys() and back["list"] == data["list"] and back["set"] == data["set"]
            np.testing.assert_array_equal(back["objects"], data["objects"])
            assert back["dtype"] == data["dtype"] and back["text"] == "t"
        with pytest.raises(pickle.UnpicklingError):
            tables.attributeset.pickle.loads(pickle.dumps(print))
        assert refused == ["builtins.print"]
    assert tables.attributeset.pickle is pickle  # restored


def test_an_allowed_function_cannot_be_modified():
    """BUILD on a global sets attributes of it: the one Python function allowed (numpy's
    ``_frombuffer``) is handed out as a fresh wrapper, so the real one stays as it is."""
    import tables.atom

    try:
        from numpy._core import numeric
    except ImportError:  # numpy < 1.26
        from numpy.core import numeric

    before = numeric._frombuffer.__defaults__
    build = b"cnumpy._core.numeric\n_frombuffer\n(N}S'__defaults__'\n(I1\ntstb."  # stock pickle: (1,)
    with restricted_unpickling(), contextlib.suppress(Exception):
        tables.atom.pickle.loads(build)
    assert numeric._frombuffer.__defaults__ == before != (1,)


# -- the client ----------------------------------------------------------------------------
class FakeServer(http.server.BaseHTTPRequestHandler):
    """Just enough of the posezoo API for Client.predict; the h5 result is malicious."""

    files: dict[str, tuple[str, bytes]] = {}
    submitted: list[dict] = []

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str, filename: str | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if filename:
            self.send_header("Content-Disposition", f'attachment; filename="{filename}"')
        self.end_headers()
        self.wfile.write(body)

    def _job(self, status: str) -> dict:
        return {"id": "job1", "status": status, "model": "m@1", "progress": {"stage": status},
                "results": {k: f"/v1/jobs/job1/results/{k}" for k in self.files} if status == "succeeded" else {}}

    def do_POST(self):
        url = urlsplit(self.path)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.submitted.append(parse_qs(url.query))
        self._send(202, json.dumps(self._job("queued")).encode(), "application/json")

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/v1/jobs/job1/events":
            self._send(200, json.dumps(self._job("succeeded")).encode() + b"\n", "application/x-ndjson")
        elif path.startswith("/v1/jobs/job1/results/") and path.rsplit("/", 1)[1] in self.files:
            name, body = self.files[path.rsplit("/", 1)[1]]
            self._send(200, body, "application/octet-stream", name)
        else:
            self._send(404, b'{"error": "not_found", "detail": "no"}', "application/json")


@pytest.fixture()
def fake_server(table, tmp_path, marker):
    served = tmp_path / "served"
    served.mkdir()
    paths = table.with_metadata(source="server").save(served, ["csv"], stem="mouse")
    evil = table_format_with_bad_attribute(table, served / "mouse.h5", marker)
    FakeServer.files = {"h5": ("mouse.h5", evil.read_bytes()), "csv": ("mouse.csv", paths["csv"].read_bytes()),
                        "meta": ("mouse.meta.json", paths["meta"].read_bytes())}
    FakeServer.submitted = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", paths["csv"]
    server.shutdown()
    server.server_close()


def test_predict_reads_the_csv_and_never_the_h5(fake_server, tmp_path, marker):
    url, served_csv = fake_server
    video = tmp_path / "mouse.mp4"
    video.write_bytes(b"not really a video")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InsecureTransportWarning)  # loopback: no warning
        with Client(url, api_key="k", progress=False, retries=0) as client:
            result = client.predict(video, formats=["h5"], out=tmp_path / "out")
    assert FakeServer.submitted[0]["formats"] == ["h5,csv"]
    assert set(result.paths) == {"h5", "csv", "meta"} and result.paths["h5"].exists()
    expected = PoseTable.load(served_csv)
    np.testing.assert_array_equal(result.table.data, expected.data)
    assert result.table.metadata == {"source": "server"}
    assert not marker.exists()


def test_predict_reads_a_csv_as_csv_whatever_its_name(fake_server, tmp_path, marker):
    """The server names the files: a csv called ``x.h5`` must not be read as an h5."""
    url, _ = fake_server
    FakeServer.files = {**FakeServer.files, "csv": ("sneaky.h5", FakeServer.files["h5"][1])}
    video = tmp_path / "mouse.mp4"
    video.write_bytes(b"x")
    with Client(url, api_key="k", progress=False, retries=0) as client, pytest.raises(ValueError) as info:
        client.predict(video, formats=["csv"], out=tmp_path / "out")
    assert not isinstance(info.value, UnsafeFileError)  # it never got as far as PyTables
    assert not marker.exists()


# -- plain http with a key ------------------------------------------------------------------
def test_insecure_transport_warns_once_per_host(monkeypatch):
    monkeypatch.setattr(client_module, "_WARNED_HOSTS", set())
    monkeypatch.delenv("POSEZOO_API_KEY", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for url, key in [("http://example.invalid", "k"), ("http://example.invalid:8080/", "k"),
                         ("http://127.0.0.1:3000", "k"), ("http://127.8.9.1", "k"), ("http://[::1]:3000", "k"),
                         ("http://localhost:3000", "k"), ("https://example.invalid", "k"),
                         ("http://other.invalid", None)]:
            Client(url, api_key=key, progress=False).close()
    insecure = [w for w in caught if issubclass(w.category, InsecureTransportWarning)]
    assert len(insecure) == 1
    assert "example.invalid" in str(insecure[0].message) and insecure[0].filename == __file__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Client("http://another.invalid", api_key="k", progress=False).close()
    assert [w.category for w in caught] == [InsecureTransportWarning]


def test_downloads_keep_only_plain_result_names():
    """The server names the files the client writes: never a dot file, a path, or another suffix."""
    from posezoo.client import _result_name

    job = "0" * 32
    assert _result_name("mouse_posezoo_mouse.h5", job, "h5") == "mouse_posezoo_mouse.h5"
    assert _result_name("mouse_labeled.mp4", job, "video") == "mouse_labeled.mp4"
    for evil in ("../../.bashrc", ".bashrc.h5", "evil.py", "sitecustomize.py", "a\nb.h5", None, ""):
        assert _result_name(evil, job, "h5") == f"{job}.h5", evil
    assert _result_name("/etc/x.h5", job, "h5") == "x.h5"


def test_a_csv_that_is_not_a_table_is_a_clear_error(tmp_path):
    from posezoo.errors import InputError
    from posezoo.table import PoseTable

    bad = tmp_path / "x.csv"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(InputError, match="not a DeepLabCut pose table"):
        PoseTable.load(bad)
