"""A device deployment of fedsim: its files, its address and its commands.

A :class:`Deployment` describes what ``fedsim certs`` writes for fedsim users who
run clients on their own devices (Flower 1.42 SuperLink and SuperNodes over TLS,
with SuperNode authentication switched on): where the CA, the SuperLink's
certificate and each device's SuperNode key pair live in one folder, the
``host:port`` at which devices and the workstation reach the SuperLink, and the
exact commands and ``$FLWR_HOME/config.toml`` table a user runs on each machine:
``flower-superlink`` on the server, ``flwr supernode register`` for every
device's public key, ``flower-supernode`` on each device and ``flwr run`` on the
workstation. It only names paths and builds commands; the keys and certificates
themselves are created by :func:`fedsim.certs.create`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Deployment", "node_key_names"]


def node_key_names(index: int) -> tuple[str, str]:
    """File names of SuperNode ``index``'s private and public key."""
    return f"supernode-{index}.key", f"supernode-{index}.pub"


@dataclass(frozen=True)
class Deployment:
    """The files of one ``fedsim certs`` folder and the commands that use them.

    Parameters
    ----------
    folder : pathlib.Path
        The folder holding the certificates and keys.
    address : str
        ``host:port`` at which devices and the workstation reach the SuperLink.
    num_nodes : int
        Number of SuperNode key pairs.
    connection : str
        Name of the SuperLink connection in ``$FLWR_HOME/config.toml``.
    data_path : str or None
        The devices' data folder (``data-path`` node config); ``None`` gives the
        demo form ``partition-id=<i> num-partitions=<n>``.
    """

    folder: Path
    address: str
    num_nodes: int
    connection: str = "fedsim"
    data_path: str | None = None

    @property
    def ca_cert(self) -> Path:
        """The CA certificate (every device and the workstation)."""
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """The CA's private key (stays with whoever issues certificates)."""
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        """The SuperLink's certificate."""
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        """The SuperLink's private key."""
        return self.folder / "server.key"

    def node_key(self, index: int) -> Path:
        """SuperNode ``index``'s private key (OpenSSH format)."""
        return self.folder / node_key_names(index)[0]

    def node_public_key(self, index: int) -> Path:
        """SuperNode ``index``'s public key (OpenSSH format)."""
        return self.folder / node_key_names(index)[1]

    def files(self) -> list[Path]:
        """Every file :func:`fedsim.certs.create` writes."""
        nodes = [
            path
            for i in range(self.num_nodes)
            for path in (self.node_key(i), self.node_public_key(i))
        ]
        return [self.ca_cert, self.ca_key, self.server_cert, self.server_key, *nodes]

    def superlink_command(self, *, host: str = "0.0.0.0") -> list[str]:
        """``flower-superlink`` with TLS and SuperNode authentication on."""
        port = self.address.rsplit(":", 1)[1]
        return [
            "flower-superlink",
            "--host",
            host,
            "--port",
            port,
            "--ssl-ca-certfile",
            str(self.ca_cert),
            "--ssl-certfile",
            str(self.server_cert),
            "--ssl-keyfile",
            str(self.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
        ]

    def register_command(self, index: int) -> list[str]:
        """``flwr supernode register`` for SuperNode ``index``'s public key."""
        return [
            "flwr",
            "supernode",
            "register",
            str(self.node_public_key(index)),
            self.connection,
        ]

    def node_config(self, index: int) -> str:
        """The ``--node-config`` value of SuperNode ``index``."""
        if self.data_path is not None:
            # Flower parses node config values as TOML: a path must be quoted
            return f'data-path="{self.data_path}" partition-id={index}'
        return f"partition-id={index} num-partitions={self.num_nodes}"

    def supernode_command(self, index: int) -> list[str]:
        """``flower-supernode`` for device ``index``, authenticated and over TLS."""
        return [
            "flower-supernode",
            "--superlink",
            self.address,
            "--root-certificates",
            str(self.ca_cert),
            "--auth-supernode-private-key",
            str(self.node_key(index)),
            "--node-config",
            self.node_config(index),
        ]

    def run_command(self) -> list[str]:
        """``flwr run`` of the default experiment with one client per device."""
        return [
            "flwr",
            "run",
            ".",
            self.connection,
            "--stream",
            "--run-config",
            f"num_clients={self.num_nodes}",
        ]

    def connection_toml(self) -> str:
        """The ``$FLWR_HOME/config.toml`` table naming this SuperLink."""
        return (
            f"[superlink.{self.connection}]\n"
            f'address = "{self.address}"\n'
            f'root-certificates = "{self.ca_cert}"\n'
        )

    def instructions(self) -> str:
        """The printed guide: every command, in the order to run them."""
        join = shlex.join
        lines = [
            f"Wrote the CA, the SuperLink certificate and {self.num_nodes} SuperNode "
            f"key pair(s) to {self.folder}.",
            "",
            "1. On the server, in the folder where results should land (the "
            "ServerApp writes outputs/ there), start the SuperLink:",
            "",
            f"   {join(self.superlink_command())}",
            "",
            "2. On the workstation that runs experiments, add this connection to "
            "$FLWR_HOME/config.toml (default ~/.flwr/config.toml):",
            "",
            *[f"   {line}" for line in self.connection_toml().splitlines()],
            "",
            "3. Register every SuperNode's public key with the SuperLink:",
            "",
            *[f"   {join(self.register_command(i))}" for i in range(self.num_nodes)],
            "",
            "4. On device i, with ca.crt and its own supernode-<i>.key copied to "
            "the same paths, start its SuperNode:",
            "",
            *[f"   {join(self.supernode_command(i))}" for i in range(self.num_nodes)],
            "",
        ]
        if self.data_path is None:
            lines += [
                "   (a demo: each device trains on one partition of a public "
                "dataset; for the device's",
                '   own data use --node-config \'data-path="/path/to/data" '
                "partition-id=<i>')",
                "",
            ]
        lines += [
            "5. From the fedsim folder on the workstation, run an experiment:",
            "",
            f"   {join(self.run_command())}",
        ]
        return "\n".join(lines)
