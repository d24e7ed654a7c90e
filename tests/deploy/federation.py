"""A real Flower deployment on 127.0.0.1 for tests: SuperLink, SuperNodes, CLI.

Every process runs the command :mod:`fedsim.certs` prints (plus test-only
ports and logs), in its own session with its own ``FLWR_HOME``. :meth:`stop`
ends each process the federation started together with the helpers Flower
spawned under it (SuperExec, ServerApp and ClientApp processes), found by
walking ``/proc``; a test fixture calls it as a finalizer, so nothing survives
a failing test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedsim.certs import Deployment, create

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``), children first."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            out.append(int(child))
            out += descendants(int(child))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_tree(proc: subprocess.Popen[bytes], sig: signal.Signals) -> list[int]:
    """Send ``sig`` to ``proc`` and everything it spawned; returns their pids."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


@dataclass
class Federation:
    """A SuperLink with TLS and SuperNode authentication, and its SuperNodes.

    Parameters
    ----------
    root : pathlib.Path
        Working folder: certificates, logs, each process's ``FLWR_HOME``.
    num_keys : int
        SuperNode key pairs to create.
    """

    root: Path
    num_keys: int = 2
    deployment: Deployment = field(init=False)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.deployment = create(
            self.root / "certs", num_nodes=self.num_keys, port=self.port
        )
        self.server_dir = self.root / "server"
        self.server_dir.mkdir()
        home = self.home("workstation")
        home.mkdir(parents=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            'address = ":local:"\n\n' + self.deployment.connection_toml()
        )

    # -- processes ------------------------------------------------------------
    def home(self, name: str) -> Path:
        """The ``FLWR_HOME`` of one role (SuperLink, a SuperNode, the CLI)."""
        return self.root / "flwr-home" / name

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
        env.update(
            FLWR_HOME=str(self.home(name)),
            FLWR_DISABLE_UPDATE_CHECK="1",  # no network calls from the tests
            FLWR_TELEMETRY_ENABLED="0",
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        home: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session, logging to ``<root>/<name>.log``,
        with the ``FLWR_HOME`` of role ``home`` (default: ``name``)."""
        handle = self.log(name).open("ab")
        self._logs.append(handle)
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd or self.root,
            env=self.env(home or name),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    def stop(self) -> None:
        """End every process started here, and what they spawned."""
        trees = {p.pid: kill_tree(p, signal.SIGTERM) for p in self.processes}
        deadline = time.monotonic() + 5
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pids in trees.values():
            for pid in pids:
                if _alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for handle in self._logs:
            handle.close()

    # -- the deployment's steps ---------------------------------------------
    def start_superlink(self) -> subprocess.Popen[bytes]:
        """The printed SuperLink command, bound to 127.0.0.1; waits for its port."""
        proc = self.start(
            "superlink",
            self.deployment.superlink_command(host="127.0.0.1"),
            cwd=self.server_dir,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the SuperLink exited: {self.tail('superlink')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return proc
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the SuperLink did not open its port within 60 s")

    def flwr(
        self, *args: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """The ``flwr`` CLI on the workstation (run from the fedsim folder)."""
        return subprocess.run(
            ["flwr", *args],
            cwd=ROOT,
            env=self.env("workstation"),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register(self, *indices: int) -> list[int]:
        """Register SuperNode public keys (concurrently); returns their node ids."""
        runs = []
        for index in indices:
            argv = self.deployment.register_command(index)
            assert argv[0] == "flwr"
            runs.append(
                subprocess.Popen(
                    [*argv, "--format", "json"],
                    cwd=ROOT,
                    env=self.env("workstation"),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
        self.processes += runs
        ids = []
        for proc in runs:
            out = proc.communicate(timeout=120)[0].decode(errors="replace")
            assert proc.returncode == 0, out
            ids.append(int(json.loads(out[out.index("{") :])["node-id"]))
        return ids

    def start_supernode(
        self,
        index: int,
        node_config: str,
        *,
        name: str | None = None,
        key: Path | None = None,
        with_ca: bool = True,
    ) -> subprocess.Popen[bytes]:
        """The printed SuperNode command for key ``index`` with ``node_config``.

        ``key`` replaces the private key; ``with_ca=False`` drops
        ``--root-certificates``. Each SuperNode gets its own local port for the
        ClientApp runtime API (Flower's default 9094 would clash on one host).
        """
        argv = self.deployment.supernode_command(index)
        argv[argv.index("--node-config") + 1] = node_config
        if key is not None:
            argv[argv.index("--auth-supernode-private-key") + 1] = str(key)
        if not with_ca:
            at = argv.index("--root-certificates")
            del argv[at : at + 2]
        argv += ["--port", str(free_port())]
        return self.start(name or f"supernode-{index}", argv, cwd=self.root)

    def nodes(self) -> dict[int, str]:
        """Node id -> status, as ``flwr supernode ls`` reports them."""
        done = self.flwr(
            "supernode", "ls", self.deployment.connection, "--format", "json"
        )
        assert done.returncode == 0, done.stdout + done.stderr
        listing = json.loads(done.stdout[done.stdout.index("{") :])
        return {int(n["node-id"]): n["status"] for n in listing["nodes"]}

    def run(self, run_config: str) -> subprocess.Popen[bytes]:
        """The printed ``flwr run`` with ``run_config``, from the fedsim folder
        (not waited for)."""
        argv = self.deployment.run_command()
        argv[argv.index("--run-config") + 1] = run_config
        return self.start("flwr-run", argv, cwd=ROOT, home="workstation")

    def tail(self, name: str, lines: int = 40) -> str:
        """The end of a process's log (for assertion messages)."""
        path = self.log(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_for_line(self, name: str, text: str, *, timeout: float = 120) -> None:
        """Wait until ``text`` appears in a process's log."""
        deadline = time.monotonic() + timeout
        while text not in self.log(name).read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in {name}.log: {self.tail(name)}")
            time.sleep(0.2)
