"""A real PostgreSQL server for tests (Debian's postgresql package), in a temp dir, on a loopback port.

initdb refuses to run as root, so as root the cluster is made and run by the `postgres` user in a temp
dir it owns; as another user it runs as that user. About 1-2 s to start; stopped (`pg_ctl stop -m
fast`) and removed on exit, also when the test fails.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


BIN = _bin_dir()
requires_postgres = pytest.mark.skipif(BIN is None, reason="PostgreSQL not installed (apt install postgresql)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    port: int
    directory: Path
    user: str = "edgescreen"
    database: str = "postgres"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def psql(self, sql: str) -> str:
        """Run SQL with psql (as a client over TCP: no need to be the postgres user)."""
        proc = subprocess.run([str(BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d",
                               self.database, "-At", "-c", sql], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed: {proc.stderr}")
        return proc.stdout

    def dump(self) -> bytes:
        """Everything in the database, as pg_dump writes it (for greps that must find nothing)."""
        proc = subprocess.run([str(BIN / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                               self.database], capture_output=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres() -> Iterator[PostgresServer]:
    if BIN is None:
        pytest.skip("PostgreSQL not installed")
    directory = Path(tempfile.mkdtemp(prefix="es-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    server = PostgresServer(_free_port(), directory)
    started = False
    try:
        init = subprocess.run(_as_postgres([str(BIN / "initdb"), "-D", str(directory / "db"), "-A", "trust", "-U",
                                            server.user, "--no-sync"]), capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr or init.stdout}")
        opts = (f"-p {server.port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60")
        for _ in range(3):
            start = subprocess.run(_as_postgres([str(BIN / "pg_ctl"), "-D", str(directory / "db"), "-o", opts, "-l",
                                                 str(directory / "log"), "-w", "-t", "60", "start"]),
                                   capture_output=True, text=True, timeout=90)
            if start.returncode == 0:
                started = True
                break
            server.port = _free_port()  # the port was taken meanwhile: try another
            opts = opts.replace(opts.split()[1], str(server.port), 1)
        if not started:
            log = (directory / "log").read_text(errors="replace")[-2000:] if (directory / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {start.stderr}\n{log}")
        yield server
    finally:
        if started:
            subprocess.run(_as_postgres([str(BIN / "pg_ctl"), "-D", str(directory / "db"), "-m", "fast", "-w",
                                         "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)
