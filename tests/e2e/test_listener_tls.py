"""TLS on the Envoy listener (`tollgate up --tls-cert/--tls-key[/--tls-client-ca]`).

A CA and certificates are made here with `cryptography`; the certificate directory has the
layout of a mounted Kubernetes Secret (files are symlinks through a `..data` symlink that an
update swaps atomically), so rotation is tested the way a cluster performs it. Real Envoy,
extproc and Redis; the official `openai` SDK verifies the server against the test CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from extproc import envoyconf
from extproc.launch import Stack, free_port, start_envoy, start_stack
from tests.e2e.conftest import CliRunner, chat_body

pytestmark = pytest.mark.e2e


# ---- certificates ----------------------------------------------------------------------------


@dataclass
class Issued:
    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), cert, key)


def issue(ca: Issued, common_name: str, *, server: bool) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca.key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), cert, key)


class SecretVolume:
    """A directory laid out like a mounted Kubernetes Secret: `tls.crt -> ..data/tls.crt`,
    `..data -> ..<version>`; `update` writes a new version and swaps `..data` with a rename."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self.version = 0

    def update(self, files: dict[str, bytes]) -> None:
        self.version += 1
        version_dir = self.path / f"..v{self.version}"
        version_dir.mkdir()
        for name, content in files.items():
            (version_dir / name).write_bytes(content)
        tmp_link = self.path / "..data_tmp"
        tmp_link.symlink_to(version_dir.name)
        os.replace(tmp_link, self.path / "..data")
        for name in files:
            link = self.path / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")

    def file(self, name: str) -> str:
        return str(self.path / name)


def trusting(*cas: Issued, client: Issued | None = None, tmp: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata="".join(ca.cert_pem.decode() for ca in cas))
    if client is not None:
        cert_file, key_file = tmp / f"client-{uuid.uuid4().hex}.crt", tmp / "client.key"
        cert_file.write_bytes(client.cert_pem)
        key_file.write_bytes(client.key_pem)
        context.load_cert_chain(cert_file, key_file)
    return context


