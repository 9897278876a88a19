"""ed25519 manifest signatures: a configured key makes the agent refuse unsigned or altered portfolios."""
import shutil

import pytest

from agent.portfolio import PortfolioError
from agent.signing import generate_keypair, sign_manifest, verify_manifest_signature


@pytest.fixture
def keys(tmp_path):
    generate_keypair(tmp_path / "key.pem", tmp_path / "key.pub")
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
    return tmp_path


@pytest.fixture
def portfolio_copy(small_portfolio, tmp_path):
    return shutil.copytree(small_portfolio, tmp_path / "portfolio")


def test_signed_manifest_verifies(keys, portfolio_copy):
    sign_manifest(portfolio_copy, keys / "key.pem")
    verify_manifest_signature(portfolio_copy, keys / "key.pub")


def test_unsigned_portfolio_is_refused_when_a_key_is_configured(keys, portfolio_copy):
    with pytest.raises(PortfolioError, match="manifest.sig: missing"):
        verify_manifest_signature(portfolio_copy, keys / "key.pub")


def test_altered_manifest_or_other_key_is_refused(keys, portfolio_copy):
    sign_manifest(portfolio_copy, keys / "key.pem")
    with pytest.raises(PortfolioError, match="does not verify"):
        verify_manifest_signature(portfolio_copy, keys / "other.pub")
    manifest = portfolio_copy / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"dense"', '"dense" ', 1))
    with pytest.raises(PortfolioError, match="does not verify"):
        verify_manifest_signature(portfolio_copy, keys / "key.pub")


def test_a_key_that_is_not_a_key_is_a_clear_error(tmp_path, portfolio_copy):
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(PortfolioError, match="not a readable PEM public key"):
        verify_manifest_signature(portfolio_copy, tmp_path / "junk.pub")


def test_keygen_and_sign_from_the_exporter_cli(tmp_path, portfolio_copy):
    pytest.importorskip("torch", reason="the exporter's CLI (not installed in the agent-only Python 3.8 run)")
    from exporter.cli import main

    assert main(["keygen", "--out", str(tmp_path / "fleet")]) == 0
    assert main(["sign", str(portfolio_copy), "--key", str(tmp_path / "fleet.pem")]) == 0
    verify_manifest_signature(portfolio_copy, tmp_path / "fleet.pub")
    assert main(["keygen", "--out", str(tmp_path / "fleet")]) == 2  # never overwrites a key without --force
