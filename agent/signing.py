"""ed25519 signatures over manifest.json's bytes (manifest.sig): who may publish a portfolio to a device.

The manifest carries every file's sha256, so a valid signature vouches for the whole portfolio.
`cryptography` is imported only here, only when a key is configured.
"""
from __future__ import annotations

from pathlib import Path

from agent.portfolio import MANIFEST_FILE, PortfolioError

SIGNATURE_FILE = "manifest.sig"


def verify_manifest_signature(root: Path, public_key_path: Path) -> None:
    """Raise PortfolioError unless root/manifest.sig is a valid signature of root/manifest.json."""
    from cryptography.exceptions import InvalidSignature

    public_key = _load_public_key(Path(public_key_path))
    signature_path = Path(root) / SIGNATURE_FILE
    try:
        signature = signature_path.read_bytes()
        manifest = (Path(root) / MANIFEST_FILE).read_bytes()
    except FileNotFoundError as missing:
        raise PortfolioError(f"{Path(missing.filename).name}: missing, and this agent only accepts signed "
                             f"portfolios (public key {public_key_path}); sign it with `edgeshift-export sign`") from None
    try:
        public_key.verify(signature, manifest)
    except InvalidSignature:
        raise PortfolioError(f"{SIGNATURE_FILE}: the signature does not verify with {public_key_path}: the manifest "
                             "was changed after signing, or signed with another key") from None


def sign_manifest(root: Path, private_key_path: Path) -> Path:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(private_key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise PortfolioError(f"{private_key_path}: not an unencrypted PEM private key: {error}") from None
    target = Path(root) / SIGNATURE_FILE
    target.write_bytes(key.sign((Path(root) / MANIFEST_FILE).read_bytes()))
    return target


def generate_keypair(private_path: Path, public_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    Path(private_path).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    Path(private_path).chmod(0o600)
    Path(public_path).write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))


def _load_public_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as error:
        raise PortfolioError(f"{path}: not a readable PEM public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PortfolioError(f"{path}: an ed25519 public key is required, got {type(key).__name__}")
    return key
