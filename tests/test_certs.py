"""``datastore certs``: run as a user runs it, and what it writes checked with the
standard library's ssl, cryptography and the openssl command.

Every command runs with umask 000, so a private file written 0600 owes its
mode to datastore and not to the test runner's umask.
"""

from __future__ import annotations

import datetime
import re
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

OPENSSL = "openssl"


def certs(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m datastore certs --dir DIRECTORY ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "datastore", "certs", "--dir", str(directory), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        umask=0,
    )


def succeed(directory: Path, *args: str) -> str:
    result = certs(directory, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=60, check=False)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` and its bytes."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())} if directory.exists() else {}


def assert_one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def this_update(directory: Path) -> datetime.datetime:
    return x509.load_pem_x509_crl((directory / "crl.pem").read_bytes()).last_update_utc


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    """A certs/ directory after ``datastore certs init --org Lab``."""
    directory = tmp_path / "certs"
    succeed(directory, "init", "--org", "Lab")
    return directory


@dataclass(frozen=True)
class Issued:
    directory: Path
    #: The password ``client ada`` printed for ada.p12.
    password: str


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> Issued:
    """A directory after init, ``server localhost 127.0.0.1`` and a client ada; tests only read it."""
    directory = tmp_path_factory.mktemp("issued") / "certs"
    succeed(directory, "init", "--org", "Lab")
    succeed(directory, "server", "localhost", "127.0.0.1")
    printed = succeed(directory, "client", "ada", "--org", "Lab", "--ou", "Physics", "--country", "NZ")
    match = re.search(r"^password of ada\.p12: (\S+)$", printed, re.MULTILINE)
    assert match, printed
    return Issued(directory, match[1])


# -- init -------------------------------------------------------------------------------------


def test_init_writes_a_ca_certificate_that_ssl_loads_as_a_ca(issued: Issued) -> None:
    ca = issued.directory
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=ca / "ca.pem")
    assert context.cert_store_stats()["x509_ca"] == 1
    constraints = load_certificate(ca / "ca.pem").extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca


def test_init_writes_an_empty_crl_signed_by_the_ca(ca: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=ca / "crl.pem")
    assert context.cert_store_stats()["crl"] == 1
    crl = x509.load_pem_x509_crl((ca / "crl.pem").read_bytes())
    public_key = load_certificate(ca / "ca.pem").public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(public_key)
    assert len(crl) == 0


def test_init_refuses_to_overwrite_an_existing_ca(ca: Path) -> None:
    before = snapshot(ca)
    result = certs(ca, "init", "--org", "Other")
    assert_one_line_error(result, "a CA already exists")
    assert snapshot(ca) == before
    assert {"ca.pem", "ca.key"} <= before.keys()


# -- server -----------------------------------------------------------------------------------


def test_server_certificate_lists_every_host_in_subject_alt_names(issued: Issued) -> None:
    certificate = load_certificate(issued.directory / "server.pem")
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(address) for address in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


@pytest.mark.parametrize("name", ["server", "ada"])
def test_certificate_verifies_with_openssl(issued: Issued, name: str) -> None:
    path = issued.directory / f"{name}.pem"
    result = openssl("verify", "-CAfile", str(issued.directory / "ca.pem"), str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{path}: OK"


@pytest.mark.parametrize("name", ["server", "ada"])
def test_certificate_and_key_load_together_with_ssl(issued: Issued, name: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # load_cert_chain refuses a key that does not match the certificate.
    context.load_cert_chain(issued.directory / f"{name}.pem", issued.directory / f"{name}.key")


def _serve_one_handshake(listener: socket.socket, context: ssl.SSLContext) -> None:
    connection, _address = listener.accept()
    with connection:
        try:
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.recv(1)
        except OSError:
            pass  # the client refused the certificate


def handshake_with_server_certificate(directory: Path, hostname: str) -> None:
    """A real TLS handshake with server.pem on 127.0.0.1, the client checking ``hostname`` against it."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "server.pem", directory / "server.key")
    client = ssl.create_default_context(cafile=directory / "ca.pem")
    assert client.check_hostname
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=_serve_one_handshake, args=(listener, server))
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client.wrap_socket(raw, server_hostname=hostname),
            ):
                pass
        finally:
            thread.join(timeout=10)


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_server_certificate_passes_hostname_checks_for_every_name(issued: Issued, hostname: str) -> None:
    handshake_with_server_certificate(issued.directory, hostname)


@pytest.mark.parametrize("hostname", ["example.org", "127.0.0.2"])
def test_server_certificate_fails_hostname_checks_for_other_names(issued: Issued, hostname: str) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake_with_server_certificate(issued.directory, hostname)


def test_server_before_init_exits_2_with_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    result = certs(directory, "server", "localhost")
    assert_one_line_error(result, "run 'datastore certs init' first")
    assert snapshot(directory) == {}


# -- client -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "subject"),
    [
        pytest.param(["--org", "Lab", "--ou", "Physics", "--country", "NZ"], "/C=NZ/O=Lab/OU=Physics/CN=ada", id="all"),
        pytest.param(["--org", "Venue"], "/O=Venue/CN=ada", id="org"),
        pytest.param([], "/O=Lab/CN=ada", id="the-ca-org-by-default"),
    ],
)
def test_client_certificate_subject_is_written_in_accessgrid_form(ca: Path, args: list[str], subject: str) -> None:
    succeed(ca, "client", "ada", *args)
    result = openssl("x509", "-in", str(ca / "ada.pem"), "-noout", "-subject", "-nameopt", "compat")
    assert result.stdout.strip() == f"subject={subject}"


def test_client_certificate_is_for_client_authentication(issued: Issued) -> None:
    ca_pem, ada_pem = str(issued.directory / "ca.pem"), str(issued.directory / "ada.pem")
    result = openssl("verify", "-purpose", "sslclient", "-CAfile", ca_pem, ada_pem)
    assert result.returncode == 0, result.stdout + result.stderr


def test_p12_opens_with_the_printed_password(issued: Issued) -> None:
    bundle = (issued.directory / "ada.p12").read_bytes()
    key, certificate, extra = pkcs12.load_key_and_certificates(bundle, issued.password.encode())
    assert certificate == load_certificate(issued.directory / "ada.pem")
    assert key is not None and key.public_key() == certificate.public_key()
    assert extra == [load_certificate(issued.directory / "ca.pem")]


def test_p12_does_not_open_with_a_wrong_password(issued: Issued) -> None:
    bundle = (issued.directory / "ada.p12").read_bytes()
    with pytest.raises(ValueError, match="password"):
        pkcs12.load_key_and_certificates(bundle, (issued.password + "x").encode())


@pytest.mark.parametrize("name", ["ca.key", "server.key", "ada.key", "ada.p12"])
def test_private_files_are_mode_0600(issued: Issued, name: str) -> None:
    assert (issued.directory / name).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("../x", id="parent-directory"),
        pytest.param("a/b", id="slash"),
        pytest.param("ca", id="ca"),
        pytest.param("server", id="server"),
        pytest.param("crl", id="crl"),
        pytest.param("", id="empty"),
    ],
)
def test_bad_client_name_exits_2_with_one_line_and_writes_nothing(ca: Path, name: str) -> None:
    before = snapshot(ca)
    assert_one_line_error(certs(ca, "client", name), "invalid client name")
    assert snapshot(ca) == before
    assert [path.name for path in ca.parent.iterdir()] == ["certs"]


# -- revocation -------------------------------------------------------------------------------


def crl_check(directory: Path, name: str) -> subprocess.CompletedProcess[str]:
    ca_pem, crl_pem = str(directory / "ca.pem"), str(directory / "crl.pem")
    return openssl("verify", "-crl_check", "-CRLfile", crl_pem, "-CAfile", ca_pem, str(directory / f"{name}.pem"))


def test_client_passes_the_crl_check_before_it_is_revoked(ca: Path) -> None:
    succeed(ca, "client", "ada")
    result = crl_check(ca, "ada")
    assert result.returncode == 0, result.stdout + result.stderr


def test_revoked_client_fails_the_crl_check(ca: Path) -> None:
    succeed(ca, "client", "ada")
    succeed(ca, "revoke", "ada")
    result = crl_check(ca, "ada")
    assert result.returncode != 0
    assert "certificate revoked" in result.stdout + result.stderr


def test_crl_regenerated_in_quick_succession_has_a_strictly_later_this_update(ca: Path) -> None:
    updates = [this_update(ca)]
    for _ in range(2):
        succeed(ca, "crl")
        updates.append(this_update(ca))
    assert updates[0] < updates[1] < updates[2]


def test_crl_is_never_dated_in_the_future(ca: Path) -> None:
    """A CRL whose thisUpdate is still to come is 'not yet valid' to OpenSSL: no server can use it."""
    for _ in range(2):
        succeed(ca, "crl")
        assert this_update(ca) <= datetime.datetime.now(datetime.UTC)
