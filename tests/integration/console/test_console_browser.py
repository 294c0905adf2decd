"""
The review console in a real browser: Debian's Chromium, driven by chromedriver, over a
log a real gateway writes while the test watches.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from callward.audit import read_records, verify

#: The bearer tokens conftest.py configures (``mcp.clients``).
TOKENS_BY_NAME = {"alice": "alice-token-7f3e", "lena": "lena-token-91ab",
                  "mallory": "mallory-token-c2d4"}
#: Set to a directory to save screenshots of the main pages there (docs/console/).
SCREENSHOTS = os.environ.get("CALLWARD_CONSOLE_SCREENSHOTS")


def wait_for(browser: Any, condition: Any, seconds: float = 15) -> Any:
    return WebDriverWait(browser, seconds, poll_frequency=0.1).until(condition)


def records(site: Any, kind: str) -> list[dict[str, Any]]:
    return [r.body for r in read_records(site.home / "audit.db", kind=kind)]


def proposal_of(result: Any) -> str:
    reasons = result.to_json()["decision"]["reasons"]
    return next(r for r in reasons if r.startswith("proposal.")).removeprefix("proposal.")


def verify_receipt_in_page(browser: Any) -> str:
    browser.execute_script("document.getElementById('verify-result').dataset.verdict = 'none'")
    browser.find_element(By.ID, "verify").click()
    return str(wait_for(browser, lambda b: (b.find_element(By.ID, "verify-result")
                                            .get_attribute("data-verdict")
                                            not in ("none", "checking"))
                        and b.find_element(By.ID, "verify-result").get_attribute(
                            "data-verdict")))


def set_value(browser: Any, element_id: str, value: str) -> None:
    browser.execute_script("document.getElementById(arguments[0]).value = arguments[1]",
                           element_id, value)


def post_form(browser: Any, path: str, fields: dict[str, str]) -> int:
    """POST a form from the page's own origin (with its cookie) and return the status."""
    return int(browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', body: new URLSearchParams(arguments[1]),"
        " redirect: 'manual'}).then(r => done(r.status), e => done(-1));", path, fields))


def screenshot(browser: Any, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(SCREENSHOTS) / f"{name}.png"))


class TestSignIn:
    def test_a_wrong_token_is_refused_and_audited(self, site, browser, sign_in):
        """A token not configured is refused in the page and signed into the log."""
        before = len(records(site, "console.login_refused"))

        sign_in("not-a-configured-token")

        error = wait_for(browser, lambda b: b.find_element(By.ID, "login-error"))
        refused = records(site, "console.login_refused")
        assert "that token is not accepted" == error.text
        assert before + 1 == len(refused)
        assert "unknown_token" == refused[-1]["reason"]
        assert "not-a-configured-token" not in json.dumps(refused)

    def test_a_configured_token_signs_in_and_is_audited(self, site, browser, sign_in):
        """A configured token signs in as its principal, with the policy's role."""
        sign_in(TOKENS_BY_NAME["lena"])

        who = wait_for(browser, lambda b: b.find_element(By.ID, "who"))
        assert "lena approver" == who.text
        assert {"principal": "lena", "role": "approver", "client": "127.0.0.1"} == records(
            site, "console.login")[-1]

    def test_an_oidc_token_signs_in_with_its_roles_until_its_exp(self, site, browser,
                                                                 sign_in, oidc_token):
        """
        A pasted access token of the configured issuer signs in its principal with the
        token's roles, read-only (token roles do not make approvers), the session's end
        shown; a forged one is refused with the verifier's reason.
        """
        token = oidc_token("erin", ["auditor"], seconds=600)
        header, payload, _ = token.split(".")
        sign_in(f"{header}.{payload}.{'A' * 86}")
        wait_for(browser, lambda b: b.find_element(By.ID, "login-error"))
        sign_in(token)

        who = wait_for(browser, lambda b: b.find_element(By.ID, "who"))
        assert who.text.startswith("erin reader auditor until ")
        assert "bad_signature" == records(site, "console.login_refused")[-1]["reason"]
        login = records(site, "console.login")[-1]
        assert ("erin", "reader", "https://login.example.com/", ["auditor"]) == (
            login["principal"], login["role"], login["issuer"], login["roles"])


