"""The TLS listener in the generated Envoy bootstrap (pure: dicts in, dicts out).

Serving and reloading with a real Envoy is tests/e2e/test_listener_tls.py; here: what the
generator promises about the files it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import envoyconf

pytestmark = pytest.mark.unit


def _tls_context(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    context: dict[str, Any] = chain["transport_socket"]["typed_config"]
    return context


def test_plain_listener_has_no_tls_and_no_node() -> None:
    config = envoyconf.sidecar_config()
    (listener,) = config["static_resources"]["listeners"]
    assert "transport_socket" not in listener["filter_chains"][0]
    assert "node" not in config  # envoy/envoy.yaml stays as it was


def test_certificate_comes_from_sds_files_watching_the_secret_directory() -> None:
    tls = envoyconf.ListenerTls("/etc/tls/tls.crt", "/etc/tls/tls.key", sds_dir="/etc/envoy")
    config = envoyconf.sidecar_config(tls=tls)
    assert config["node"]["id"] and config["node"]["cluster"]  # file SDS refuses to start without
    context = _tls_context(config)
    assert "require_client_certificate" not in context
    (sds,) = context["common_tls_context"]["tls_certificate_sds_secret_configs"]
    source = sds["sds_config"]["path_config_source"]
    assert source["path"] == f"/etc/envoy/{envoyconf.SDS_CERT_FILE}"

    (document,) = envoyconf.sds_documents(tls).values()
    (secret,) = document["resources"]
    assert secret["name"] == sds["name"]
    certificate = secret["tls_certificate"]
    assert certificate["certificate_chain"] == {"filename": "/etc/tls/tls.crt"}
    assert certificate["private_key"] == {"filename": "/etc/tls/tls.key"}
    # The directory, so that a Secret volume's `..data` symlink swap is noticed.
    assert certificate["watched_directory"] == {"path": "/etc/tls"}


def test_certificate_and_key_in_different_directories_watch_each_file() -> None:
    tls = envoyconf.ListenerTls("/a/tls.crt", "/b/tls.key")
    (document,) = envoyconf.sds_documents(tls).values()
    assert "watched_directory" not in document["resources"][0]["tls_certificate"]


def test_client_ca_requires_client_certificates() -> None:
    tls = envoyconf.ListenerTls("/etc/tls/tls.crt", "/etc/tls/tls.key", "/etc/ca/ca.crt")
    context = _tls_context(envoyconf.sidecar_config(tls=tls))
    assert context["require_client_certificate"] is True
    validation = context["common_tls_context"]["validation_context_sds_secret_config"]
    documents = envoyconf.sds_documents(tls)
    assert validation["sds_config"]["path_config_source"]["path"].endswith(
        envoyconf.SDS_CLIENT_CA_FILE
    )
    (secret,) = documents[envoyconf.SDS_CLIENT_CA_FILE]["resources"]
    assert secret["name"] == validation["name"]
    assert secret["validation_context"]["trusted_ca"] == {"filename": "/etc/ca/ca.crt"}
    assert secret["validation_context"]["watched_directory"] == {"path": "/etc/ca"}


def test_cli_writes_the_bootstrap_and_its_sds_files(tmp_path: Path) -> None:
    assert envoyconf.main(["--tls-cert", "/t/c.pem", "--tls-key", "/t/k.pem",
                           "--tls-client-ca", "/ca/ca.pem", "--sds-dir", "/cfg",
                           "--output-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["envoy.yaml", envoyconf.SDS_CERT_FILE, envoyconf.SDS_CLIENT_CA_FILE]
    )
    config = yaml.safe_load((tmp_path / "envoy.yaml").read_text())
    sds = _tls_context(config)["common_tls_context"]["tls_certificate_sds_secret_configs"][0]
    assert sds["sds_config"]["path_config_source"]["path"] == f"/cfg/{envoyconf.SDS_CERT_FILE}"


@pytest.mark.parametrize("argv", [
    ["--tls-cert", "/t/c.pem"],                                  # no key
    ["--tls-key", "/t/k.pem", "--output-dir", "x"],              # no certificate
    ["--tls-cert", "/t/c.pem", "--tls-key", "/t/k.pem"],         # SDS files need a directory
])
def test_cli_refuses_incomplete_tls_options(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        envoyconf.main(argv)
    assert exit_info.value.code == 2
    assert "tls" in capsys.readouterr().err.lower()
