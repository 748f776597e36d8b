"""A real PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` on 127.0.0.1, trust auth.

The cluster lives in a fresh temporary directory that is removed afterwards. PostgreSQL
refuses to run as root, so when the tests run as root the cluster belongs to ``nobody``
and ``initdb``/``pg_ctl`` run as that user (``runuser`` or ``setpriv``). The port is chosen
free at start and kept across :meth:`PgServer.restart`, so a client's URL stays valid
while a test bounces the server. Without ``initdb`` installed, the fixture skips.

Use it as a context manager::

    with start_pg() as pg:
        url = pg.create_database("jobs")

or as the session fixture ``pg_server`` (``from pgserver import pg_server``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from s3server import free_port

USER = "postgres"  # the cluster's superuser (initdb -U)


def find_pg_bin() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl`` (PATH first, then Debian's layout)."""
    found = shutil.which("initdb")
    if found:
        d = Path(os.path.realpath(found)).parent
        if (d / "pg_ctl").exists():
            return d
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return Path(cand).parent
    return None


def _as_user(user: str | None) -> list[str]:
    """The command prefix that runs a program as ``user`` (nothing when we are not root)."""
    if user is None:
        return []
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--"]
    if shutil.which("setpriv"):
        pw = pwd.getpwnam(user)
        return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
    raise RuntimeError("running as root, and neither runuser nor setpriv is installed to drop to `nobody`")


@dataclass
class PgServer:
    """One running cluster. :attr:`url` is the ``postgres`` database's URL."""

    root: Path
    port: int
    bin_dir: Path
    run_as: str | None
    host: str = "127.0.0.1"
    _dbs: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@{self.host}:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = _as_user(self.run_as) + [str(self.bin_dir / args[0]), *args[1:]]
        res = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            log = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{' '.join(args[:1])} failed ({res.returncode}): {res.stderr.strip()}\n{log}")
        return res

    def running(self) -> bool:
        cmd = _as_user(self.run_as) + [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "status"]
        return subprocess.run(cmd, cwd=self.root, capture_output=True, timeout=30).returncode == 0

    def start(self, timeout: float = 60) -> None:
        """Start the cluster (on the same port as before) and wait until it takes connections."""
        opts = (f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories={self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", str(int(timeout)),
                  "-o", opts, "start", timeout=timeout + 10)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not take connections in {timeout}s: {last}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster (``fast``: roll back open transactions, drop the connections;
        ``immediate``: as a crash would)."""
        if self.data_dir.exists() and self.running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop", timeout=70)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self._dbs.append(name)
        return self.url(name)

    def close(self) -> None:
        """Stop the cluster and remove its directory."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PgServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_pg() -> PgServer:
    """initdb a fresh cluster in a temporary directory and start it. Raises RuntimeError
    when PostgreSQL is not installed (the fixture turns that into a skip)."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin)")
    run_as = "nobody" if os.geteuid() == 0 else None
    # Not under pytest's tmp_path: its parents are 0700 root, which `nobody` cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="posezoo-pg-"))
    if run_as:
        pw = pwd.getpwnam(run_as)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    server = PgServer(root=root, port=free_port(), bin_dir=bin_dir, run_as=run_as)
    try:
        server._run("initdb", "-D", str(server.data_dir), "-U", USER, "--auth=trust", "-E", "UTF8",
                    "--no-locale", "--no-sync", timeout=120)
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server for the whole session (skips when PostgreSQL is not installed)."""
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL is not installed: no initdb (Debian: apt-get install postgresql)")
    server = start_pg()
    yield server
    server.close()