class TestCallStory:
    def open_denial(self, browser, console_url):
        browser.get(console_url + "/calls?principal=mallory&kind=call.denied")
        browser.find_element(By.CSS_SELECTOR, "#calls tbody tr a").click()
        return wait_for(browser, lambda b: b.find_element(By.ID, "decision-rules"))

    def test_a_denied_call_tells_its_story(self, browser, sign_in, console_url):
        """Filtering finds the denial; its page names the rule, the call and no sandbox run."""
        sign_in(TOKENS_BY_NAME["alice"])

        rules = self.open_denial(browser, console_url)

        assert "guests-never-destroy" == rules.text
        assert "drop_table" in browser.find_element(By.ID, "parsed-call").text
        assert "did not run" in browser.find_element(By.ID, "outcome").text

    def test_the_receipt_verifies_in_the_page(self, browser, sign_in, console_url):
        """The page's script checks the receipt against the log's key: valid."""
        sign_in(TOKENS_BY_NAME["alice"])
        self.open_denial(browser, console_url)

        verdict = verify_receipt_in_page(browser)

        text = browser.find_element(By.ID, "verify-result").text
        assert ("valid", True) == (verdict, text.startswith("VALID"))

    def test_one_changed_byte_of_the_receipt_fails(self, browser, sign_in, console_url):
        """One byte of the signed record changed in the receipt: the page says invalid."""
        sign_in(TOKENS_BY_NAME["alice"])
        self.open_denial(browser, console_url)
        receipt = json.loads(browser.find_element(By.ID, "receipt").get_attribute("value"))
        data = bytearray(base64.b64decode(receipt["record"]))
        data[data.index(b"users")] = ord("U")
        receipt["record"] = base64.b64encode(bytes(data)).decode()
        set_value(browser, "receipt", json.dumps(receipt))

        verdict = verify_receipt_in_page(browser)

        text = browser.find_element(By.ID, "verify-result").text
        assert "invalid" == verdict
        assert "record_hash is not the SHA-256 of its record bytes" in text

    def test_a_changed_proof_hash_fails(self, browser, sign_in, console_url):
        """The record hashes left alone, one byte of the leaf hash changed: invalid."""
        sign_in(TOKENS_BY_NAME["alice"])
        self.open_denial(browser, console_url)
        receipt = json.loads(browser.find_element(By.ID, "receipt").get_attribute("value"))
        del receipt["record"], receipt["signature"]  # a ToolResult's receipt: hashes only
        leaf = bytearray(bytes.fromhex(receipt["leaf_hash"]))
        leaf[0] ^= 1
        receipt["leaf_hash"] = leaf.hex()
        set_value(browser, "receipt", json.dumps(receipt))

        verdict = verify_receipt_in_page(browser)

        assert "invalid" == verdict
        assert "does not lead to the signed root" in browser.find_element(
            By.ID, "verify-result").text

    def test_a_pasted_key_that_did_not_sign_fails(self, browser, sign_in, console_url):
        """The reviewer's own key (PEM), which did not sign the log: invalid."""
        sign_in(TOKENS_BY_NAME["alice"])
        self.open_denial(browser, console_url)
        pem = Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        set_value(browser, "public-key", pem.decode())

        verdict = verify_receipt_in_page(browser)

        assert "invalid" == verdict
        assert "no signature by this public key" in browser.find_element(
            By.ID, "verify-result").text


