"""A small Python client for the clinic server: HTTPS pinned to the certificate's fingerprint.

What ``medgemma-edge lan`` and the tests use; the Java/Kotlin clients do the same (BridgeClient).
The TLS handshake does not check the certificate against any CA (it is self-signed, for an IP
address): right after it, the server's certificate is hashed and compared in constant time
with the pin, and the connection is closed before a byte is sent when they differ.
"""

from __future__ import annotations

import hmac
import http.client
import json
import secrets
import ssl
from urllib.parse import urlsplit

from android_bridge.lan.tls import fingerprint_of, normalize_fingerprint
from edge.errors import EdgeError, InputError


class PinMismatch(EdgeError):
    """The server's certificate is not the pinned one: a different server, or a new certificate."""


class ServerError(EdgeError):
    """The server answered with an error (its code and message)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.status = status
        self.code = code


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection that accepts exactly the certificate whose SHA-256 is ``fingerprint``."""

    def __init__(self, host: str, port: int, fingerprint: str, *, timeout: float = 60.0):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # the pin below stands in for the name and the CA
        ctx.verify_mode = ssl.CERT_NONE
        super().__init__(host, port, timeout=timeout, context=ctx)
        self.pin = normalize_fingerprint(fingerprint)

    def connect(self) -> None:
        super().connect()
        der = self.sock.getpeercert(binary_form=True) or b""
        if not hmac.compare_digest(fingerprint_of(der), self.pin):
            self.close()
            raise PinMismatch(
                f"the server at {self.host}:{self.port} shows a certificate other than the pinned one "
                "(a different server, or its certificate was made anew): not connecting"
            )


def pinned_context(url: str, fingerprint: str, *, timeout: float = 10.0) -> ssl.SSLContext:
    """An SSL context that trusts the pinned certificate only, for other HTTP clients (httpx,
    the ``openai`` package): the server's certificate is fetched (a handshake, nothing sent),
    checked against the pin, and made the context's one trust anchor, so every later handshake
    with this context fails unless the server shows that same certificate.

    Raises:
        PinMismatch: the server's certificate is not the pinned one.
    """
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or not parts.port:
        raise InputError(f"a clinic server's URL is https://HOST:PORT, not {url[:80]!r}")
    pem = ssl.get_server_certificate((parts.hostname, parts.port), timeout=timeout)
    if not hmac.compare_digest(
        fingerprint_of(ssl.PEM_cert_to_DER_cert(pem)), normalize_fingerprint(fingerprint)
    ):
        raise PinMismatch(
            f"the server at {parts.hostname}:{parts.port} shows a certificate other than the pinned one"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the certificate itself is the trust anchor; it may not name this address
    ctx.load_verify_locations(cadata=pem)
    return ctx


def connection(url: str, fingerprint: str, *, timeout: float = 60.0) -> PinnedHTTPSConnection:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or not parts.port:
        raise InputError(f"a clinic server's URL is https://HOST:PORT, not {url[:80]!r}")
    return PinnedHTTPSConnection(parts.hostname, parts.port, fingerprint, timeout=timeout)


def _json(resp: http.client.HTTPResponse) -> dict:
    body = resp.read()
    try:
        return json.loads(body)
    except ValueError:
        raise ServerError(resp.status, "invalid_reply", "the server's reply is not JSON") from None


def pair(url: str, fingerprint: str, code: str, device: str, *, timeout: float = 60.0) -> dict:
    """Exchange a pairing code for this device's token: ``{token, device_id, fingerprint}``.

    Raises:
        PinMismatch: the server's certificate is not the pinned one.
        ServerError: the server refused (401 unauthorized: a wrong, expired or used code).
    """
    conn = connection(url, fingerprint, timeout=timeout)
    try:
        body = json.dumps({"code": code, "device": device}).encode()
        conn.request("POST", "/v1/pair", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        reply = _json(resp)
    finally:
        conn.close()
    if resp.status != 200:
        err = reply.get("error") or {}
        raise ServerError(resp.status, str(err.get("code")), str(err.get("message")))
    return reply


def rpc(
    url: str, fingerprint: str, token: str, op: str, params: dict | None = None, *, timeout: float = 60.0
):
    """One protocol request over ``POST /v1/rpc``: (HTTP status, [replies], ``done`` last)."""
    conn = connection(url, fingerprint, timeout=timeout)
    req = {"v": 1, "id": f"py-{secrets.token_hex(6)}", "op": op, "params": params or {}}
    try:
        conn.request(
            "POST",
            "/v1/rpc",
            body=json.dumps(req).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        if resp.headers.get_content_type() != "application/x-ndjson":
            err = _json(resp).get("error") or {}
            raise ServerError(resp.status, str(err.get("code")), str(err.get("message")))
        replies = [json.loads(line) for line in resp if line.strip()]
    finally:
        conn.close()
    return resp.status, replies


def result(url: str, fingerprint: str, token: str, op: str, params: dict | None = None) -> dict:
    """:func:`rpc`'s result, or :class:`ServerError` for its error."""
    status, replies = rpc(url, fingerprint, token, op, params)
    for msg in replies:
        if msg["type"] == "error":
            raise ServerError(status, msg["error"]["code"], msg["error"]["message"])
        if msg["type"] == "result":
            return msg["result"]
    raise ServerError(status, "cancelled", f"{op} ended without a result")
