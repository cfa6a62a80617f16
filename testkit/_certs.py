"""Test PKI: a CA plus server and client certificates, made with the ``openssl`` CLI.

The server certificate carries ``subjectAltName = IP:127.0.0.1, DNS:localhost`` so clients
verify it against loopback. Keys are EC P-256 (fast to generate).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pki", "make_pki"]


@dataclass(frozen=True, slots=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # Signed by a different CA: etcd with --client-cert-auth must refuse it.
    rogue_cert: Path
    rogue_key: Path
    # Signed by the CA, with no CommonName: what etcd's gateway accepts when auth is on.
    no_cn_cert: Path
    no_cn_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("the openssl CLI is needed to make test certificates")
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key.name, cwd=d)
    _openssl("req", "-x509", "-new", "-key", key.name, "-sha256", "-days", "2",
             "-subj", f"/CN={name}", "-out", cert.name,
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    return cert, key


def _leaf(
    d: Path, name: str, ca: tuple[Path, Path], ext: str, subject: str | None = None
) -> tuple[Path, Path]:
    key, csr, cert = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt"
    extfile = d / f"{name}.ext"
    extfile.write_text(ext)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key.name, cwd=d)
    subj = subject if subject is not None else f"/CN={name}"
    _openssl("req", "-new", "-key", key.name, "-subj", subj, "-out", csr.name, cwd=d)
    _openssl("x509", "-req", "-in", csr.name, "-CA", ca[0].name, "-CAkey", ca[1].name,
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", extfile.name,
             "-out", cert.name, cwd=d)  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> Pki:
    """Write a CA, a server cert for 127.0.0.1, a client cert (CN=client), a rogue client
    cert, and a client cert without a CommonName."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "ca")
    server = _leaf(
        directory,
        "server",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature\n",
    )
    client = _leaf(
        directory, "client", ca, "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n"
    )
    rogue_ca = _ca(directory, "rogue-ca")
    rogue = _leaf(
        directory, "rogue", rogue_ca, "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n"
    )
    no_cn = _leaf(
        directory,
        "no-cn",
        ca,
        "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n",
        subject="/O=discovery-mdc tests",
    )
    return Pki(ca[0], *server, *client, *rogue, *no_cn)
