"""The Prometheus endpoint (--metrics-port): plain HTTP, or HTTPS with the server's own --tls-* files.

It binds the server's --host (not every interface), and with TLS it follows the gRPC listener: the same
certificate and key, client certificates required when --tls-client-ca is set, and the files re-read for the
next connection whenever they change (or on SIGHUP), so a rotated certificate reaches scrapers as well.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from http.server import ThreadingHTTPServer

from prometheus_client.core import REGISTRY
from prometheus_client.exposition import MetricsHandler

log = logging.getLogger("tessera.metrics")

HANDSHAKE_TIMEOUT_S = 10.0  # a client that connects and says nothing holds one thread, not forever


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, tls=None):
        """host as given to --host ("[::]", "127.0.0.1", ...); tls: a serving.ServerTls, or None for HTTP."""
        name = host.strip("[]")
        self.address_family = socket.AF_INET6 if ":" in name else socket.AF_INET
        super().__init__((name, port), MetricsHandler.factory(REGISTRY))
        self.tls = tls
        self._lock = threading.Lock()
        self._stamp, self._context = None, None
        if tls is not None:
            self._stamp, self._context = tls.stamp(), self._load()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls.cert, self.tls.key)
        if self.tls.client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.tls.client_ca)
        return context

    def force_reload(self) -> None:
        """Re-read the TLS files for the next connection even if they look unchanged (SIGHUP)."""
        self._stamp = None

    def context(self) -> ssl.SSLContext:
        with self._lock:
            try:
                stamp = self.tls.stamp()
                if stamp != self._stamp:
                    self._context, self._stamp = self._load(), stamp
                    log.info("metrics TLS certificate reloaded from %s", self.tls.cert)
            except (OSError, ssl.SSLError, ValueError) as error:  # half-written: keep the one we have
                log.warning("TLS files changed but cannot be loaded (metrics keep the current one): %s", error)
            return self._context

    def finish_request(self, request, client_address) -> None:
        # On the request's own thread, so a slow handshake never holds up accept().
        if self.tls is None:
            return super().finish_request(request, client_address)
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        with self.context().wrap_socket(request, server_side=True) as tls_socket:
            super().finish_request(tls_socket, client_address)

    def handle_error(self, request, client_address) -> None:
        # A refused handshake (plaintext, no or untrusted client certificate) is the client's problem.
        log.debug("metrics request from %s failed", client_address, exc_info=True)

    def start(self) -> MetricsServer:
        threading.Thread(target=self.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics on %s port %d (%s)", self.server_address[0] or "*", self.port,
                 "HTTP" if self.tls is None else "HTTPS" + (", client certificates required" if self.tls.client_ca
                                                             else ""))
        return self
