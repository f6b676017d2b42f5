"""A real PostgreSQL server for the tests: initdb + pg_ctl in a temporary folder, on 127.0.0.1.

Started once per test session (by the `postgres` fixture in conftest), stopped and removed
at its end. initdb refuses to run as root, so as root the server runs as the `postgres`
system user that Debian's package creates. The superuser has a password (scram-sha-256
over TCP): tests pass it as PGPASSWORD, as a user would.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

PASSWORD = "clipdex-test-password"


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresServer:
    folder: Path
    port: int
    user: str  # the OS user the server runs as, when not this process's

    @property
    def base_url(self) -> str:
        """A URL without password (it comes from PGPASSWORD), without a database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL (no password)."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql(f"CREATE DATABASE {name}")
        return f"{self.base_url}/{name}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        psql = find_binary("psql") or "psql"
        result = subprocess.run(
            [psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database, "-tAc", sql],
            env={**os.environ, "PGPASSWORD": PASSWORD}, capture_output=True, text=True, check=True,
        )
        return result.stdout.strip()

    def stop(self) -> None:
        self._as_server_user([find_binary("pg_ctl") or "pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "stop"],
                             check=False)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _as_server_user(self, command: list[str], check: bool = True) -> None:
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=check, capture_output=True, text=True)


def start_server() -> PostgresServer:
    initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("the catalog tests need PostgreSQL's initdb and pg_ctl: make test installs Debian's "
                           "postgresql package as root; elsewhere install PostgreSQL")
    user = ""
    if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user
        user = "postgres"
    folder = Path(tempfile.mkdtemp(prefix="clipdex-pg-"))
    os.chmod(folder, 0o755)
    (folder / "password").write_text(PASSWORD + "\n")
    if user:
        shutil.chown(folder, user)
        shutil.chown(folder / "password", user)
    server = PostgresServer(folder, free_port(), user)
    server._as_server_user([initdb, "-D", str(folder / "data"), "-U", "postgres", "--pwfile", str(folder / "password"),
                            "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"])
    options = (f"-c listen_addresses=127.0.0.1 -c port={server.port} -c unix_socket_directories={folder} "
               "-c fsync=off -c max_connections=60 -c shared_buffers=32MB")
    server._as_server_user([pg_ctl, "-D", str(folder / "data"), "-o", options, "-l", str(folder / "log"), "-w", "start"])
    return server
