"""A private PostgreSQL server for a test or a benchmark: its own data directory, on
127.0.0.1 at a free port, stopped (and its files removed) afterwards.

Uses Debian's `postgresql` package (scripts/install-test-tools.sh installs it). PostgreSQL
refuses to run as root: as root, the server runs as the `postgres` user, from a directory
that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

DB = "energy"
USER = "energy"


class PostgresMissing(RuntimeError):
    pass


def _bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if versions:
        return Path(versions[-1]).parent
    raise PostgresMissing(
        "PostgreSQL's server programs (initdb, pg_ctl) are missing: run "
        "scripts/install-test-tools.sh (Debian/Ubuntu: apt-get install postgresql)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """`with PostgresServer() as url:` a running server and a database `energy` on it.

    `stop()` / `start()` take it down and bring it back on the same port (a restart a
    client must ride out); `fsync=False` trades durability for speed (tests)."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.bindir = _bindir()
        self.port = _free_port()
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="energy-proxy-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self.url = f"postgresql://{USER}@127.0.0.1:{self.port}/{DB}"
        self._databases = 0

    def _run(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
        )

    def _check(self, done: subprocess.CompletedProcess[str], what: str) -> None:
        if done.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{what} failed ({done.returncode}):\n{done.stdout}{done.stderr}{tail}"
            )

    def start(self) -> None:
        if not self.data.exists():
            done = self._run(
                self.bindir / "initdb",
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                *(() if self.fsync else ("--no-sync",)),
            )
            self._check(done, "initdb")
            fresh = True
        else:
            fresh = False
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root}"
        if not self.fsync:
            options += " -F -c synchronous_commit=off -c full_page_writes=off"
        done = self._run(
            self.bindir / "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        self._check(done, "pg_ctl start")
        if fresh:
            done = self._run(
                self.bindir / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, DB
            )
            self._check(done, "createdb")

    def stop(self, mode: str = "fast") -> None:
        done = self._run(self.bindir / "pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        self._check(done, "pg_ctl stop")

    def psql(self, sql: str) -> str:
        done = self._run(
            self.bindir / "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            USER,
            "-d",
            DB,
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        )
        self._check(done, "psql")
        return done.stdout.strip()

    def new_database(self) -> str:
        """A fresh, empty database on this server; its URL."""
        self._databases += 1
        name = f"t{self._databases}"
        self.psql(f"CREATE DATABASE {name}")
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> str:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self.url

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
