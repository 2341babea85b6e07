"""``edge-siamese demo``: serve one bundle and the web page on 127.0.0.1.

The page runs the bundle's golden self-check in the browser (onnxruntime-web, LiteRT.js) and gives
a verdict for two images the user picks. Everything is served from this machine: the page and the
JS bundle reader (``web/``, shipped with this package), the runtimes' WASM files from the npm
packages its ``package.json`` names (installed by ``npm ci --prefix`` that folder, or anywhere
``--clients`` points), and the bundle's own files. Nothing is fetched from a CDN.
"""

from __future__ import annotations

import json
import mimetypes
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from device_bench.manifest import Bundle, read_bundle
from device_bench.runtimes import open_runtime

from ..errors import UserError

PAGE = Path(__file__).resolve().parent / "web"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
}


def node_modules(clients: Path | None) -> Path:
    """The ``node_modules`` folder holding the page's npm packages (under ``clients``, else the page's
    own folder); stop with the command that installs them when one is missing."""
    modules = (clients if clients is not None else PAGE) / "node_modules"
    packages = json.loads((PAGE / "package.json").read_text())["dependencies"]
    missing = [f"{name}@{version}" for name, version in packages.items() if not (modules / name / "package.json").is_file()]
    if missing:
        raise UserError(
            f"{modules} lacks the page's npm packages {', '.join(missing)}: run npm ci --prefix {PAGE}, "
            f"or npm install --prefix DIR {' '.join(missing)} and pass --clients DIR"
        )
    return modules


class DemoHandler(BaseHTTPRequestHandler):
    """GET only, from a fixed table of URL prefixes to folders: never a listing, a hidden file or
    anything outside them, and only for requests addressed to this server by its loopback name
    (a page elsewhere cannot reach it through a DNS name rebound to 127.0.0.1)."""

    routes: dict[str, Path] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        port = self.server.server_address[1]
        if self.headers.get("Host") not in (f"127.0.0.1:{port}", f"localhost:{port}"):
            self.send_error(HTTPStatus.FORBIDDEN, "use the URL edge-siamese demo printed")
            return
        path = unquote(urlsplit(self.path).path)
        if path == "/":
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", "/web/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        file = self._resolve(path)
        if file is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        body = file.read_bytes()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", TYPES.get(file.suffix, mimetypes.guess_type(file.name)[0] or "application/octet-stream"))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # a re-exported bundle must not be read from the cache
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _resolve(self, path: str) -> Path | None:
        for prefix, root in self.routes.items():
            if not path.startswith(prefix):
                continue
            try:
                file = (root / (path[len(prefix) :] or "index.html")).resolve()
                parts = file.relative_to(root.resolve()).parts
                if file.is_file() and not any(part.startswith(".") for part in parts):
                    return file
            except (ValueError, OSError):  # outside the root, a NUL byte, a name too long
                pass
        return None

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        pass  # the CLI prints the URL; a line per request would bury it


def check_onnx_files(bundle: Bundle) -> None:
    """The page runs the ONNX files: stop unless there is one, and each takes the input shape the manifest says."""
    entries = [entry for entry in bundle.files if entry["format"] == "onnx"]
    if not entries:
        raise UserError(f"{bundle.path} has no ONNX file, which the page runs: export it with --format onnx")
    for entry in entries:
        try:
            shape = open_runtime(bundle.path / entry["path"], "onnx").io_details()["input"]["shape"]
        except Exception as exc:  # ONNX Runtime raises its own types for a damaged model
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{entry['path']} cannot be loaded by ONNX Runtime ({first}): export the bundle again") from None
        expected = entry["input"]["shape"]
        if len(shape) != len(expected) or any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(shape[1:], expected[1:])):
            raise UserError(f"{entry['path']} takes input of shape {shape} but manifest.json says {expected}: export the bundle again")


def demo_server(bundle: Path, port: int = 8765, clients: Path | None = None) -> ThreadingHTTPServer:
    """A server (not yet serving) for ``bundle`` and the web page, bound to 127.0.0.1 only;
    ``clients`` is a folder whose ``node_modules`` has the page's npm packages (default: the page's)."""
    modules = node_modules(clients)
    check_onnx_files(read_bundle(bundle))
    routes = {"/web/": PAGE, "/node_modules/": modules, "/bundle/": Path(bundle)}
    handler = type("Handler", (DemoHandler,), {"routes": routes})
    try:
        return ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise UserError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}): pass another --port, or --port 0 for a free one") from None