class TestApprovals:
    def test_an_approver_approves_and_the_call_runs(self, site, browser, sign_in,
                                                    console_url):
        """
        lena approves alice's proposal in the page: approval.granted is signed into the
        log as ``callward policy approve`` signs it, and alice's same call then runs.
        """
        arguments = '{"name": "add", "arguments": {"a": 2, "b": 40}}'
        proposal = proposal_of(site.call(arguments, "alice")[0])
        sign_in(TOKENS_BY_NAME["lena"])
        browser.get(console_url + "/approvals")
        section = browser.find_element(By.ID, f"proposal-{proposal}")
        assert '{"a":2,"b":40}' in section.text

        section.find_element(By.CSS_SELECTOR, "button.approve").click()

        settled = wait_for(browser, lambda b: b.find_element(By.ID, "settled"))
        assert f"Proposal {proposal} approved" in settled.text
        granted = [r for r in records(site, "approval.granted") if r["proposal"] == proposal]
        assert [("lena", "alice", "add")] == [(r["by"], r["principal"], r["tool"])
                                              for r in granted]
        assert 128 == len(granted[0]["signature"])
        result = site.call(arguments, "alice")[0]
        assert ("ok", 42) == (result.kind, result.content)
        completed = [r for r in records(site, "call.completed") if
                     r["call_id"] == result.call_id]
        assert ["ok"] == [r["outcome"] for r in completed]
        assert len(list(read_records(site.home / "audit.db"))) == verify(
            site.home / "audit.db", site.home / "keys" / "audit-ed25519.pub").records

    def test_the_proposer_cannot_approve_their_own_call(self, site, browser, sign_in,
                                                        console_url):
        """lena, an approver, proposed this call herself: refused, and audited."""
        proposal = proposal_of(site.call('{"name": "add", "arguments": {"a": 5, "b": 5}}',
                                         "lena")[0])
        sign_in(TOKENS_BY_NAME["lena"])
        browser.get(console_url + "/approvals")

        browser.find_element(By.ID, f"proposal-{proposal}").find_element(
            By.CSS_SELECTOR, "button.approve").click()

        error = wait_for(browser, lambda b: b.find_element(By.ID, "approval-error"))
        assert "a principal cannot approve their own call" == error.text
        assert [proposal] == [r["proposal"] for r in records(site, "approval.refused")
                              if r["proposal"] == proposal]

    def test_a_reader_is_refused_the_approve_action(self, site, browser, sign_in,
                                                    console_url):
        """
        alice reads: no approve button, and the server refuses her POST with 403 even
        with a valid CSRF token; the proposal stays open and the refusal is audited.
        """
        proposal = proposal_of(site.call('{"name": "add", "arguments": {"a": 7, "b": 7}}',
                                         "lena")[0])
        sign_in(TOKENS_BY_NAME["alice"])
        browser.get(console_url + "/approvals")
        section = browser.find_element(By.ID, f"proposal-{proposal}")
        assert [] == section.find_elements(By.CSS_SELECTOR, "button.approve")
        csrf = browser.find_element(By.NAME, "csrf_token").get_attribute("value")

        status = post_form(browser, f"/approvals/{proposal}",
                           {"csrf_token": csrf, "action": "approve"})

        assert 403 == status
        assert [] == [r for r in records(site, "approval.granted") if r["proposal"] == proposal]
        refused = records(site, "console.action_refused")[-1]
        assert ("alice", proposal, "read_only") == (refused["principal"], refused["proposal"],
                                                    refused["reason"])

    def test_a_post_without_the_csrf_token_is_refused(self, site, browser, sign_in,
                                                      console_url):
        """An approver's POST without the session's CSRF token: 403, nothing settled."""
        proposal = proposal_of(site.call('{"name": "add", "arguments": {"a": 8, "b": 8}}',
                                         "alice")[0])
        sign_in(TOKENS_BY_NAME["lena"])
        browser.get(console_url + "/approvals")

        status = post_form(browser, f"/approvals/{proposal}",
                           {"csrf_token": "forged", "action": "approve"})

        assert 403 == status
        assert [] == [r for r in records(site, "approval.granted") if r["proposal"] == proposal]


