"""The webhook channel: an item's JSON POSTed (aiohttp) with an HMAC-SHA256 signature and a
timestamp against replay, and `verify`, which a receiver uses to check both.

Headers: `X-Pocd-Timestamp` (unix seconds), `X-Pocd-Signature: sha256=<hex HMAC-SHA256 of
"<timestamp>.<body>">` and `X-Pocd-Notification-Id` (the same at every send: a receiver
drops what it has seen). A 2xx delivers; a 4xx other than 408 and 429 rejects the item (kept
as failed, not retried); any other answer, or none, asks for a retry.

Must not: raise for a fault of the receiver; put the secret in a result or message.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import aiohttp

from pocd.errors import PocdError
from pocd.sinks import SinkError
from pocd.sinks.config import SecretValue
from pocd.sinks.notify import Connected, DeliveryResult, Item
from pocd.sinks.notify.settings import WebhookSettings
from pocd.sinks.notify.sink import channel_kind

__all__ = [
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "SignatureRefused",
    "WebhookChannel",
    "open_channel",
    "sign",
    "verify",
]

TIMESTAMP_HEADER: Final = "X-Pocd-Timestamp"
SIGNATURE_HEADER: Final = "X-Pocd-Signature"
ID_HEADER: Final = "X-Pocd-Notification-Id"
_RETRIED_4XX: Final = frozenset({408, 429})
_ERROR_CHARS: Final = 300


class SignatureRefused(PocdError):
    """A webhook request whose signature or timestamp does not hold; `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(_key(secret), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(
    secret: str | bytes,
    timestamp: str,
    body: bytes,
    signature: str,
    now: float,
    tolerance_s: float = 300,
) -> None:
    """Checks a received request: the headers' timestamp and signature, the raw body, and the
    receiver's clock (unix seconds). SignatureRefused if the signature is not the body's under
    that secret, or the timestamp is more than `tolerance_s` away from `now` (a replay, or a
    request held back). The signature is checked first: an unsigned timestamp says nothing."""
    try:
        stamp = int(timestamp)
    except ValueError:
        raise SignatureRefused(f"timestamp {timestamp[:20]!r} is not unix seconds") from None
    if not hmac.compare_digest(sign(secret, stamp, body), signature.strip()):
        raise SignatureRefused("signature does not match the body and timestamp")
    if stamp < now - tolerance_s:
        raise SignatureRefused(f"timestamp is {now - stamp:.0f} s old (stale: a replay?)")
    if stamp > now + tolerance_s:
        raise SignatureRefused(f"timestamp is {stamp - now:.0f} s in the future")


class WebhookChannel(Connected):
    """POSTs items to one URL (see the module docstring). `clock`: unix seconds."""

    def __init__(
        self,
        settings: WebhookSettings,
        *,
        secret: SecretValue,
        tls_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._secret = secret
        self._clock = clock
        if tls_context is None and settings.ca_file is not None:
            tls_context = ssl.create_default_context(cafile=settings.ca_file)
        self._tls = tls_context
        self._session: aiohttp.ClientSession | None = None

    @property
    def where(self) -> str:
        return self.settings.where()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._tls if self._tls is not None else True)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout), connector=connector
            )
        return self._session

    def headers(self, item: Item, body: bytes) -> dict[str, str]:
        """The headers of a POST of `body` now."""
        stamp = int(self._clock())
        return {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(stamp),
            SIGNATURE_HEADER: sign(self._secret.reveal(), stamp, body),
            ID_HEADER: item.id,
        }

    async def connect(self) -> None:
        self._open()

    async def send(self, item: Item) -> DeliveryResult:
        body = item.json()
        session = self._open()
        try:
            async with session.post(
                self.settings.url, data=body, headers=self.headers(item, body)
            ) as resp:
                if 200 <= resp.status < 300:
                    return DeliveryResult.ok()
                text = (await resp.text(errors="replace")).strip()
                reason = f"HTTP {resp.status}: {text}"[:_ERROR_CHARS]
                if 400 <= resp.status < 500 and resp.status not in _RETRIED_4XX:
                    return DeliveryResult.rejected(reason)
                return DeliveryResult.retry(reason, _retry_after(resp.headers.get("Retry-After")))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return DeliveryResult.retry(f"{self.where}: {_describe(exc)}")

    async def healthcheck(self) -> str:
        """A HEAD of the URL: that it answers over HTTP(S) at all (the secret is proved only
        by a delivery; a test POST would reach people)."""
        try:
            async with self._open().head(self.settings.url, allow_redirects=False) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SinkError(f"cannot reach {self.where}: {_describe(exc)}") from None
        return f"{self.where} answers HEAD with HTTP {status}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(value: str | None) -> float | None:
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within the timeout"
    return f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]


def open_channel(settings: WebhookSettings, base: Path) -> tuple[WebhookChannel, list[str]]:
    """The channel with its secret read (a file relative to `base`), and the secret values to
    keep out of messages; SinkError naming the file or variable if it is unusable."""
    try:
        secret = settings.secret.read(base)
    except ValueError as exc:
        raise SinkError(str(exc)) from None
    return WebhookChannel(settings, secret=secret), [secret.reveal()]


SINK: Final = channel_kind("webhook", "webhook", WebhookSettings, open_channel)
