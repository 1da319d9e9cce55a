"""TLS and mTLS on every hop: client -> tokenizer -> engine -> remote worker, real processes, certificates made
here (a CA, server and client certificates, and a CA nobody trusts); refusals at every hop; certificate rotation."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera import cli
from tessera.engine.v1 import engine_pb2
from tessera.serving import CertificateReloader, Server, ServerTls, is_loopback
from tessera.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from servers import ServerProcess, free_port

x509 = pytest.importorskip("cryptography.x509")
from tls_certificates import Ca  # noqa: E402  (a CA that issues leaf certificates; needs cryptography)

DEMO = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"


# -- certificates -----------------------------------------------------------------------------------------------

def write_atomically(path: Path, data: bytes) -> None:
    """As a secret mount updates: the new file replaces the old one in one rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Pki:
    def __init__(self, root: Path):
        self.root = root
        self.ca = Ca("tessera test CA")
        self.untrusted = Ca("nobody's CA")
        self.write("ca.pem", self.ca.pem())
        self.write("untrusted-ca.pem", self.untrusted.pem())
        # The front door and the worker: localhost and 127.0.0.1. The engine's names only localhost, as a pod's
        # certificate names its Service rather than its IP: the tokenizer reaches it through dns:///localhost.
        self.server_serial = self.pair("server", self.ca.issue("server", ("localhost",), ("127.0.0.1",)))
        self.pair("engine", self.ca.issue("engine", ("localhost",)))
        self.pair("client", self.ca.issue("client", client=True))
        self.pair("intruder", self.untrusted.issue("client", client=True))

    def write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        write_atomically(path, data)
        return path

    def pair(self, name: str, issued: tuple[bytes, bytes, int]) -> int:
        cert, key, serial = issued
        self.write(f"{name}-key.pem", key)  # the key first: until the cert follows the pair does not match
        self.write(f"{name}.pem", cert)
        return serial

    def path(self, name: str) -> str:
        return str(self.root / name)

    def server_flags(self, name: str = "server") -> list[str]:
        return ["--tls-cert", self.path(f"{name}.pem"), "--tls-key", self.path(f"{name}-key.pem"),
                "--tls-client-ca", self.path("ca.pem")]

    def client_flags(self, prefix: str, who: str = "client") -> list[str]:
        return [f"--{prefix}-ca", self.path("ca.pem"), f"--{prefix}-cert", self.path(f"{who}.pem"),
                f"--{prefix}-key", self.path(f"{who}-key.pem")]

    def credentials(self, who: str | None = "client", ca: str = "ca.pem") -> grpc.ChannelCredentials:
        root = (self.root / ca).read_bytes()
        if who is None:
            return grpc.ssl_channel_credentials(root)
        return grpc.ssl_channel_credentials(root, (self.root / f"{who}-key.pem").read_bytes(),
                                            (self.root / f"{who}.pem").read_bytes())


