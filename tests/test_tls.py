"""The real `openai` Python client over TLS: `pdgate up` with `[server.tls]` and a certificate from a
test CA made here, the client trusting that CA only (an `httpx.Client` with it as the bundle)."""

import datetime
import ipaddress
import ssl

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import _free_port, start_up, stop_up


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca_and_leaf(tmp_path):
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("pdgate test ca"))
        .issuer_name(_name("pdgate test ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("pdgate gateway"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "cert.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "ca.pem"


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    ca = _ca_and_leaf(tmp)
    port = _free_port()
    config = tmp / "pdgate.toml"
    config.write_text(
        f'[server]\nport = {port}\n\n[server.tls]\ncert_file = "{tmp / "cert.pem"}"\n'
        f'key_file = "{tmp / "key.pem"}"\n'
    )
    base = f"https://127.0.0.1:{port}"

    def ready(url):
        try:
            return httpx.get(f"{url}/ready", verify=_trusting(ca), timeout=1).json().get("ready")
        except httpx.HTTPError:
            return False

    proc = start_up(["--config", str(config), "--time-scale", "0.01"], base, ready)
    yield base, ca
    stop_up(proc)


def _trusting(ca):
    return ssl.create_default_context(cafile=str(ca))


def _client(base, verify):
    return openai.OpenAI(
        base_url=f"{base}/v1",
        api_key="unused",
        max_retries=0,
        timeout=30,
        http_client=httpx.Client(verify=verify),
    )


def test_openai_client_over_tls_non_streaming(tls_gateway):
    base, ca = tls_gateway
    client = _client(base, _trusting(ca))
    r = client.chat.completions.create(
        model="pdgate-sim-8b", messages=[{"role": "user", "content": "hello over tls"}], max_tokens=6
    )
    assert r.choices[0].message.content
    assert r.usage.completion_tokens == 6


def test_openai_client_over_tls_streaming(tls_gateway):
    base, ca = tls_gateway
    client = _client(base, _trusting(ca))
    stream = client.chat.completions.create(
        model="pdgate-sim-8b",
        messages=[{"role": "user", "content": "stream over tls"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text
    assert usage is not None and usage.completion_tokens == 5


def test_a_client_without_the_ca_refuses_the_gateway(tls_gateway):
    base, _ = tls_gateway
    client = _client(base, True)  # the system's roots: they never issued the test CA's certificate
    with pytest.raises(openai.APIConnectionError):
        client.models.list()
