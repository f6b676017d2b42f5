"""A two-node Ray cluster on this machine, inside a network namespace the test makes.

Ray binds to the node's routable address, even when told 127.0.0.1; its loopback-only
mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) refuses a second node. So the head, the
second node and the driver all run in a namespace of their own (`ip netns`), whose only
interface is its loopback, holding the address 10.77.0.1: no test traffic leaves it.
Every process started here lives in that namespace; stopping the cluster ends each of
them by its pid (never `ray stop`, which ends every Ray process of the machine), then
removes the namespace.

The head, the node and the driver stand for three machines, each with a home of its own,
fresh: the cluster's token is made and handed out as the README says (`ray get-auth-token
--generate` on the head writes its ~/.ray/auth_token, copied into the others' homes), and
every process runs with `RAY_AUTH_MODE=token`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

NODE_ADDRESS = "10.77.0.1"
PORT = 6379
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command, whichever folder the venv keeps it in


def netns_unavailable() -> str | None:
    """Why the namespace cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making a network namespace needs root"
    probe = f"clipdex-probe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()[:200]}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class TwoNodeCluster:
    namespace: str
    log_folder: Path
    address: str = f"{NODE_ADDRESS}:{PORT}"
    object_store_bytes: int = 80 << 20  # each node's
    temp_dir: str = ""  # Ray's session files, apart from /tmp/ray (short: Unix socket paths are limited)

    def command(self, *argv: str) -> list[str]:
        """`argv` run inside the namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def home(self, machine: str) -> Path:
        """The home folder of `machine` (head, node or driver)."""
        return self.log_folder / f"home-{machine}"

    def environment(self, machine: str = "driver") -> dict[str, str]:
        """A process's environment on `machine`: its own home, and `RAY_AUTH_MODE=token` as the README exports it."""
        environment = {**os.environ, "HOME": str(self.home(machine)), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        for variable in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):  # the token is the one in that home, as on a real machine
            environment.pop(variable, None)
        environment.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the single-node tests' setting refuses a second node
        return environment

    def hand_out_token(self) -> None:
        """The README's way: `ray get-auth-token --generate` on the head, its file copied to the other machines."""
        for machine in ("head", "node", "driver"):
            self.home(machine).mkdir(exist_ok=True)
        subprocess.run([*RAY, "get-auth-token", "--generate"], check=True, capture_output=True, env=self.environment("head"))
        token = self.home("head") / ".ray" / "auth_token"
        for machine in ("node", "driver"):
            (self.home(machine) / ".ray").mkdir()
            shutil.copy2(token, self.home(machine) / ".ray" / "auth_token")

    def start(self) -> None:
        run = lambda *argv: subprocess.run(self.command(*argv), check=True, capture_output=True)  # noqa: E731
        subprocess.run(["ip", "netns", "add", self.namespace], check=True, capture_output=True)
        run("ip", "link", "set", "lo", "up")
        run("ip", "addr", "add", f"{NODE_ADDRESS}/32", "dev", "lo")
        self.hand_out_token()
        self.temp_dir = tempfile.mkdtemp(prefix="cdx-ray-")
        common = ["--temp-dir", self.temp_dir, "--block", "--node-ip-address", NODE_ADDRESS, "--num-cpus", "1", "--object-store-memory", str(self.object_store_bytes),
                  "--disable-usage-stats"]
        self._launch("head", [*RAY, "start", "--head", "--port", str(PORT), "--include-dashboard", "false", *common])
        self._wait_for_nodes(1)
        self._launch("node", [*RAY, "start", "--address", self.address, *common])
        self._wait_for_nodes(2)

    def _launch(self, machine: str, argv: list[str]) -> None:
        log = open(self.log_folder / f"ray-{machine}.log", "wb")
        subprocess.Popen(self.command(*argv), stdout=log, stderr=subprocess.STDOUT, env=self.environment(machine),
                         start_new_session=True)

    def _wait_for_nodes(self, count: int, timeout: float = 60) -> None:
        probe = (f"import ray; ray.init(address='{self.address}', log_to_driver=False); "
                 "print(sum(1 for node in ray.nodes() if node['Alive'])); ray.shutdown()")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = subprocess.run(self.command(sys.executable, "-c", probe), capture_output=True, text=True,
                                  env=self.environment("driver"), timeout=60)
            if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        logs = " | ".join(path.read_text(errors="replace")[-400:] for path in sorted(self.log_folder.glob("ray-*.log")))
        raise RuntimeError(f"the Ray cluster did not reach {count} nodes: {logs}")

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True)
        return [int(pid) for pid in listed.stdout.split()]

    def stop(self) -> None:
        """End every process in the namespace (all started by this test), then remove it."""
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.pids():
                break
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
