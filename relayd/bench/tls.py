"""relay-32-tls's TLS: a CA and a server certificate made at bench time, and the
bench's side of TLS (its HTTP clients; its agents use trio-websocket's).

Certificates (:func:`make_certificate`): a throwaway CA and a certificate it
issues for ``IP:127.0.0.1``, both ECDSA P-256 (what most sites serve; the
key's kind matters only for handshakes, which happen before the clock starts),
valid for two days, written as PEM files to the unit's directory. relayd is
given the certificate and key in ``[server]`` (``server.tls_certificate``,
``server.tls_key``), the clients trust the CA. They are made with the
``cryptography`` package when it can be imported (it is no dependency of
relayd's: trustme, a test dependency, brings it), else with the ``openssl``
command; the report says which (``tls_certificate_by``). trustme itself is a
test dependency and is not used here.

Clients (:class:`TlsSocketStream`): TLS over the client's non-blocking
socket with :class:`ssl.SSLSocket`'s own reads and writes (OpenSSL on the
socket, in C), not ``trio.SSLStream`` (OpenSSL over memory buffers, with a
Python layer around every read and write). The bench's cost per request is
part of what a run on a busy two-CPU machine measures (see
docs/performance.md), and the cheaper client keeps relay-32-tls's figure the
relay's. relayd's side is whatever relayd does (``relayd.tls``).
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

__all__ = [
    "METHODS",
    "BenchCertificate",
    "TlsSetupError",
    "TlsSocketStream",
    "available_methods",
    "make_certificate",
    "open_tls_stream",
]

HOST = "127.0.0.1"
VALID_DAYS = 2
OPENSSL_TIMEOUT = 30.0
# How certificates can be made, in the order they are tried.
METHODS = ("cryptography", "openssl")
_RECEIVE_SIZE = 65536


class TlsSetupError(Exception):
    """No certificate could be made (neither ``cryptography`` nor ``openssl``)."""


@dataclass(frozen=True)
class BenchCertificate:
    """PEM files for one relayd: the CA the clients trust, its certificate and key."""

    ca: Path
    certificate: Path
    key: Path
    made_with: str  # "cryptography 50.0.2", "openssl (OpenSSL 3.0.19 ...)"

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only the bench's CA, checking the host name."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


def available_methods() -> list[str]:
    """The ways of :data:`METHODS` this machine has, in order."""
    found = []
    if importlib.util.find_spec("cryptography") is not None:
        found.append("cryptography")
    if shutil.which("openssl") is not None:
        found.append("openssl")
    return found


def make_certificate(directory: Path, method: str | None = None) -> BenchCertificate:
    """A CA and a certificate for 127.0.0.1 in ``directory`` (see the module docstring).

    ``method``: one of :data:`METHODS`, or None for the first available.
    Raises TlsSetupError when it cannot be done.
    """
    methods = available_methods()
    if method is None:
        if not methods:
            raise TlsSetupError(
                "relay-32-tls needs a certificate: install the cryptography package "
                "or the openssl command"
            )
        method = methods[0]
    elif method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    elif method not in methods:
        raise TlsSetupError(f"cannot make a certificate with {method}: not installed")
    directory.mkdir(parents=True, exist_ok=True)
    if method == "cryptography":
        return _with_cryptography(directory)
    return _with_openssl(directory)


def _with_cryptography(directory: Path) -> BenchCertificate:
    import cryptography
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relayd bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = BenchCertificate(
        directory / "ca.pem",
        directory / "certificate.pem",
        directory / "key.pem",
        f"cryptography {cryptography.__version__}",
    )
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.certificate.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files.key.touch(mode=0o600)
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


_LEAF_EXTENSIONS = f"""\
basicConstraints = critical, CA:FALSE
subjectAltName = IP:{HOST}
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _with_openssl(directory: Path) -> BenchCertificate:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsSetupError("the openssl command is not installed")

    def run(*arguments: str) -> str:
        try:
            done = subprocess.run(
                [openssl, *arguments],
                cwd=directory,
                capture_output=True,
                text=True,
                timeout=OPENSSL_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise TlsSetupError(f"openssl {arguments[0]}: {error}") from None
        if done.returncode != 0:
            raise TlsSetupError(
                f"openssl {' '.join(arguments)} failed ({done.returncode}): "
                f"{done.stderr.strip()[-500:]}"
            )
        return done.stdout.strip()

    version = run("version")
    days = str(VALID_DAYS)
    p256 = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    run("genpkey", *p256, "-out", "ca-key.pem")
    run(
        "req", "-x509", "-new", "-key", "ca-key.pem", "-sha256", "-days", days,
        "-subj", "/CN=relayd bench CA", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    key = directory / "key.pem"
    key.touch(mode=0o600)
    run("genpkey", *p256, "-out", "key.pem")
    run("req", "-new", "-key", "key.pem", "-subj", f"/CN={HOST}", "-out", "request.pem")
    (directory / "leaf.ext").write_text(_LEAF_EXTENSIONS)
    run(
        "x509", "-req", "-in", "request.pem", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-sha256", "-days", days, "-extfile", "leaf.ext",
        "-out", "certificate.pem",
    )  # fmt: skip
    return BenchCertificate(
        directory / "ca.pem", directory / "certificate.pem", key, f"openssl ({version})"
    )


# -- the clients' TLS ----------------------------------------------------------------------


class TlsSocketStream(trio.abc.Stream):
    """A client's TLS connection on a non-blocking :class:`ssl.SSLSocket` (see the
    module docstring). Reads and writes try the socket first and wait only when
    OpenSSL wants to; like relayd's ``read_some``, a read that finds data does not
    pass through the scheduler (the bench's clients always wait for an answer
    first). Ends of the connection: ``receive_some`` returns b"" at its end,
    ``send_all`` raises ``trio.BrokenResourceError``."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.socket = sock

    @property
    def session(self) -> str:
        """The protocol version and cipher, as ``"TLSv1.3 TLS_AES_256_GCM_SHA384"``."""
        cipher = self.socket.cipher()
        return f"{self.socket.version()} {cipher[0] if cipher else '?'}"

    async def handshake(self) -> None:
        while True:
            try:
                self.socket.do_handshake()
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.socket)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.socket.send(view)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)
                continue
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.socket)
                continue
            except (OSError, ValueError) as error:  # ValueError: closed
                raise trio.BrokenResourceError(str(error)) from error
            view = view[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = max_bytes or _RECEIVE_SIZE
        while True:
            try:
                return self.socket.recv(size)
            except ssl.SSLWantReadError:
                pass  # wait outside the handler
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except (OSError, ValueError):  # reset; ValueError: closed
                return b""
            try:
                await trio.lowlevel.wait_readable(self.socket)
            except trio.ClosedResourceError:
                return b""

    async def aclose(self) -> None:
        if self.socket.fileno() >= 0:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()


async def open_tls_stream(host: str, port: int, context: ssl.SSLContext) -> TlsSocketStream:
    """A TCP connection to ``host:port`` (``TCP_NODELAY`` as trio sets it), TLS
    handshake done."""
    tcp = await trio.open_tcp_stream(host, port)
    raw = socket.socket(fileno=tcp.socket.detach())
    try:
        raw.setblocking(False)
        tls = context.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        raw.close()
        raise
    stream = TlsSocketStream(tls)
    try:
        await stream.handshake()
    except OSError as error:  # ssl.SSLError among them: an untrusted certificate, say
        await stream.aclose()
        raise OSError(f"TLS handshake with {host}:{port} failed: {error}") from error
    except BaseException:
        await stream.aclose()
        raise
    return stream
