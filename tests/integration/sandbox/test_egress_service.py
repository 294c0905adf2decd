"""
Egress for a long-lived stdio service (how upstream MCP servers run), on a real engine.

The service below reads one URL per line and answers with what fetching it gave;
granted ``127.0.0.1:<port>`` it reaches that host server through the proxy,
anything else is refused, and a service without a grant has no network.
"""

from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from callward.core import ResourceLimits
from callward.sandbox import ServiceImageSpec, StdioService, ensure_service_image

pytestmark = pytest.mark.docker

SERVICE = '''\
import sys
import urllib.error
import urllib.request

for line in sys.stdin:
    try:
        with urllib.request.urlopen(line.strip(), timeout=5) as response:
            answer = f"{response.status} {response.read().decode()}"
    except urllib.error.HTTPError as exc:
        answer = str(exc.code)
    except OSError as exc:
        answer = type(exc).__name__
    print(answer, flush=True)
'''


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(name="port")
def _port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture(name="image_id")
def _image_id(tmp_path: Path, engine: object) -> str:
    script = tmp_path / "fetcher.py"
    script.write_text(SERVICE)
    return ensure_service_image(ServiceImageSpec(files={"fetcher.py": script}))


def ask(service: StdioService, urls: list[str]) -> list[str]:
    process = subprocess.run(
        service.stdio_command(), input="".join(u + "\n" for u in urls), capture_output=True,
        text=True, timeout=60, check=False,
    )
    return process.stdout.splitlines()


COMMAND = ["python3", "/opt/callward/service/fetcher.py"]


class TestServiceEgress:
    def test_a_granted_service_reaches_only_its_targets(self, image_id: str, port: int) -> None:
        """The granted target answers; another port and a name are refused by the proxy."""
        with StdioService(image_id=image_id, command=COMMAND, limits=ResourceLimits(),
                          egress=(f"127.0.0.1:{port}",)) as service:
            answers = ask(service, [f"http://127.0.0.1:{port}/", "http://127.0.0.1:9/",
                                    f"http://localhost:{port}/"])

        expected = ["200 hello", "403", "403"]
        assert expected == answers

    def test_a_service_without_a_grant_has_no_network(self, image_id: str, port: int) -> None:
        """Without egress the service's container is on network none, as before."""
        with StdioService(image_id=image_id, command=COMMAND,
                          limits=ResourceLimits()) as service:
            answers = ask(service, [f"http://127.0.0.1:{port}/"])

        assert ["200 hello"] != answers
        assert 1 == len(answers)

    def test_egress_on_gvisor_is_refused(self, image_id: str) -> None:
        """runsc has --network=none here: a service granted egress is refused at once."""
        with pytest.raises(ValueError, match="network=none"):
            StdioService(image_id=image_id, command=COMMAND, limits=ResourceLimits(),
                         runtime="runsc", egress=("127.0.0.1:80",))
