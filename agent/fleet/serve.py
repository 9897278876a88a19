"""serve-portfolio: pack a verified portfolio directory into a .tar.gz and serve it over HTTP, so
devices can deploy it by URL and sha256.

Only the archive is served, at `/<name>.tar.gz`; every other path is a 404.
"""
from __future__ import annotations

import http.server
import socket
import tarfile
import threading
from pathlib import Path

from agent.portfolio import Portfolio, sha256_file


def pack_portfolio(directory: Path, out_dir: Path) -> Path:
    """`<out_dir>/<manifest name>.tar.gz` holding the portfolio in one top-level folder; PortfolioError
    if the directory is no valid portfolio (every file present, checksums matching)."""
    portfolio = Portfolio.open(directory, verify=True)
    name = portfolio.manifest.name
    archive = Path(out_dir) / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(Path(directory), arcname=name)
    return archive


class PortfolioServer:
    """Serves one archive over HTTP from a background thread until close()."""

    def __init__(self, archive: Path, bind: str = "127.0.0.1", port: int = 0):
        self.archive = Path(archive)
        self.sha256 = sha256_file(self.archive)
        self.downloads = 0
        self._downloaded = threading.Event()
        self._httpd = http.server.ThreadingHTTPServer((bind, port), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="serve-portfolio", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        if host in ("0.0.0.0", "::", ""):  # every interface: name this machine, as devices would
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/{self.archive.name}"

    def start(self) -> PortfolioServer:
        self._thread.start()
        return self

    def wait_for_download(self, timeout_s: float | None = None) -> bool:
        """True once the archive has been sent in full at least once."""
        return self._downloaded.wait(timeout_s)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != f"/{server.archive.name}":
                    self.send_error(404, "only the portfolio archive is served here")
                    return
                size = server.archive.stat().st_size
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                with server.archive.open("rb") as stream:
                    while chunk := stream.read(1 << 20):
                        self.wfile.write(chunk)
                server.downloads += 1
                server._downloaded.set()

            def log_message(self, format: str, *args: object) -> None:
                pass  # the CLI reports downloads itself

        return Handler


__all__ = ["PortfolioServer", "pack_portfolio"]
