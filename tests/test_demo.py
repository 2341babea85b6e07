"""``edge-siamese demo``: the page, the shared reader, the runtimes' WASM and the bundle, from
127.0.0.1 only and nothing outside its folders; a bad bundle or a missing client is one line."""

from __future__ import annotations

import http.client
import socket
import urllib.request
from urllib.parse import urlsplit

import pytest

from edge_siamese.app.demo import PAGE, demo_server as make_server

from conftest import BAD_MANIFESTS, assert_one_line_error, copy_bundle, demo_server, run_cli

pytestmark = pytest.mark.skipif(
    not (PAGE / "node_modules" / "onnxruntime-web").is_dir(),
    reason="the page's node_modules is absent: run npm ci --prefix edge_siamese/app/web",
)


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read()


def raw_status(url: str, path: str, method: str = "GET", host: str | None = None) -> int:
    """The status of a request for ``path`` sent as it is (urllib would normalise '..')."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request(method, path, headers={"Host": host} if host else {})
    status = connection.getresponse().status
    connection.close()
    return status


def test_demo_serves_the_page_the_reader_the_runtimes_and_the_bundle(served, client_bundle):
    base = served.removesuffix("/web/")
    status, kind, body = get(served)
    assert (status, kind) == (200, "text/html; charset=utf-8") and b'id="self-check"' in body
    assert get(base + "/")[2] == body  # / redirects to the page
    assert get(base + "/web/app.mjs")[1] == "text/javascript"
    assert get(base + "/web/bundle.mjs")[2] == (PAGE / "bundle.mjs").read_bytes()
    status, kind, wasm = get(base + "/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm")
    assert kind == "application/wasm" and wasm[:4] == b"\0asm"
    assert get(base + "/node_modules/@litertjs/core/wasm/litert_wasm_internal.wasm")[2][:4] == b"\0asm"
    for name in ("manifest.json", "golden.npz", "model_int8.onnx", "model_int8.tflite"):
        assert get(f"{base}/bundle/{name}")[2] == (client_bundle / name).read_bytes()


OUTSIDE = ["/bundle/../run/config.json", "/bundle/%2e%2e/run/config.json", "/web/../../pyproject.toml", "/etc/passwd", "/bundle/", "/web/.gitignore", "/node_modules/.package-lock.json", "/bundle/%00", "/bundle/" + "x" * 5000]


@pytest.mark.parametrize("path", OUTSIDE, ids=range(len(OUTSIDE)))
def test_demo_serves_nothing_outside_its_folders(served, path):
    assert raw_status(served, path) == 404


def test_demo_answers_get_only_and_only_to_its_own_name(served):
    assert raw_status(served, "/pyproject.toml", method="HEAD") == 501
    assert raw_status(served, "/bundle/manifest.json", host="rebound.example:80") == 403
    assert raw_status(served, "/bundle/manifest.json", host=f"localhost:{urlsplit(served).port}") == 200


def test_demo_is_unreachable_from_other_addresses(client_bundle):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # a UDP "connection" sends nothing: it only picks this machine's outward address
        except OSError:
            pytest.skip("this machine has no route out, so no address besides loopback")
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this machine has no address besides loopback")
    server = make_server(client_bundle, port=0)
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, server.server_address[1]), timeout=5).close()
    finally:
        server.server_close()


@pytest.mark.parametrize("edit, fragments", BAD_MANIFESTS, ids=lambda v: getattr(v, "__name__", ""))
def test_demo_refuses_an_inconsistent_bundle(client_bundle, tmp_path, edit, fragments):
    bundle = copy_bundle(client_bundle, tmp_path / "bundle", edit)
    assert_one_line_error(run_cli("demo", bundle, "--port", "0", check=False, timeout=60), *fragments[:1])


def test_demo_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    assert_one_line_error(run_cli("demo", tmp_path, check=False, timeout=60), "not a bundle")


def test_demo_names_the_npm_packages_it_lacks(client_bundle, tmp_path):
    proc = run_cli("demo", client_bundle, "--clients", tmp_path, check=False, timeout=60)
    assert_one_line_error(proc, "onnxruntime-web@1.30.0", "@litertjs/core@2.5.3", f"npm ci --prefix {PAGE}", "npm install --prefix DIR")


def test_demo_serves_the_npm_packages_from_clients(client_bundle, tmp_path):
    (tmp_path / "node_modules").symlink_to(PAGE / "node_modules")
    with demo_server(client_bundle, "--clients", str(tmp_path)) as (_, url):
        wasm = get(url.removesuffix("/web/") + "/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm")[2]
    assert wasm[:4] == b"\0asm"


def test_demo_refuses_a_port_out_of_range(client_bundle):
    assert_one_line_error(run_cli("demo", client_bundle, "--port", "70000", check=False, timeout=60), "--port")


def test_demo_refuses_a_busy_port(client_bundle):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("demo", client_bundle, "--port", port, check=False, timeout=60)
    assert_one_line_error(proc, f"cannot listen on 127.0.0.1:{port}", "--port 0")
