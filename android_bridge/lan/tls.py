"""The clinic server's certificate: made once (ECDSA P-256, self-signed), kept, pinned by devices.

``ensure_certificate(dir, hosts)`` returns the paths of ``cert.pem`` / ``key.pem`` in ``dir``,
making them on first start with ``cryptography`` (the ``serve`` extra): subject and issuer
``medgemma-edge clinic server``, subjectAltName = the bind address(es) + ``localhost`` +
127.0.0.1 and ::1, valid ``days`` (about two years by default). The key is written 0600, both
files atomically (a temp file renamed into place), key first. Later starts reuse them whatever
the bind address: devices pin the certificate itself, so its fingerprint must not change under
them. A half-written or unreadable pair is an error naming the directory, never replaced silently.

The fingerprint devices pin is the SHA-256 of the DER certificate as 64 lowercase hex characters.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from edge.errors import InputError, require
from edge.files import read_bytes

log = logging.getLogger(__name__)

CERT, KEY = "cert.pem", "key.pem"
MAX_PEM_BYTES = 64 << 10
SUBJECT = "medgemma-edge clinic server"
ALWAYS = ("localhost", "127.0.0.1", "::1")  # the names every certificate carries


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path
    fingerprint: str  # sha256 of the DER certificate, 64 lowercase hex
    not_after: dt.datetime
    names: tuple[str, ...]  # the subjectAltName entries (IP addresses and DNS names)


def fingerprint_of(der: bytes) -> str:
    """The pin of a certificate: SHA-256 of its DER bytes, 64 lowercase hex characters."""
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """A fingerprint as given by a person (any case, ``:`` separators) → 64 lowercase hex.

    Raises:
        InputError: not 32 bytes of hex.
    """
    hexed = text.replace(":", "").strip().lower()
    if len(hexed) != 64 or any(c not in "0123456789abcdef" for c in hexed):
        raise InputError("a certificate fingerprint is 64 hex characters (SHA-256 of the DER certificate)")
    return hexed


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _san(hosts: tuple[str, ...]):
    from cryptography import x509

    names, seen = [], set()
    for host in (*hosts, *ALWAYS):
        if host in seen or host in ("0.0.0.0", "::", ""):
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _make(directory: Path, hosts: tuple[str, ...], days: int) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SUBJECT)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # a tablet whose clock lags a little
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(directory / KEY, key_pem, 0o600)
    _write_atomic(directory / CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load(directory: Path) -> Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = directory / CERT, directory / KEY
    try:
        cert = x509.load_pem_x509_certificate(read_bytes(cert_path, limit=MAX_PEM_BYTES, what="certificate"))
        key = read_bytes(key_path, limit=MAX_PEM_BYTES, what="certificate key")
        serialization.load_pem_private_key(key, password=None)
    except (OSError, ValueError, TypeError, InputError) as exc:
        raise InputError(
            f"the LAN certificate in {directory} can't be read ({type(exc).__name__}); "
            "remove that directory to make a new one (paired devices must then pair again)"
        ) from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(v) for v in san.get_values_for_type(x509.IPAddress)) + tuple(
            san.get_values_for_type(x509.DNSName)
        )
    except x509.ExtensionNotFound:
        names = ()
    der = cert.public_bytes(serialization.Encoding.DER)
    return Certificate(cert_path, key_path, fingerprint_of(der), cert.not_valid_after_utc, names)


def ensure_certificate(directory: Path, hosts: tuple[str, ...] = (), *, days: int = 730) -> Certificate:
    """The certificate in ``directory``, made there on first start.

    Args:
        directory: ``<data_dir>/lan/tls``.
        hosts: the bind address(es), put in the subjectAltName of a new certificate.
        days: the validity of a new certificate.
    Raises:
        InputError: one of the two files is there without the other, or they can't be read.
    """
    require("cryptography", "serve")
    directory = Path(directory)
    have = [(directory / n).exists() for n in (CERT, KEY)]
    if have == [False, False]:
        _make(directory, hosts, days)
        made = _load(directory)
        log.info("lan: made a certificate %s (valid %d days)", made.fingerprint, days)
        return made
    if not all(have):
        missing = CERT if not have[0] else KEY
        raise InputError(
            f"{directory} has no {missing}: remove the directory to make a new certificate "
            "(paired devices must then pair again)"
        )
    cert = _load(directory)
    if cert.not_after <= dt.datetime.now(dt.UTC):
        log.warning(
            "lan: the certificate in %s expired on %s; remove the directory to make a new one "
            "(paired devices must then pair again with the new fingerprint)",
            directory,
            cert.not_after.date(),
        )
    missing = [h for h in hosts if h not in cert.names and h not in ("0.0.0.0", "::")]
    if missing:  # devices pin the certificate, not the name: it stays valid for them
        log.info(
            "lan: the certificate does not name %s (pinning clients don't need it to)", ", ".join(missing)
        )
    return cert
