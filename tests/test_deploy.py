"""Deploy and rollback: a portfolio archive is checked end to end before `current` moves, and only then."""
from __future__ import annotations

import base64
import functools
import io
import json
import shutil
import subprocess
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.fleet.deploy import DeployError, DeployRequest, PortfolioStore
from agent.portfolio import Portfolio, sha256_file
from agent.signing import generate_keypair, sign_manifest

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"


def portfolio_named(small_portfolio: Path, destination: Path, name: str) -> Path:
    """A copy of the test portfolio under another name (so another manifest digest)."""
    shutil.copytree(small_portfolio, destination)
    edit_manifest(destination, lambda data: data.update(name=name))
    return destination


def edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def make_archive(directory: Path, archive: Path, top_folder: str | None = None, extra=()) -> Path:
    """A .tar.gz of directory's files, at the top level or inside top_folder, plus extra (TarInfo, bytes) members."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory).as_posix()
            tar.add(path, arcname=f"{top_folder}/{relative}" if top_folder else relative, recursive=False)
        for info, data in extra:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def request_for(archive: Path, signature: str | None = None) -> DeployRequest:
    return DeployRequest(source=str(archive), sha256=sha256_file(archive), signature=signature)


def assert_staging_is_empty(store: PortfolioStore) -> None:
    assert list(store.staging.iterdir()) == []


@pytest.fixture
def v1(small_portfolio, tmp_path):
    return portfolio_named(small_portfolio, tmp_path / "v1", "digits-v1")


@pytest.fixture
def v2(small_portfolio, tmp_path):
    return portfolio_named(small_portfolio, tmp_path / "v2", "digits-v2")


@pytest.fixture
def store(tmp_path, v1):
    """A device that has served digits-v1 since its first start."""
    store = PortfolioStore(tmp_path / "state")
    store.install_initial(v1)
    return store


@pytest.fixture
def web_root(tmp_path):
    """A directory served over HTTP on 127.0.0.1; yields (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def keys(tmp_path):
    generate_keypair(tmp_path / "fleet.pem", tmp_path / "fleet.pub")
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
    return tmp_path


# ---------------------------------------------------------------------- deploying


def test_deploy_from_a_local_path(store, v2, tmp_path):
    first = store.current()
    archive = make_archive(v2, tmp_path / "v2.tar.gz")

    staged = store.stage(request_for(archive))
    assert staged == store.portfolios / f"digits-v2-{sha256_file(archive)[:12]}"
    assert store.current() == first  # staging never touches what serves

    deployed = store.activate(staged)
    assert deployed.path == store.current() == staged
    assert deployed.previous == store.previous() == first
    assert deployed.name == "digits-v2"
    assert deployed.digest == Portfolio.open(staged).digest
    assert (store.portfolios / "current").is_symlink()
    assert Portfolio.open(store.portfolios / "current").manifest.name == "digits-v2"
    assert_staging_is_empty(store)


def test_deploy_from_an_http_url_with_the_files_in_a_top_level_folder(store, v2, web_root):
    www, base_url = web_root
    archive = make_archive(v2, www / "v2.tar.gz", top_folder="portfolio")
    first = store.current()

    deployed = store.activate(store.stage(DeployRequest(f"{base_url}/v2.tar.gz", sha256_file(archive))))

    assert deployed.name == "digits-v2"
    assert store.previous() == first
    assert (store.current() / "manifest.json").is_file()


def test_a_wrong_sha256_is_refused_and_current_is_unchanged(store, v2, tmp_path):
    first = store.current()
    archive = make_archive(v2, tmp_path / "v2.tar.gz")

    with pytest.raises(DeployError, match="sha256: the archive's is"):
        store.stage(DeployRequest(str(archive), "0" * 64))
    assert store.current() == first
    assert_staging_is_empty(store)


def test_a_malformed_request_is_a_clear_error():
    with pytest.raises(DeployError, match="sha256 must be 64 hex digits"):
        DeployRequest("https://example.org/p.tar.gz", "abc")


def test_a_missing_file_or_unreachable_url_fails_at_the_download_step(store, tmp_path, web_root):
    _, base_url = web_root
    with pytest.raises(DeployError, match="download: .*No such file"):
        store.stage(DeployRequest(str(tmp_path / "absent.tar.gz"), "0" * 64))
    with pytest.raises(DeployError, match="download: .*HTTP 404"):
        store.stage(DeployRequest(f"{base_url}/absent.tar.gz", "0" * 64))
    assert_staging_is_empty(store)


def test_a_download_over_the_size_limit_is_refused(tmp_path, v1, v2, web_root):
    www, base_url = web_root
    archive = make_archive(v2, www / "v2.tar.gz")
    store = PortfolioStore(tmp_path / "state", max_download_bytes=archive.stat().st_size - 1)
    store.install_initial(v1)

    with pytest.raises(DeployError, match="download: .*over the limit"):
        store.stage(DeployRequest(f"{base_url}/v2.tar.gz", sha256_file(archive)))
    with pytest.raises(DeployError, match="download: .*over the limit"):  # a local file, cut off while copying
        store.stage(request_for(archive))
    assert store.current().name.startswith("digits-v1-")
    assert_staging_is_empty(store)


# ---------------------------------------------------------------------- signatures


def test_a_signed_key_store_refuses_unsigned_and_wrongly_signed_deploys(tmp_path, keys, v1, v2):
    store = PortfolioStore(tmp_path / "state", public_key=keys / "fleet.pub")
    store.install_initial(v1)

    unsigned = make_archive(v2, tmp_path / "unsigned.tar.gz")
    with pytest.raises(DeployError, match="signature: manifest.sig: missing"):
        store.stage(request_for(unsigned))

    sign_manifest(v2, keys / "other.pem")
    signed_by_another = make_archive(v2, tmp_path / "other.tar.gz")
    with pytest.raises(DeployError, match="signature: .*does not verify"):
        store.stage(request_for(signed_by_another))

    with pytest.raises(DeployError, match="signature: not a 64-byte ed25519 signature"):
        store.stage(request_for(unsigned, signature="not a signature"))
    assert store.current().name.startswith("digits-v1-")
    assert_staging_is_empty(store)


def test_a_signature_in_the_archive_or_in_the_request_is_accepted(tmp_path, keys, v1, v2):
    store = PortfolioStore(tmp_path / "state", public_key=keys / "fleet.pub")
    store.install_initial(v1)
    signature = sign_manifest(v2, keys / "fleet.pem").read_bytes()

    in_archive = make_archive(v2, tmp_path / "signed.tar.gz")
    assert store.stage(request_for(in_archive)).is_dir()

    (v2 / "manifest.sig").unlink()
    unsigned = make_archive(v2, tmp_path / "unsigned.tar.gz")
    assert store.stage(request_for(unsigned, signature=signature.hex())).is_dir()
    deployed = store.activate(store.stage(request_for(unsigned, signature=base64.b64encode(signature).decode())))
    assert deployed.name == "digits-v2"


# ---------------------------------------------------------------------- unsafe archives


def test_a_member_escaping_with_dot_dot_is_refused(store, v2, tmp_path):
    archive = make_archive(v2, tmp_path / "evil.tar.gz", extra=[(tarfile.TarInfo("../evil"), b"owned")])
    with pytest.raises(DeployError, match=r"extract: member '../evil' has a '..' component"):
        store.stage(request_for(archive))
    assert not list(tmp_path.rglob("evil"))
    assert_staging_is_empty(store)


def test_a_symlink_member_is_refused(store, v2, tmp_path):
    link = tarfile.TarInfo("variants/passwd")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = make_archive(v2, tmp_path / "link.tar.gz", extra=[(link, b"")])
    with pytest.raises(DeployError, match=r"member 'variants/passwd' is a link \(to '/etc/passwd'\)"):
        store.stage(request_for(archive))
    assert_staging_is_empty(store)


def test_an_absolute_path_or_a_device_file_is_refused(store, v2, tmp_path):
    absolute = make_archive(v2, tmp_path / "absolute.tar.gz", extra=[(tarfile.TarInfo("/tmp/evil"), b"owned")])
    with pytest.raises(DeployError, match="member '/tmp/evil' has an absolute path"):
        store.stage(request_for(absolute))

    device = tarfile.TarInfo("variants/null")
    device.type = tarfile.CHRTYPE
    with_device = make_archive(v2, tmp_path / "device.tar.gz", extra=[(device, b"")])
    with pytest.raises(DeployError, match="member 'variants/null' is a device file"):
        store.stage(request_for(with_device))
    assert_staging_is_empty(store)


def test_a_tar_bomb_is_refused_before_anything_is_unpacked(tmp_path, v1, v2):
    unpacked = sum(path.stat().st_size for path in v2.rglob("*") if path.is_file())
    store = PortfolioStore(tmp_path / "state", max_download_bytes=unpacked + (1 << 20))
    store.install_initial(v1)
    archive = make_archive(v2, tmp_path / "bomb.tar.gz", extra=[(tarfile.TarInfo("zeros.bin"), bytes(8 << 20))])
    assert archive.stat().st_size < store.max_download_bytes  # small to download, large to unpack

    with pytest.raises(DeployError, match="member 'zeros.bin' takes the unpacked size over the limit"):
        store.stage(request_for(archive))
    assert_staging_is_empty(store)


def test_an_archive_without_a_manifest_is_refused(store, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("not a portfolio")
    archive = make_archive(tmp_path / "notes", tmp_path / "notes.tar.gz")
    with pytest.raises(DeployError, match="extract: no manifest.json"):
        store.stage(request_for(archive))
    assert_staging_is_empty(store)


# ---------------------------------------------------------------------- health checks


def test_a_variant_failing_its_health_check_refuses_the_deploy(tmp_path, v1, v2):
    store = PortfolioStore(tmp_path / "state", health_check=lambda portfolio: {"dense": "too slow to load"})
    store.install_initial(v1)
    first = store.current()

    with pytest.raises(DeployError, match="health check: variant 'dense': too slow to load"):
        store.stage(request_for(make_archive(v2, tmp_path / "v2.tar.gz")))
    assert store.current() == first
    assert_staging_is_empty(store)


def test_a_variant_whose_model_is_another_variants_file_fails_the_real_health_check(store, v2, tmp_path):
    # Checksums are updated to match, so only running the model against samples.npz can tell.
    portfolio = Portfolio.open(v2)
    dense, sparse = portfolio.file_path("dense"), portfolio.file_path("imp-l01-sparse")
    shutil.copyfile(sparse, dense)

    def point_dense_at_the_copy(data):
        onnx = next(variant for variant in data["variants"] if variant["id"] == "dense")["files"]["onnx"]
        onnx.update(sha256=sha256_file(dense), bytes=dense.stat().st_size)

    edit_manifest(v2, point_dense_at_the_copy)
    with pytest.raises(DeployError, match="health check: variant 'dense': outputs differ from the exporter's"):
        store.stage(request_for(make_archive(v2, tmp_path / "v2.tar.gz")))
    assert store.current().name.startswith("digits-v1-")
    assert_staging_is_empty(store)


# ---------------------------------------------------------------------- rollback and prune


def test_rollback_swaps_current_and_previous_and_twice_returns_to_the_start(store, v2, tmp_path):
    first = store.current()
    second = store.activate(store.stage(request_for(make_archive(v2, tmp_path / "v2.tar.gz")))).path

    back = store.rollback()
    assert (back.path, back.previous, back.name) == (first, second, "digits-v1")
    assert (store.current(), store.previous()) == (first, second)

    again = store.rollback()
    assert (again.path, again.previous, again.name) == (second, first, "digits-v2")


def test_rollback_without_a_previous_portfolio_is_a_clear_error(store):
    first = store.current()
    with pytest.raises(DeployError, match="rollback: there is no previous portfolio"):
        store.rollback()
    assert store.current() == first


def test_prune_keeps_current_and_previous(store, small_portfolio, tmp_path):
    for version in (2, 3, 4):
        portfolio = portfolio_named(small_portfolio, tmp_path / f"v{version}", f"digits-v{version}")
        store.activate(store.stage(request_for(make_archive(portfolio, tmp_path / f"v{version}.tar.gz"))))

    store.prune(keep=0)

    kept = sorted(path.name for path in store.portfolios.iterdir() if not path.is_symlink())
    assert kept == sorted([store.current().name, store.previous().name])
    assert store.current().name.startswith("digits-v4-") and store.previous().name.startswith("digits-v3-")


def test_a_hand_installed_current_directory_is_adopted_on_the_first_deploy(tmp_path, v1, v2):
    state = tmp_path / "state"
    shutil.copytree(v1, state / "portfolios" / "current")  # the README's `cp -r portfolio/ .../current`
    store = PortfolioStore(state)
    assert store.current() == state / "portfolios" / "current"

    deployed = store.activate(store.stage(request_for(make_archive(v2, tmp_path / "v2.tar.gz"))))

    assert deployed.name == "digits-v2"
    assert deployed.previous.name.startswith("digits-v1-")
    assert store.rollback().name == "digits-v1"


# ---------------------------------------------------------------------- the systemd unit


def device_allow(unit_file: Path) -> list[str]:
    return [line.split("=", 1)[1] for line in unit_file.read_text().splitlines() if line.startswith("DeviceAllow=")]


def test_the_unit_lets_vcgencmd_open_the_nodes_of_current_and_older_raspberry_pi_os():
    allowed = device_allow(SYSTEMD / "edgeshift-agent.service")
    assert {"/dev/vcio_gencmd rw", "/dev/vcio rw", "/dev/vchiq rw"} <= set(allowed)


def test_the_jetson_drop_in_lets_cuda_open_the_gpu_on_jetpack_5_and_6():
    allowed = device_allow(SYSTEMD / "jetson.conf")
    assert {"/dev/nvmap rw", "/dev/nvhost-ctrl-gpu rw", "/dev/nvgpu/igpu0/ctrl rw"} <= set(allowed)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here (apt install systemd)")
@pytest.mark.parametrize("drop_ins", [[], ["jetson.conf"]], ids=["unit", "unit+jetson"])
def test_systemd_accepts_the_unit_without_a_warning(tmp_path, drop_ins):
    # verify insists that ExecStart exists; a stub stands in for the installed agent.
    agent = tmp_path / "edgeshift-agent"
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    unit_text = (SYSTEMD / "edgeshift-agent.service").read_text()
    assert "ExecStart=/opt/edgeshift/.venv/bin/edgeshift-agent " in unit_text
    unit = tmp_path / "edgeshift-agent.service"
    unit.write_text(unit_text.replace("/opt/edgeshift/.venv/bin/edgeshift-agent", str(agent)))
    for name in drop_ins:  # verify reads drop-ins from <unit>.d/ beside the unit
        (tmp_path / "edgeshift-agent.service.d").mkdir(exist_ok=True)
        shutil.copy(SYSTEMD / name, tmp_path / "edgeshift-agent.service.d" / name)

    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)

    about_ours = [line for line in (result.stdout + result.stderr).splitlines()
                  if str(tmp_path) in line or "edgeshift-agent" in line]
    assert result.returncode == 0 and about_ours == [], result.stdout + result.stderr
