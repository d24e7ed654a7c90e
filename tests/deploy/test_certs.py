"""``fedsim certs``: the files are what TLS and Flower's SuperNode auth accept."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from fedsim.certs import Deployment, check_hosts, cli, create
from fedsim.cli import main
from fedsim.exceptions import ConfigError


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _handshake(d: Deployment, *, cafile: Path, server_hostname: str) -> None:
    """One TLS handshake against a server using ``d``'s certificate; raises on
    a verification failure."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(d.server_cert, d.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                tls.sendall(b"x")
    finally:
        thread.join(timeout=5)
        listener.close()


def test_server_certificate_is_signed_by_the_ca_for_exactly_the_given_names(
    tmp_path: Path,
) -> None:
    d = create(tmp_path / "c", hosts=["192.168.1.10", "pi-server.local"], num_nodes=1)
    ca, server = _cert(d.ca_cert), _cert(d.server_cert)
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    basic = server.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not basic.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "pi-server.local",
        "localhost",
    }
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("192.168.1.10"),
        ipaddress.ip_address("127.0.0.1"),
    }
    # the first host is the address the printed commands use
    assert d.address == "192.168.1.10:8000"
    key = serialization.load_pem_private_key(d.server_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == server.public_key()


def test_tls_handshake_accepts_the_ca_and_sans_and_rejects_everything_else(
    tmp_path: Path,
) -> None:
    d = create(tmp_path / "c", num_nodes=1)
    other = create(tmp_path / "other", num_nodes=1)
    for name in ("127.0.0.1", "localhost"):
        _handshake(d, cafile=d.ca_cert, server_hostname=name)
    with pytest.raises(ssl.SSLCertVerificationError, match="issuer"):
        _handshake(d, cafile=other.ca_cert, server_hostname="localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        _handshake(d, cafile=d.ca_cert, server_hostname="elsewhere.example")


def test_node_keys_load_with_flowers_own_readers(tmp_path: Path) -> None:
    d = create(tmp_path / "c", num_nodes=3)
    publics = set()
    for i in range(3):
        # what `flower-supernode --auth-supernode-private-key` does
        private = serialization.load_ssh_private_key(d.node_key(i).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP256R1)
        # what `flwr supernode register <key.pub>` does
        registered = try_load_public_key(d.node_public_key(i))
        assert registered == public_key_to_bytes(private.public_key())
        publics.add(registered)
    assert len(publics) == 3


def test_private_keys_are_readable_by_the_owner_only(tmp_path: Path) -> None:
    d = create(tmp_path / "c", num_nodes=2)
    private = [d.ca_key, d.server_key, d.node_key(0), d.node_key(1)]
    for path in d.files():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert (mode & 0o077 == 0) == (path in private), path
    assert not list((tmp_path / "c").glob("*.part"))


def test_existing_keys_are_kept_unless_forced(tmp_path: Path) -> None:
    d = create(tmp_path / "c", num_nodes=2)
    before = {p: p.read_bytes() for p in d.files()}
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        create(tmp_path / "c", num_nodes=2)
    assert {p: p.read_bytes() for p in d.files()} == before
    create(tmp_path / "c", num_nodes=2, force=True)
    assert d.ca_key.read_bytes() != before[d.ca_key]
    assert d.node_key(1).read_bytes() != before[d.node_key(1)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_nodes": 0}, "--nodes must be at least 1, got 0"),
        ({"port": 70000}, "--port must lie in 1..65535, got 70000"),
        ({"days": 0}, "--days must be at least 1, got 0"),
        ({"hosts": ["bad host!"]}, "'bad host!' is neither an IP address"),
        ({"connection": "a b"}, "--connection 'a b' must be letters"),
    ],
)
def test_bad_values_are_one_sentence_errors(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("..", r"\.\.")):
        create(tmp_path / "c", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "c").exists()


def test_hosts_are_normalised_and_deduplicated() -> None:
    assert check_hosts(["::1", "localhost", "Server.Local"]) == [
        "::1",
        "localhost",
        "Server.Local",
        "127.0.0.1",
    ]


def test_printed_commands_parse_with_flowers_own_argument_parsers(
    tmp_path: Path,
) -> None:
    d = create(tmp_path / "c", hosts=["10.0.0.2"], num_nodes=2, port=9443)
    link = _parse_args_run_superlink().parse_args(d.superlink_command()[1:])
    assert (link.host, link.port) == ("0.0.0.0", 9443)
    assert link.enable_supernode_auth and not link.insecure
    assert link.ssl_ca_certfile == str(d.ca_cert)
    assert (link.ssl_certfile, link.ssl_keyfile) == (
        str(d.server_cert),
        str(d.server_key),
    )
    for i in range(2):
        node = _parse_args_run_supernode().parse_args(d.supernode_command(i)[1:])
        assert node.superlink == "10.0.0.2:9443"
        assert node.root_certificates == str(d.ca_cert)
        assert node.auth_supernode_private_key == str(d.node_key(i))
        assert parse_config_args([node.node_config]) == {
            "partition-id": i,
            "num-partitions": 2,
        }
    assert d.register_command(1)[-2:] == [str(d.node_public_key(1)), "fedsim"]


def test_data_path_node_config_is_quoted_for_flower(tmp_path: Path) -> None:
    d = create(tmp_path / "c", num_nodes=1, data_path="/home/pi/my data")
    node = _parse_args_run_supernode().parse_args(d.supernode_command(0)[1:])
    assert parse_config_args([node.node_config]) == {
        "data-path": "/home/pi/my data",
        "partition-id": 0,
    }


def test_cli_prints_every_step_and_the_connection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli([str(tmp_path / "c"), "--host", "10.0.0.2,pi.local", "--nodes", "2"]) == 0
    )
    out = capsys.readouterr().out
    d = Deployment(folder=tmp_path / "c", address="10.0.0.2:8000", num_nodes=2)
    assert "--enable-supernode-auth" in out
    assert f'root-certificates = "{d.ca_cert}"' in out
    assert f"flwr supernode register {d.node_public_key(1)} fedsim" in out
    assert f"--auth-supernode-private-key {d.node_key(1)}" in out
    assert "flwr run . fedsim --stream --run-config num_clients=2" in out
    san = _cert(d.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "pi.local" in san.value.get_values_for_type(x509.DNSName)


def test_fedsim_certs_refusal_is_exit_2_with_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main(["certs", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists; pass --force" in err[0]
    assert main(["certs", str(tmp_path / "d"), "--nodes", "two"]) == 2
    assert "invalid int value: 'two'" in capsys.readouterr().err
