"""A throwaway mosquitto for tests: its own config file in a temporary directory, on a free port.

Two configurations: `plain_config` (anonymous, no TLS) and `secure_config` (TLS with client
certificates, a password file and an ACL). `make_certificates` makes a CA, a server and a client
certificate with openssl; `write_password_file` uses mosquitto_passwd when installed, else writes
mosquitto's documented PBKDF2-SHA512 hash itself (`hash_password`).
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
START_TIMEOUT_S = 10.0


def mosquitto_available() -> bool:
    return os.access(MOSQUITTO, os.X_OK)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------ configurations


def _common(directory: Path) -> str:
    # Run as root (CI containers), mosquitto would switch to the "mosquitto" user, who cannot read tmp.
    return (f"user {getpass.getuser()}\n"
            f"persistence true\npersistence_location {directory}/\n"
            "set_tcp_nodelay true\nlog_type error\nlog_type warning\nlog_type notice\nlog_dest stderr\n")


def plain_config(port: int, directory: Path) -> str:
    return f"listener {port} 127.0.0.1\nallow_anonymous true\n" + _common(directory)


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_tls(self) -> dict[str, str]:
        """paho's tls_set() arguments for a client presenting the client certificate."""
        return {"ca_certs": str(self.ca), "certfile": str(self.client_cert), "keyfile": str(self.client_key)}


def secure_config(port: int, directory: Path, certs: Certificates, password_file: Path, acl_file: Path) -> str:
    return (f"listener {port} 127.0.0.1\n"
            f"cafile {certs.ca}\ncertfile {certs.server_cert}\nkeyfile {certs.server_key}\n"
            "require_certificate true\n"
            f"allow_anonymous false\npassword_file {password_file}\nacl_file {acl_file}\n" + _common(directory))


# ------------------------------------------------------------------ credentials


def make_certificates(directory: Path) -> Certificates:
    """A CA, and a server (localhost, 127.0.0.1) and a client certificate it signed; EC P-256, two days."""
    directory.mkdir(parents=True, exist_ok=True)
    certs = Certificates(*(directory / name for name in
                           ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")))
    ca_key = directory / "ca.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", ca_key, "-out", certs.ca, "-days", "2", "-subj", "/CN=edgeshift test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    server_names = "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    for cert, key, name, usage, names in (
            (certs.server_cert, certs.server_key, "localhost", "serverAuth", server_names),
            (certs.client_cert, certs.client_key, "edgeshift-device", "clientAuth", "")):
        request = directory / f"{name}.csr"
        extensions = directory / f"{name}.ext"
        extensions.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                              f"extendedKeyUsage={usage}\nsubjectKeyIdentifier=hash\n"
                              "authorityKeyIdentifier=keyid,issuer\n" + names)
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", key, "-out", request, "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", request, "-CA", certs.ca, "-CAkey", ca_key, "-CAcreateserial",
                 "-out", cert, "-days", "2", "-extfile", extensions)
    return certs


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def hash_password(password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """A mosquitto 2.0 password file hash: `$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>`."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_password_file(path: Path, users: dict[str, str], tool: str | None = shutil.which("mosquitto_passwd")) -> Path:
    path.unlink(missing_ok=True)
    if tool:
        for user, password in users.items():
            subprocess.run([tool, "-b", *(["-c"] if not path.exists() else []), str(path), user, password],
                           check=True, capture_output=True, timeout=30)
    else:
        path.write_text("".join(f"{user}:{hash_password(password)}\n" for user, password in users.items()))
    path.chmod(0o600)
    return path


# ------------------------------------------------------------------ the broker


class Broker:
    """One mosquitto process; `restart` brings it back on the same port with the same config."""

    def __init__(self, config: str, directory: Path, port: int):
        self.port = port
        self.directory = directory
        self.config_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config)
        self._process: subprocess.Popen | None = None

    def start(self) -> Broker:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen([MOSQUITTO, "-c", str(self.config_path)],
                                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._process.returncode}:\n{self.log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {START_TIMEOUT_S} s:\n{self.log}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