def served_certificate(port: int) -> x509.Certificate:
    """The certificate Envoy presents right now (no verification: we only read it)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def priced_call(base_url: str, key: str, context: ssl.SSLContext) -> str:
    with httpx.Client(verify=context, timeout=10) as http:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, http_client=http,
                               max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello over TLS"}]
        )
        completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.model_extra is not None
    assert completion.model_extra["xproxy_result"]["priced"] is True
    cost = raw.headers["x-tollgate-cost"]
    assert float(cost) > 0
    return cost


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca("tollgate test CA")


@pytest.fixture(scope="module")
def tls_volume(ca: Issued, tmp_path_factory: pytest.TempPathFactory) -> SecretVolume:
    volume = SecretVolume(tmp_path_factory.mktemp("tls") / "secret")
    server = issue(ca, "tollgate-gateway", server=True)
    volume.update({"tls.crt": server.cert_pem, "tls.key": server.key_pem})
    return volume


@pytest.fixture(scope="module")
def tls_stack(
    redis_url: str,
    e2e_env: dict[str, str],
    tls_volume: SecretVolume,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    running = start_stack(
        log_dir=tmp_path_factory.mktemp("tls-stack"),
        port=free_port(),
        redis_url=redis_url,
        mock_upstream=True,
        env=e2e_env,
        envoy_concurrency=1,
        tls=envoyconf.ListenerTls(tls_volume.file("tls.crt"), tls_volume.file("tls.key")),
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def tls_key(
    cli: CliRunner, tls_stack: Stack, ca: Issued, tmp_path_factory: pytest.TempPathFactory
) -> str:
    key = cli("keys", "create", "tls-" + uuid.uuid4().hex[:8]).stdout.strip().splitlines()[-1]
    context = trusting(ca, tmp=tmp_path_factory.mktemp("ctx"))

    def accepted() -> bool:
        with httpx.Client(verify=context, timeout=10) as http:
            response = http.post(f"{tls_stack.base_url}/v1/chat/completions",
                                 headers={"authorization": f"Bearer {key}"}, json=chat_body())
        return response.status_code == 200

    wait_until(accepted, "the new key to load")
    return key


# ---- tests ---------------------------------------------------------------------------------


def test_openai_sdk_verifying_the_ca_gets_a_priced_response(
    tls_stack: Stack, tls_key: str, ca: Issued, tmp_path: Path
) -> None:
    assert tls_stack.base_url.startswith("https://")
    priced_call(tls_stack.base_url, tls_key, trusting(ca, tmp=tmp_path))


def test_a_client_that_does_not_trust_the_ca_is_refused(
    tls_stack: Stack, tls_key: str, tmp_path: Path
) -> None:
    stranger = make_ca("some other CA")
    with pytest.raises(openai.APIConnectionError):
        priced_call(tls_stack.base_url, tls_key, trusting(stranger, tmp=tmp_path))


def test_a_rotated_certificate_is_served_without_a_restart(
    tls_stack: Stack, tls_key: str, tls_volume: SecretVolume, ca: Issued, tmp_path: Path
) -> None:
    envoy = next(p for p in tls_stack.processes if p.name == "envoy")
    envoy_pid = envoy.pid
    # The new certificate comes from a new CA, so a client trusting only that CA proves which
    # certificate is served: it fails before the rotation and succeeds after it.
    new_ca = make_ca("rotated CA")
    new_server = issue(new_ca, "tollgate-gateway-2", server=True)
    with pytest.raises(openai.APIConnectionError):
        priced_call(tls_stack.base_url, tls_key, trusting(new_ca, tmp=tmp_path))

    first = {name: Path(tls_volume.file(name)).read_bytes() for name in ("tls.crt", "tls.key")}
    tls_volume.update({"tls.crt": new_server.cert_pem, "tls.key": new_server.key_pem})
    try:
        wait_until(
            lambda: served_certificate(tls_stack.port).serial_number
            == new_server.cert.serial_number,
            "Envoy to serve the rotated certificate",
        )
        priced_call(tls_stack.base_url, tls_key, trusting(new_ca, tmp=tmp_path))
        assert envoy.alive() and envoy.pid == envoy_pid  # same process: no restart
    finally:
        # The stack is shared by the module's tests: serve the first certificate again, so
        # the tests that trust the first CA pass in any order.
        tls_volume.update(first)
        wait_until(
            lambda: served_certificate(tls_stack.port).serial_number
            != new_server.cert.serial_number,
            "Envoy to serve the first certificate again",
        )


def test_client_certificates_required(
    tls_stack: Stack, tls_key: str, ca: Issued, tmp_path: Path
) -> None:
    """A second Envoy (same extproc and upstream) whose listener requires client certificates
    from a client CA: without one the handshake fails, with one the call is priced."""
    client_ca = make_ca("client CA")
    volume = SecretVolume(tmp_path / "mtls")
    server = issue(ca, "tollgate-gateway", server=True)
    volume.update({"tls.crt": server.cert_pem, "tls.key": server.key_pem,
                   "ca.crt": client_ca.cert_pem})
    config_dir = tmp_path / "envoy"
    tls = envoyconf.ListenerTls(volume.file("tls.crt"), volume.file("tls.key"),
                                volume.file("ca.crt"), sds_dir=str(config_dir))
    port, admin_port = free_port(), free_port()
    assert tls_stack.mock_port is not None
    config = envoyconf.render_bootstrap(
        clusters=envoyconf.mock_clusters("127.0.0.1", tls_stack.mock_port),
        listen_port=port, admin_port=admin_port, extproc_port=tls_stack.extproc.grpc, tls=tls,
    )
    envoyconf.write_config_dir(config_dir, config, tls)
    envoy = start_envoy(tmp_path / "logs", config, admin_port, concurrency=1)
    try:
        base_url = f"https://127.0.0.1:{port}"
        with pytest.raises(openai.APIConnectionError):
            priced_call(base_url, tls_key, trusting(ca, tmp=tmp_path))
        # A certificate from a CA the gateway does not trust for clients is refused too.
        wrong = issue(make_ca("not the client CA"), "intruder", server=False)
        with pytest.raises(openai.APIConnectionError):
            priced_call(base_url, tls_key, trusting(ca, client=wrong, tmp=tmp_path))
        client = issue(client_ca, "example-app", server=False)
        priced_call(base_url, tls_key, trusting(ca, client=client, tmp=tmp_path))
    finally:
        envoy.stop()