class TestLive:
    def test_a_new_call_appears_without_reload(self, site, browser, sign_in, console_url):
        """A call the gateway decides while the list is open is added to it in place."""
        sign_in(TOKENS_BY_NAME["alice"])
        browser.get(console_url + "/calls")
        wait_for(browser, lambda b: b.find_element(By.ID, "live-status")
                 .get_attribute("data-state") == "live")
        browser.execute_script("window.sameDocument = 'yes'")

        result = site.call('{"name": "drop_table", "arguments": {"table": "live"}}', "mallory")
        seq = result[0].receipt.seq

        row = wait_for(browser, lambda b: b.find_element(
            By.CSS_SELECTOR, f'#calls tbody tr[data-seq="{seq}"]'))
        assert "yes" == browser.execute_script("return window.sameDocument")
        assert ["call.denied", "mallory", "drop_table", "permission"] == [
            cell.text for cell in row.find_elements(By.TAG_NAME, "td")][2:6]


class TestHealthAndHygiene:
    def test_verify_now_runs_audit_verify(self, browser, sign_in, console_url):
        """The Log health page's button runs the full verification: OK."""
        sign_in(TOKENS_BY_NAME["alice"])
        browser.get(console_url + "/health")

        browser.find_element(By.ID, "verify-now").click()

        verdict = wait_for(browser, lambda b: b.find_element(By.ID, "verify-verdict"))
        assert "OK" == verdict.get_attribute("data-verdict")

    def test_no_console_errors_and_nothing_leaves_loopback(self, site, browser, sign_in,
                                                           console_url):
        """
        Across every page (a receipt verified on the way), the browser logs no error and
        every network request it makes goes to the console's own origin (Chromium's own
        ``chrome://`` pages and ``data:`` URLs are not the network).
        """
        site.call('{"name": "add", "arguments": {"a": 3, "b": 3}}', "alice")  # one pending
        sign_in(TOKENS_BY_NAME["lena"])
        browser.get(console_url + "/calls")
        wait_for(browser, lambda b: b.find_element(By.ID, "live-status")
                 .get_attribute("data-state") == "live")
        screenshot(browser, "calls")
        browser.get(console_url + "/calls?principal=mallory&kind=call.denied")
        browser.find_element(By.CSS_SELECTOR, "#calls tbody tr a").click()
        screenshot(browser, "story")
        assert "valid" == verify_receipt_in_page(browser)
        browser.execute_script("document.getElementById('receipt-section').scrollIntoView()")
        screenshot(browser, "receipt")
        browser.get(console_url + "/approvals")
        screenshot(browser, "approvals")
        browser.get(console_url + "/health")
        browser.find_element(By.ID, "verify-now").click()
        wait_for(browser, lambda b: b.find_element(By.ID, "verify-verdict"))
        screenshot(browser, "health")
        browser.get(console_url + "/anomalies")
        browser.get(console_url + "/policy")
        set_value(browser, "candidate", "version: 1\ndefault: deny\nrules: []\n")
        browser.find_element(By.ID, "replay").click()
        wait_for(browser, lambda b: b.find_element(By.ID, "replay-report"))
        screenshot(browser, "policy")
        browser.get(console_url + "/charts")
        browser.find_element(By.ID, "chart-calls")
        screenshot(browser, "charts")

        errors = [entry for entry in browser.get_log("browser")
                  if entry["level"] in ("SEVERE", "WARNING")]
        urls = set()
        for entry in browser.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.add(message["params"]["request"]["url"])
        network = {u for u in urls if u.split(":", 1)[0] in ("http", "https", "ws", "wss")}
        assert [] == errors
        assert console_url + "/static/verify.js" in network
        assert [] == sorted(u for u in network if not u.startswith(console_url + "/"))
