"""The HTML review page: verdict first, inline charts, escaped values, renders in chromium."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from callward.audit import SQLiteAuditStore, render_report


@pytest.fixture(name="reviewed")
def _reviewed(db, signer):
    """A log with allowed, denied, limited and hostile-looking calls."""
    with SQLiteAuditStore(db, signer) as store:
        for i, (principal, outcome) in enumerate(
            [("alice", "ok"), ("bob", "timeout"), ("alice", "memory_limit")]
        ):
            authorized = store.append("call.authorized", {
                "call": {"id": f"c{i}", "name": "square"}, "principal": principal,
                "session_id": "s", "decision": {"kind": None, "reasons": ["allow-square"]}})
            store.append("call.completed", {"call_id": f"c{i}", "authorized_seq": authorized.seq,
                                            "outcome": outcome})
        store.append("call.denied", {
            "call": {"id": "d1", "name": "<script>alert(1)</script>"}, "principal": "eve",
            "session_id": "", "decision": {"kind": "approval_required",
                                           "reasons": ["needs-approval"]}})
    return db


class TestReport:
    def test_verdict_comes_first_with_the_counts(self, reviewed, signer):
        """The page opens with the verification verdict of the log."""
        page = render_report(reviewed, [signer.public_key()])

        assert page.index('id="verdict"') < page.index("<svg")
        assert "Verification OK: 7 records" in page

    def test_tampered_log_is_reported_as_failed(self, reviewed, signer, sql):
        """A log that fails verification is still reported, under a FAILED verdict."""
        sql("UPDATE records SET body = '{}' WHERE seq = 2")

        page = render_report(reviewed, [signer.public_key()])

        assert "Verification FAILED at record 2" in page

    def test_values_from_the_log_are_escaped(self, reviewed, signer):
        """A tool name holding markup is shown as text, never run."""
        page = render_report(reviewed, [signer.public_key()])

        assert "<script>alert(1)" not in page
        assert "&lt;script&gt;alert(1)" in page

    def test_denials_approvals_and_limits_are_listed(self, reviewed, signer):
        """The tables name the denial's rule, the approval needed and the limits hit."""
        page = render_report(reviewed, [signer.public_key()])

        for expected in ("needs-approval", "Approvals (1)", "Limits hit (2)", "memory_limit"):
            assert expected in page

    def test_nothing_is_fetched_from_the_network(self, reviewed, signer):
        """A Content-Security-Policy forbids every fetch; no URL but the SVG namespace."""
        page = render_report(reviewed, [signer.public_key()])

        assert "default-src 'none'" in page
        assert [] == [u for u in ("http://", "https://") if page.replace(
            "http://www.w3.org/2000/svg", "").count(u)]

    def test_renders_in_headless_chromium_without_script_errors(self, tmp_path, reviewed,
                                                                signer):
        """Debian's chromium renders the verdict and every chart, and its script runs."""
        chromium = shutil.which("chromium")
        assert chromium is not None, "run scripts/ensure-chromium.sh (make test does)"
        page = tmp_path / "report.html"
        page.write_text(render_report(reviewed, [signer.public_key()]), encoding="utf-8")

        done = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
             "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120, check=False,
        )

        assert 0 == done.returncode, done.stderr[-2000:]
        assert 'data-charts="4"' in done.stdout
        assert "Verification OK" in done.stdout
        assert 4 == done.stdout.count('<svg class="chart"')
        assert [] == [line for line in done.stderr.splitlines()
                      if "Uncaught" in line or "Refused to" in line]