LOCALHOST = [("grpc.ssl_target_name_override", "localhost")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def chain(pki):
    """worker <-mTLS- engine <-mTLS- tokenizer, each serving mTLS."""
    creds = pki.credentials()
    worker = ServerProcess("worker", "--model", str(DEMO), "--kv-cache-memory", "64MiB", *pki.server_flags("server"),
                           credentials=creds)
    with worker:
        engine = ServerProcess("engine", "--model", str(DEMO), "--worker", worker.address,
                               *pki.client_flags("worker-tls"), *pki.server_flags("engine"),
                               credentials=creds, options=LOCALHOST)
        with engine:
            metrics_port = free_port()
            tokenizer = ServerProcess("tokenizer", "--model", str(DEMO), "--engine", f"dns:///localhost:{engine.port}",
                                      *pki.client_flags("engine-tls"), *pki.server_flags("server"),
                                      "--metrics-port", str(metrics_port), credentials=creds)
            tokenizer.metrics_port = metrics_port
            with tokenizer:
                yield {"worker": worker, "engine": engine, "tokenizer": tokenizer}


def check(address: str, credentials: grpc.ChannelCredentials | None, options=None) -> int:
    channel = (grpc.insecure_channel(address, options=options) if credentials is None
               else grpc.secure_channel(address, credentials, options=options))
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def generate_request(max_tokens: int = 12) -> tokenizer_pb2.GenerateRequest:
    return tokenizer_pb2.GenerateRequest(text="Once upon a time", sampling=engine_pb2.SamplingParams(temperature=0.0),
                                         stopping=engine_pb2.StoppingParams(max_tokens=max_tokens, ignore_eos=True))


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tessera.cli", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=timeout)


# -- the chain ------------------------------------------------------------------------------------------------

def test_generate_streams_through_mtls_on_every_hop(pki, chain):
    with grpc.secure_channel(chain["tokenizer"].address, pki.credentials()) as channel:
        responses = list(tokenizer_pb2_grpc.TextGenerationStub(channel).Generate(generate_request()))
    assert len(responses) > 1
    assert "".join(r.text for r in responses)


@pytest.mark.parametrize("hop", ["worker", "engine", "tokenizer"])
@pytest.mark.parametrize("client", ["plaintext", "untrusted certificate", "no certificate"])
def test_every_hop_refuses_a_client_without_a_trusted_certificate(pki, chain, hop, client):
    credentials = {"plaintext": None, "untrusted certificate": pki.credentials("intruder"),
                   "no certificate": pki.credentials(None)}[client]
    options = LOCALHOST if hop == "engine" else None
    assert check(chain[hop].address, pki.credentials(), options) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as refused:
        check(chain[hop].address, credentials, options)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_ca_refuses_it(pki, chain):
    with pytest.raises(grpc.RpcError) as refused:
        check(chain["tokenizer"].address, pki.credentials("client", ca="untrusted-ca.pem"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_and_generate_commands_over_mtls(pki, chain):
    address = chain["tokenizer"].address
    healthy = run_cli("health", "--address", address, *pki.client_flags("tls"))
    assert healthy.returncode == 0, healthy.stderr
    assert "SERVING" in healthy.stdout
    without_cert = run_cli("health", "--address", address, "--tls-ca", pki.path("ca.pem"))
    assert without_cert.returncode == 1
    plaintext = run_cli("health", "--address", address)
    assert plaintext.returncode == 1
    generated = run_cli("generate", "Once upon a time", "--address", address, "--max-tokens", "8", "--wait", "10",
                        *pki.client_flags("tls"))
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("Once upon a time") and len(generated.stdout) > len("Once upon a time\n")


def served_serial(port: int, pki: Pki) -> int:
    """The serial of the certificate the server presents to a new connection."""
    context = ssl.create_default_context(cafile=pki.path("ca.pem"))
    context.load_cert_chain(pki.path("client.pem"), pki.path("client-key.pem"))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_a_rotated_certificate_is_used_by_new_connections_while_open_streams_finish(pki, chain):
    tokenizer = chain["tokenizer"]
    assert served_serial(tokenizer.port, pki) == pki.server_serial
    assert served_serial(tokenizer.metrics_port, pki) == pki.server_serial
    old = grpc.secure_channel(tokenizer.address, pki.credentials())
    try:
        stream = tokenizer_pb2_grpc.TextGenerationStub(old).Generate(generate_request(max_tokens=96))
        first = next(stream)  # the stream is open on a connection made with the old certificate

        new_serial = pki.server_serial + 1
        pki.pair("server", pki.ca.issue("server", ("localhost",), ("127.0.0.1",), serial=new_serial))
        assert served_serial(tokenizer.port, pki) == new_serial
        assert served_serial(tokenizer.metrics_port, pki) == new_serial  # the metrics endpoint follows
        with grpc.secure_channel(tokenizer.address, pki.credentials()) as fresh:
            fresh_responses = list(tokenizer_pb2_grpc.TextGenerationStub(fresh).Generate(generate_request()))
        assert fresh_responses

        rest = list(stream)
        assert stream.code() == grpc.StatusCode.OK
        assert "".join(r.text for r in [first, *rest])
    finally:
        old.close()


def scrape(port: int, pki: Pki, who: str | None = "client") -> str:
    context = ssl.create_default_context(cafile=pki.path("ca.pem"))
    if who is not None:
        context.load_cert_chain(pki.path(f"{who}.pem"), pki.path(f"{who}-key.pem"))
    with urllib.request.urlopen(f"https://localhost:{port}/metrics", context=context, timeout=5) as response:
        return response.read().decode()


def test_the_metrics_endpoint_serves_https_and_requires_client_certificates_like_the_grpc_port(pki, chain):
    port = chain["tokenizer"].metrics_port
    assert "tessera_requests_total" in scrape(port, pki)
    for refused in (lambda: scrape(port, pki, who=None), lambda: scrape(port, pki, who="intruder"),
                    lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()):
        with pytest.raises((OSError, HTTPException)):  # ssl.SSLError, a reset or a bad status line
            refused()
    assert "tessera_requests_total" in scrape(port, pki)  # refusals cost nothing


def test_a_rotated_client_certificate_is_what_the_tokenizer_presents_when_it_dials_the_engine_again(tmp_path):
    """The engines' client CA and the tokenizer's client certificate rotate to a new CA. The tokenizer dials the
    engine again with its new certificate at once (its open stream finishes on the old connection), so when the
    engine restarts trusting only the new CA, the tokenizer still gets in."""
    pki = Pki(tmp_path)
    pki.write("client-ca.pem", pki.ca.pem())
    pki.pair("tokenizer-client", pki.ca.issue("tokenizer", client=True))
    engine = ServerProcess("engine", "--model", str(DEMO), "--tls-cert", pki.path("engine.pem"),
                           "--tls-key", pki.path("engine-key.pem"), "--tls-client-ca", pki.path("client-ca.pem"),
                           credentials=pki.credentials(), options=LOCALHOST)
    with engine, ServerProcess("tokenizer", "--model", str(DEMO), "--engine", f"dns:///localhost:{engine.port}",
                               *pki.client_flags("engine-tls", "tokenizer-client")) as tokenizer:
        with grpc.insecure_channel(tokenizer.address) as channel:
            stub = tokenizer_pb2_grpc.TextGenerationStub(channel)
            stream = stub.Generate(generate_request(max_tokens=96))
            first = next(stream)

            rotated = Ca("rotated client CA")
            pki.write("client-ca.pem", rotated.pem())
            pki.pair("tokenizer-client", rotated.issue("tokenizer", client=True))
            time.sleep(2.0)  # a few of the tokenizer's polls
            assert "".join(r.text for r in [first, *stream]) and stream.code() == grpc.StatusCode.OK

            engine.stop()
            engine.credentials = pki.credentials("tokenizer-client")  # only the new CA's certificates get in now
            engine.start()
            deadline = time.monotonic() + 20
            while True:  # until the tokenizer has seen the engine back
                try:
                    assert list(stub.Generate(generate_request(), timeout=10))
                    break
                except grpc.RpcError as error:
                    assert time.monotonic() < deadline, error
                    time.sleep(0.5)


# -- flags and warnings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["worker", "--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
    (["tokenizer", "--tls-key", "{key}"], "--tls-cert and --tls-key go together"),
    (["engine", "--tls-client-ca", "{ca}"], "--tls-client-ca (mTLS) needs --tls-cert"),
    (["tokenizer", "--engine-tls-cert", "{cert}", "--engine-tls-key", "{key}"], "--engine-tls-cert (mTLS) needs"),
    (["engine", "--worker-tls-ca", "{ca}", "--worker-tls-cert", "{cert}"], "--worker-tls-cert and --worker-tls-key"),
    (["generate", "hi", "--tls-key", "{key}"], "--tls-cert and --tls-key go together"),
    (["health", "--tls-ca", "/no/such/ca.pem"], "no readable file"),
])
def test_bad_tls_flag_combinations_are_usage_errors(pki, capsys, argv, message):
    files = {"cert": pki.path("server.pem"), "key": pki.path("server-key.pem"), "ca": pki.path("ca.pem")}
    with pytest.raises(SystemExit) as exit_:
        cli.main([arg.format(**files) for arg in argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "[::1]", "::1", "127.1.2.3"]))
    assert not any(map(is_loopback, ["[::]", "0.0.0.0", "10.0.0.1", "example.com"]))


