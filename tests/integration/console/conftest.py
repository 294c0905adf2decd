"""
The console's browser tests: a real gateway writing a real log, ``callward console`` as a
user starts it, and Debian's Chromium driven through chromedriver (Selenium).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from callward.core.gateway import Gateway
from tests._net import free_port

CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: The OIDC issuer the console trusts (``mcp.auth.oidc``, its JWKS a file) and its key.
OIDC_ISSUER = "https://login.example.com/"
OIDC_KEY = Ed25519PrivateKey.generate()
TOKENS = {"alice": "alice-token-7f3e", "lena": "lena-token-91ab", "mallory": "mallory-token-c2d4"}
POLICY = """\
version: 1
default: deny
principals:
  alice: {roles: [analyst]}
  mallory: {roles: [guest]}
  lena: {roles: [lead, analyst]}
rules:
  - {id: analysts-use-calculators, effect: allow, roles: [analyst], tools: [square, add]}
  - {id: guests-never-destroy, effect: deny, roles: [guest], tools: [drop_table]}
approvals:
  - {id: adds-need-a-lead, tools: [add], approvers: {roles: [lead]}, expires_seconds: 600}
"""


def _config(site: Path, examples: Path) -> Path:
    shutil.copy(examples / "tools.py", site / "tools.py")
    (site / "policy.yaml").write_text(POLICY, encoding="utf-8")
    clients = "\n".join(
        f"    - {{principal: {name}, token_sha256: {hashlib.sha256(token.encode()).hexdigest()}}}"
        for name, token in TOKENS.items())
    jwk = {**jwt.algorithms.OKPAlgorithm.to_jwk(OIDC_KEY.public_key(), as_dict=True),
           "kid": "ed-1", "use": "sig"}
    (site / "jwks.json").write_text(json.dumps({"keys": [jwk]}), encoding="utf-8")
    config = site / "callward.yaml"
    config.write_text(f"tools:\n  - tools.py\npolicy: policy.yaml\nsandbox:\n  runtime: runc\n"
                      f"mcp:\n  clients:\n{clients}\n"
                      f"  auth:\n    oidc: {{issuer: '{OIDC_ISSUER}', audience: callward, "
                      "jwks: jwks.json, roles_claim: roles}\n", encoding="utf-8")
    return config


@pytest.fixture(name="oidc_token")
def _oidc_token() -> Callable[..., str]:
    """Makes access tokens of the configured issuer, signed with its key."""

    def oidc_token(principal: str, roles: list[str], *, seconds: float = 600) -> str:
        now = int(time.time())
        return jwt.encode({"iss": OIDC_ISSUER, "aud": "callward", "sub": principal,
                           "roles": roles, "iat": now, "exp": now + int(seconds)},
                          OIDC_KEY, algorithm="EdDSA", headers={"kid": "ed-1"})

    return oidc_token


class Site:
    """The configuration, its home, and the gateway that writes its log."""

    def __init__(self, root: Path, config: Path, home: Path, gateway: Gateway) -> None:
        self.root = root
        self.config = config
        self.home = home
        self.gateway = gateway

    def call(self, text: str, principal: str, session_id: str = ""):
        return self.gateway.handle_text(text, principal=principal, session_id=session_id)


@pytest.fixture(scope="module", name="site")
def _site(tmp_path_factory: pytest.TempPathFactory, engine: object) -> Iterator[Site]:
    """A gateway over the console's configuration, with a denial and a proposal logged."""
    root = tmp_path_factory.mktemp("console")
    home = root / "home"
    home.mkdir()
    config = _config(root, Path(__file__).resolve().parents[3] / "core" / "examples")
    with Gateway.from_config(config, home=home) as gateway:
        site = Site(root, config, home, gateway)
        site.call('{"name": "drop_table", "arguments": {"table": "users"}}', "mallory")
        site.call('{"name": "add", "arguments": {"a": 20, "b": 22}}', "alice", "s-1")
        yield site


@pytest.fixture(scope="module", name="console_url")
def _console_url(site: Site) -> Iterator[str]:
    """``callward console`` started as a user would, on a free loopback port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "callward.core.cli", "--home", str(site.home), "console",
         "--config", str(site.config), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/login", timeout=2):  # noqa: S310 - loopback
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output = process.communicate()[0].decode(errors="replace")
                pytest.fail(f"callward console did not start: {output}")
            time.sleep(0.2)
    yield url
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(name="browser")
def _browser(tmp_path: Path) -> Iterator[object]:
    """Headless Debian Chromium through its chromedriver, logging console and network."""
    if not CHROMEDRIVER.is_file():
        pytest.fail("chromedriver is missing: run scripts/ensure-chromium.sh")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def detached(element: object) -> bool:
    """
    Whether ``element`` has left the page (its document was replaced). Selenium's
    ``staleness_of`` knows only the stale-element error; chromedriver may answer a node
    of a document just replaced with an inspector error instead, which means the same.
    """
    try:
        element.is_enabled()  # type: ignore[attr-defined]
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


@pytest.fixture(name="sign_in")
def _sign_in(browser: object, console_url: str) -> Callable[[str], None]:
    """Sign the browser in with a token (the login form, as a person would)."""

    def sign_in(token: str) -> None:
        browser.get(console_url + "/login")  # type: ignore[attr-defined]
        browser.find_element(By.ID, "token").send_keys(token)  # type: ignore[attr-defined]
        form = browser.find_element(By.ID, "login-form")  # type: ignore[attr-defined]
        browser.find_element(By.ID, "sign-in").click()  # type: ignore[attr-defined]
        # The answer has replaced the form's page: a get() now cannot cut the POST short.
        WebDriverWait(browser, 15, poll_frequency=0.1).until(  # type: ignore[arg-type]
            lambda _: detached(form))

    return sign_in
