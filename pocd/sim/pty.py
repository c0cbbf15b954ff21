"""Pseudo-terminal pairs from socat: a simulated serial device on one end, pocd on the other.

Used by the simulators, the demo and the tests. A pty ignores the baud rate.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

__all__ = ["pty_pair"]


@contextlib.contextmanager
def pty_pair(link: str) -> Iterator[str]:
    """Make a socat pty pair; the end pocd opens is linked at `link`, the simulator's end at
    `link + ".sim"`, which is yielded. The pair (and both links) go away on exit."""
    if shutil.which("socat") is None:
        raise FileNotFoundError("socat is not installed (apt-get install socat)")
    ours = f"{link}.sim"
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={ours}", f"pty,raw,echo=0,link={link}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while not (os.path.exists(ours) and os.path.exists(link)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"socat could not make a pty pair at {link}")
            time.sleep(0.02)
        yield ours
    finally:
        proc.terminate()
        proc.wait(timeout=5)
