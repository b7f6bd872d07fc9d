"""The upstream as last verified: its report, and an HTTP client pinned to the key it vouched for.

Every connection the client opens must present that key (teegpu.client.pinned_context), so a
request byte can only reach the attested enclave. A handshake that meets another key (a restarted
server, or someone else) fails before anything is sent; `reverify` then runs the whole
verification on the new key, and only a pass installs a client pinned to it.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

import httpx

from teegpu.client import Verified, pinned_context, verify_server
from teegpu.config import ProxyConfig, VerifyConfig
from teegpu.errors import TeegpuError

RETRY_UNVERIFIED_S = 5.0  # while unverified, a request (or the timer) tries again at most this often


class Unverified(Exception):
    """No verified upstream to forward to: the message names the check that failed."""


class Upstream:
    def __init__(self, config: ProxyConfig, expected: VerifyConfig, verified: Verified):
        self.url, self.config, self.expected = config.upstream.rstrip("/"), config, expected
        self.verified: Verified | None = None
        self.verified_at = self.attempted_at = 0.0
        self.error: str | None = None
        self.http: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()
        self._install(verified)

    def client(self) -> httpx.AsyncClient:
        """The pinned client, or Unverified naming why there is none."""
        if self.http is None:
            raise Unverified(self.error or "the upstream is not verified")
        return self.http

    async def reverify(self, reason: str, stale: httpx.AsyncClient | None = None) -> None:
        """Verify again (one at a time). With `stale`, only if no one has replaced that client yet:
        many requests meeting the same new key cost one verification."""
        async with self._lock:
            if stale is not None and self.http is not stale and self.http is not None:
                return
            if self.http is None and time.time() - self.attempted_at < RETRY_UNVERIFIED_S:
                return  # failed a moment ago: answer with that error instead of hammering the upstream
            self.attempted_at = time.time()
            try:
                verified = await asyncio.to_thread(verify_server, self.url, self.expected)
            except (TeegpuError, OSError, httpx.HTTPError, ValueError) as e:
                await self._fail(f"{reason}; verifying it again failed: {e}")
                return
            old = self.http
            if old is not None and verified.spki_sha256 == self.verified.spki_sha256:
                self.verified, self.verified_at = verified, self.attempted_at  # streams on it go on
                return
            self._install(verified)
            if old is not None:
                await old.aclose()
            print(f"teegpu proxy: {self.url} verified again ({reason}): {self.verified.measurement or 'no quote'}, "
                  f"key {verified.spki_sha256.hex()[:16]}...", flush=True)

    async def keep_verified(self) -> None:
        """Re-verify every --reverify-s (every few seconds while unverified), until cancelled."""
        while True:
            await asyncio.sleep(self.config.reverify_s if self.http is not None
                                else min(self.config.reverify_s, RETRY_UNVERIFIED_S))
            await self.reverify("periodic check")

    def report(self) -> dict:
        """What /v1/attestation answers: the last verification that passed, and any failure since."""
        when = (lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None)
        verified = self.verified
        body = None if verified is None else {**asdict(verified), "spki_sha256": verified.spki_sha256.hex()}
        return {"upstream": self.url, "verified": self.http is not None, "error": self.error,
                "verified_at": when(self.verified_at), "last_attempt_at": when(self.attempted_at),
                "reverify_s": self.config.reverify_s, "report": body}

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()

    def _install(self, verified: Verified) -> None:
        self.verified, self.error = verified, None
        self.verified_at = self.attempted_at = time.time()
        self.http = httpx.AsyncClient(base_url=self.url, verify=pinned_context(verified.spki_sha256),
                                      timeout=httpx.Timeout(self.config.timeout_s, connect=10.0))

    async def _fail(self, message: str) -> None:
        print(f"teegpu proxy: {self.url} NOT verified: {message}; answering 502 until it is", flush=True)
        old, self.http, self.error = self.http, None, message
        if old is not None:
            await old.aclose()
