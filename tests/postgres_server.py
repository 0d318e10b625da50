"""A PostgreSQL server of a test's own, from Debian's package, on a free port: started
and stopped by its own pg_ctl, never the machine's server."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.service_harness import free_port


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL programs (the newest version installed), if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """initdb in a folder of its own under the system's temporary folder (pytest's are
    private to root, and the server may not run as root), then start() and stop() as often
    as a test likes; remove() deletes the folder."""

    def __init__(self) -> None:
        programs = postgres_bin()
        if programs is None:
            raise RuntimeError("no PostgreSQL here: apt-get install postgresql (make postgres)")
        self.bin = programs
        folder = Path(tempfile.mkdtemp(prefix="glad-postgres-"))
        self.folder = folder
        self.data = folder / "pgdata"
        self.port = free_port()
        self.url = f"postgresql+psycopg://glad@127.0.0.1:{self.port}/postgres"
        # PostgreSQL refuses to run as root: as root, it runs as Debian's postgres user.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(folder, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "glad", "--auth=trust", "-E", "UTF8")

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(self.bin / program), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.folder,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.folder / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
