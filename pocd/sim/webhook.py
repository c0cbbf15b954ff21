"""A webhook receiver: an aiohttp server on 127.0.0.1 that checks each POST's HMAC signature
and timestamp (pocd.sinks.notify.webhook.verify), answers 204 for one it accepts and 401 with
the reason for one it refuses. The demo runs one and prints what it gets; the tests and
bench/alarm_latency.py use it as the far side of the webhook channel.

Must not: accept a request whose signature or timestamp it refused.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from pocd.sinks.notify.webhook import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureRefused,
    verify,
)

__all__ = ["Received", "Receiver"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Received:
    """One request the receiver accepted."""

    body: bytes
    notification_id: str
    at: int = field(default_factory=time.time_ns)  # when it arrived, ns since the epoch


class Receiver:
    """An aiohttp webhook receiver on a fixed port: 204 for a request `verify` accepts, 401
    with the reason for one it refuses. `start()` and `stop()` any number of times."""

    def __init__(
        self, secret: str, *, on_receive: Callable[[Received], None] | None = None
    ) -> None:
        self.secret = secret
        self.on_receive = on_receive  # told of each request accepted
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[Received] = []
        self.refused: list[str] = []
        self.arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify(
                self.secret,
                request.headers.get(TIMESTAMP_HEADER, ""),
                body,
                request.headers.get(SIGNATURE_HEADER, ""),
                time.time(),
            )
        except SignatureRefused as exc:
            self.refused.append(exc.reason)
            return web.Response(status=401, text=exc.reason)
        got = Received(body, request.headers.get(ID_HEADER, ""))
        self.received.append(got)
        self.arrived.set()
        if self.on_receive is not None:
            self.on_receive(got)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        app.router.add_route("HEAD", "/hook", _ok)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def _ok(request: web.Request) -> web.Response:
    return web.Response(status=200)
