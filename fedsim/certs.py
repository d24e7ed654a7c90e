"""``fedsim certs``: TLS certificates and SuperNode keys for a device deployment.

``fedsim certs <dir>`` writes everything a SuperLink and its SuperNodes need to
talk over TLS with SuperNode authentication switched on (Flower 1.42):

``ca.crt``, ``ca.key``
    A private certificate authority (EC P-256). ``ca.crt`` goes to every device
    and to the workstation that runs ``flwr run``; ``ca.key`` stays with whoever
    issues certificates.
``server.crt``, ``server.key``
    The SuperLink's certificate, signed by the CA, valid for the ``--host``
    names and IP addresses (always also ``127.0.0.1`` and ``localhost``: the
    SuperLink's own ServerApp process connects to it locally).
``supernode-<i>.key``, ``supernode-<i>.pub``
    One EC P-256 key pair per device, in the OpenSSH formats that
    ``flower-supernode --auth-supernode-private-key`` and
    ``flwr supernode register`` read. Device ``i`` gets ``supernode-<i>.key``;
    the public half is registered with the SuperLink.

It then prints the exact commands that start each side. Private keys are
written with mode 0600. Keys come from the operating system's cryptographic
random source: they must not be reproducible, so no seed is involved.
Existing files are never overwritten unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsim.deployment import Deployment, node_key_names
from fedsim.exceptions import ConfigError

__all__ = [
    "DEFAULT_HOSTS",
    "DEFAULT_PORT",
    "Deployment",
    "check_hosts",
    "cli",
    "create",
    "node_key_names",
]

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
"""Names the server certificate is always valid for."""
DEFAULT_PORT = 8000
"""The SuperLink's default HTTPS port in Flower 1.42 (``flower-superlink --port``)."""

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$"
)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsim"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _certificate(
    *,
    subject: x509.Name,
    public: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    signer: ec.EllipticCurvePrivateKey,
    days: int,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A SHA-256 signed certificate, valid from 5 minutes ago for ``days`` days.

    ``issuer=None`` makes it self-signed (the CA); otherwise it carries the
    issuer's key identifier, which strict verifiers require.
    """
    now = dt.datetime.now(dt.UTC)
    usage = {
        name: False
        for name in (
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "encipher_only",
            "decipher_only",
        )
    }
    is_ca = issuer is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=is_ca, crl_sign=is_ca, **usage
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
    )
    if issuer is not None:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value),
            False,
        )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(signer, hashes.SHA256())


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` to ``path`` via a temporary file (mode 0600 if private)."""
    partial = path.with_name(path.name + ".part")
    fd = os.open(
        partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644
    )
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(partial, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def check_hosts(hosts: Sequence[str]) -> list[str]:
    """The certificate's names: ``hosts`` (validated) then the defaults, no repeats.

    Raises
    ------
    ConfigError
        If a value is neither an IP address nor a valid DNS name.
    """
    out: list[str] = []
    for host in [*hosts, *DEFAULT_HOSTS]:
        value = host.strip()
        try:
            value = str(ipaddress.ip_address(value))
        except ValueError:
            if not _HOSTNAME.match(value):
                raise ConfigError(
                    f"--host {host!r} is neither an IP address nor a DNS name; give "
                    "names such as 192.168.1.10 or server.local"
                ) from None
        if value not in out:
            out.append(value)
    return out


def create(
    folder: Path,
    *,
    hosts: Sequence[str] = (),
    num_nodes: int = 2,
    port: int = DEFAULT_PORT,
    days: int = 365,
    connection: str = "fedsim",
    data_path: str | None = None,
    force: bool = False,
) -> Deployment:
    """Create the CA, the SuperLink certificate and SuperNode key pairs.

    Parameters
    ----------
    folder : pathlib.Path
        Where to write the files (created if missing).
    hosts : sequence of str
        Names and IP addresses devices use to reach the SuperLink; the first
        one goes into the printed commands (default ``127.0.0.1``).
        ``127.0.0.1`` and ``localhost`` are always added.
    num_nodes : int
        Number of SuperNode key pairs (at least 1).
    port : int
        The SuperLink's port (1..65535).
    days : int
        Validity of the certificates in days (at least 1).
    connection : str
        Name of the SuperLink connection used in the printed commands.
    data_path : str, optional
        The devices' data folder for the printed ``--node-config``.
    force : bool
        Overwrite existing files.

    Returns
    -------
    Deployment
        The files and the commands that use them.

    Raises
    ------
    ConfigError
        For a bad value, or when a file exists and ``force`` is off.
    """
    if num_nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {num_nodes}")
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must lie in 1..65535, got {port}")
    if days < 1:
        raise ConfigError(f"--days must be at least 1, got {days}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", connection):
        raise ConfigError(
            f"--connection {connection!r} must be letters, digits, '-' or '_'"
        )
    names = check_hosts(hosts)
    host = names[0]
    shown = f"[{host}]" if ":" in host else host
    deployment = Deployment(
        folder=folder.expanduser().resolve(),
        address=f"{shown}:{port}",
        num_nodes=num_nodes,
        connection=connection,
        data_path=data_path,
    )
    if deployment.folder.exists() and not deployment.folder.is_dir():
        raise ConfigError(f"{str(folder)!r} is a file, not a folder")
    existing = [p for p in deployment.files() if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{existing[0]} already exists; pass --force to overwrite the keys in "
            f"{deployment.folder} (devices holding the old keys must then get the "
            "new ones)"
        )
    deployment.folder.mkdir(parents=True, exist_ok=True)
    curve = ec.SECP256R1()
    ca_key = ec.generate_private_key(curve)
    ca = _certificate(
        subject=_name("fedsim deployment CA"),
        public=ca_key.public_key(),
        issuer=None,
        signer=ca_key,
        days=days,
        extensions=(),
    )
    server_key = ec.generate_private_key(curve)
    server = _certificate(
        subject=_name(names[0]),
        public=server_key.public_key(),
        issuer=ca,
        signer=ca_key,
        days=days,
        extensions=(
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (_subject_alternative_names(names), False),
        ),
    )
    pem = serialization.Encoding.PEM
    _write(deployment.ca_key, _pem_key(ca_key), private=True)
    _write(deployment.ca_cert, ca.public_bytes(pem), private=False)
    _write(deployment.server_key, _pem_key(server_key), private=True)
    _write(deployment.server_cert, server.public_bytes(pem), private=False)
    for i in range(num_nodes):
        key = ec.generate_private_key(curve)
        private = key.private_bytes(
            pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(deployment.node_key(i), private, private=True)
        _write(deployment.node_public_key(i), public + b"\n", private=False)
    return deployment


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are fedsim's one-sentence ConfigError."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"fedsim certs: {message} (see fedsim certs --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedsim certs",
        description=(
            "Create a CA, a TLS certificate for the SuperLink and SuperNode key "
            "pairs for a device deployment, and print the commands that start "
            "each side."
        ),
    )
    parser.add_argument("dir", type=Path, help="folder for the files")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help=(
            "a name or IP address devices use to reach the SuperLink (repeat, or "
            "separate by commas); 127.0.0.1 and localhost are always included"
        ),
    )
    parser.add_argument(
        "--nodes", type=int, default=2, help="SuperNode key pairs (default 2)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"the SuperLink's port (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--days", type=int, default=365, help="certificate validity (default 365)"
    )
    parser.add_argument(
        "--connection",
        default="fedsim",
        help="name of the SuperLink connection for flwr (default fedsim)",
    )
    parser.add_argument(
        "--data-path",
        default=None,
        help="the devices' data folder, for the printed --node-config",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing keys")
    return parser


def cli(args: Sequence[str]) -> int:
    """``fedsim certs <dir> [--host H] [--nodes N] [--port P] [--force] ...``."""
    parser = _parser()
    try:
        ns = parser.parse_args(list(args))
    except SystemExit as stop:  # --help
        return int(stop.code or 0)
    hosts = [h for value in ns.host for h in value.split(",") if h.strip()]
    deployment = create(
        ns.dir,
        hosts=hosts,
        num_nodes=ns.nodes,
        port=ns.port,
        days=ns.days,
        connection=ns.connection,
        data_path=ns.data_path,
        force=ns.force,
    )
    print(deployment.instructions())
    return 0
