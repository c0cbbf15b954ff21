"""Passwords: the policy a new one must meet, and argon2id hashing and verification.

No I/O and no storage: the caller keeps the hash. A message never repeats the password. A
failed verification is `False`, never an exception, whatever the stored hash holds.
"""

from __future__ import annotations

import functools
import secrets
import unicodedata
from typing import Final

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

from pocd.errors import AccessError

__all__ = [
    "MAX_LENGTH",
    "MIN_LENGTH",
    "check_password",
    "dummy_hash",
    "hash_password",
    "needs_rehash",
    "verify_password",
]

MIN_LENGTH: Final = 12
MAX_LENGTH: Final = 1024  # argon2 takes any length; a login request does not

# The library's defaults (argon2id, RFC 9106's low-memory profile): they move with the library,
# and `needs_rehash` tells the caller when a stored hash is of older parameters.
_HASHER: Final = argon2.PasswordHasher()


def check_password(login: str, password: str, *, min_length: int = MIN_LENGTH) -> None:
    """Raise AccessError, saying why, if `password` may not become the password of `login`."""
    if any(unicodedata.category(c) == "Cc" for c in password):
        raise AccessError("the password contains a control character")
    if len(password) < min_length:
        raise AccessError(f"the password is shorter than {min_length} characters")
    if len(set(password)) == 1:
        raise AccessError("the password is one character repeated")
    folded, name = password.casefold(), login.casefold()
    # A login of one or two letters is found inside many good passwords by chance.
    if len(name) >= 3 and (name in folded or name[::-1] in folded):
        raise AccessError(f"the password contains the login {login!r} (or it reversed)")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


@functools.cache
def dummy_hash() -> str:
    """A hash no password matches, made once, on first use (hashing takes tens of ms)."""
    return _HASHER.hash(secrets.token_urlsafe(32))


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True if `password` matches `stored_hash`. `None` (no such user) is checked against
    `dummy_hash()` and is always False: a login for an unknown user takes as long as one
    for a known user, so the time of the answer does not tell which logins exist."""
    try:
        if stored_hash is None:
            _HASHER.verify(dummy_hash(), password)
            return False
        return _HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    """True if the hash is of other parameters than the current ones (hash it anew at the next
    successful login). A hash that cannot be read is never verified, so it is True too."""
    try:
        return _HASHER.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True
