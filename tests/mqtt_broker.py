"""An MQTT broker of a test's own, from Debian's mosquitto, on a free port: started and
stopped by its PID, never the machine's broker. It keeps its sessions in its own folder,
so a persistent subscriber gets what was published for it while it was away."""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.service_harness import free_port


def mosquitto_bin() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None
    )


class MqttBroker:
    """start() and stop() as often as a test likes, on the same port; remove() deletes
    its folder."""

    def __init__(self) -> None:
        program = mosquitto_bin()
        if program is None:
            raise RuntimeError("no mosquitto here: apt-get install mosquitto (make mqtt)")
        self.program = program
        self.folder = Path(tempfile.mkdtemp(prefix="glad-mqtt-"))
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.config = self.folder / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # As root, mosquitto would switch to its own user, who cannot write here.
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.folder}/\n"
            f"log_dest file {self.folder}/broker.log\n"
        )
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [self.program, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"mosquitto did not start: see {self.folder}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its sessions), and waits for it to exit."""
        if self._process is not None:
            self._process.send_signal(signal.SIGTERM)
            self._process.wait(10)
            self._process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