def test_plaintext_on_a_non_loopback_address_warns_naming_the_flag(caplog):
    async def bind(host: str) -> None:
        server = Server(0, host)
        await server.start()
        await server.grpc.stop(0)

    with caplog.at_level(logging.WARNING, logger="tessera.server"):
        asyncio.run(bind("127.0.0.1"))
        assert not caplog.records
        asyncio.run(bind("[::]"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--tls-cert/--tls-key" in warnings[0].getMessage()


def test_the_reloader_waits_for_a_matching_pair_and_rereads_on_force(tmp_path):
    pki = Pki(tmp_path)
    reloader = CertificateReloader(ServerTls(pki.path("server.pem"), pki.path("server-key.pem"), pki.path("ca.pem")))
    assert reloader() is None  # unchanged
    cert, key, _ = pki.ca.issue("server", ("localhost",))
    pki.write("server-key.pem", key)  # the new key, the old certificate: not a pair
    assert reloader() is None
    pki.write("server.pem", cert)
    assert reloader() is not None
    assert reloader() is None
    reloader.force()
    assert reloader() is not None


def test_a_bad_certificate_at_startup_is_an_error_naming_the_files(tmp_path):
    pki = Pki(tmp_path)
    with pytest.raises(ValueError, match="cannot load the TLS files"):
        CertificateReloader(ServerTls(pki.path("server.pem"), pki.path("client-key.pem")))
