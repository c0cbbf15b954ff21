"""The email channel: a notification or flood summary as a plain-text mail over SMTP
(aiosmtplib), with STARTTLS, implicit TLS or neither, and optional AUTH.

The Message-ID is made from the notification's id, so a mail sent again is recognisably the
same message. A connection per send: notifications are rare and SMTP servers drop idle ones.
A 5xx reply (a refused login, recipient or message) rejects the item; a 4xx, no answer or a
broken connection asks for a retry.

Must not: raise for a fault of the server; put the password in a result or message.
"""

from __future__ import annotations

import ssl
from email import policy
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Final

import aiosmtplib

from pocd.model import NS
from pocd.sinks import SinkError
from pocd.sinks.config import SecretValue
from pocd.sinks.notify import Connected, DeliveryResult, Item, Notification, Summary, redact
from pocd.sinks.notify.settings import EmailSettings
from pocd.sinks.notify.sink import channel_kind

__all__ = ["EmailChannel", "message_id", "open_channel"]

_ERROR_CHARS: Final = 300
_UNREACHABLE: Final = (
    aiosmtplib.SMTPConnectError,
    aiosmtplib.SMTPServerDisconnected,
    TimeoutError,
    OSError,
)
# Headers folded only beyond RFC 5322's hard limit: Python's folding of a subject with a
# non-ASCII word ("°C") puts a second space before it.
# aiosmtplib's send_message would flatten with its own policy, so the mail is flattened here.
_POLICY: Final = policy.SMTP.clone(max_line_length=998)


def message_id(item: Item) -> str:
    """The Message-ID of an item's mail: the same for the same item, at every send."""
    return f"<{item.id}@pocd.{item.site}>"


def _tls_context(settings: EmailSettings) -> ssl.SSLContext | None:
    if settings.security == "none":
        return None
    return ssl.create_default_context(cafile=settings.ca_file)


class EmailChannel(Connected):
    """Mails items to the configured addresses (see the module docstring)."""

    def __init__(
        self,
        settings: EmailSettings,
        *,
        password: SecretValue | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self._password = password
        self._tls = tls_context if tls_context is not None else _tls_context(settings)

    @property
    def where(self) -> str:
        return self.settings.where()

    def compose(self, item: Item) -> EmailMessage:
        """The mail of an item."""
        mail = EmailMessage(policy=_POLICY)
        mail["From"] = self.settings.sender
        mail["To"] = ", ".join(self.settings.to)
        mail["Subject"] = item.subject()
        mail["Message-ID"] = message_id(item)
        t = (
            item.event.t
            if isinstance(item, Notification)
            else item.end
            if isinstance(item, Summary)
            else item.t
        )
        mail["Date"] = formatdate(t / NS, usegmt=True)
        mail["X-Pocd-Notification-Id"] = item.id
        mail.set_content(item.text())
        return mail

    def _client(self) -> aiosmtplib.SMTP:
        s = self.settings
        return aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            use_tls=s.security == "tls",
            start_tls=s.security == "starttls",
            tls_context=self._tls,
            username=s.username,
            password=self._password.reveal() if self._password else None,
            timeout=s.timeout,
        )

    async def connect(self) -> None:
        """Nothing to open: each send connects."""

    async def send(self, item: Item) -> DeliveryResult:
        mail = self.compose(item)
        try:
            async with self._client() as smtp:
                await smtp.sendmail(self.settings.sender, self.settings.to, mail.as_bytes())
        except aiosmtplib.SMTPRecipientsRefused as exc:
            return _answer(exc.recipients[0].code, exc.recipients[0].message)
        except aiosmtplib.SMTPResponseException as exc:
            return _answer(exc.code, exc.message)
        except (aiosmtplib.SMTPException, TimeoutError, OSError, ssl.SSLError) as exc:
            return DeliveryResult.retry(self._redact(f"{self.where}: {_describe(exc)}"))
        return DeliveryResult.ok()

    async def healthcheck(self) -> str:
        """Connect, secure and log in as configured, then NOOP."""
        try:
            async with self._client() as smtp:
                await smtp.noop()
                greeting = smtp.last_ehlo_response or smtp.last_helo_response
                banner = greeting.message if greeting else ""
        except _UNREACHABLE as exc:
            raise SinkError(f"cannot reach {self.where}: {_describe(exc)}") from None
        except aiosmtplib.SMTPException as exc:
            raise SinkError(self._redact(f"{self.where}: {_describe(exc)}")) from None
        first = banner.splitlines()[0] if banner else "an SMTP server"
        login = f", logged in as {self.settings.username!r}" if self.settings.username else ""
        return f"{self.where} answers: {first}{login}"

    async def close(self) -> None:
        """Nothing stays open."""

    def _redact(self, text: str) -> str:
        return redact(text, self._password.reveal() if self._password else None)


def _answer(code: int, message: str) -> DeliveryResult:
    reason = f"SMTP {code}: {message}"[:_ERROR_CHARS]
    if 500 <= code < 600:
        return DeliveryResult.rejected(reason)
    return DeliveryResult.retry(reason)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | aiosmtplib.SMTPTimeoutError):
        return "no answer within the timeout"
    return f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]


def open_channel(settings: EmailSettings, base: Path) -> tuple[EmailChannel, list[str]]:
    """The channel with its password read (a file relative to `base`), and the secret values
    to keep out of messages; SinkError naming the file or variable if it is unusable."""
    try:
        password = settings.password.read(base) if settings.password else None
    except ValueError as exc:
        raise SinkError(str(exc)) from None
    return EmailChannel(settings, password=password), [password.reveal()] if password else []


SINK: Final = channel_kind("email", "email", EmailSettings, open_channel)
