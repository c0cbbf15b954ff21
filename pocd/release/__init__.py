"""The batch-release record: a run exported as a signed BagIt bag that any auditor can check
offline (`pocd export`, `pocd verify`), signed by people (`pocd sign`) with their own keys."""

from typing import Final

# What a person's signature of a bundle means (21 CFR 11.50): `released` only by a QP.
MEANINGS: Final = ("reviewed", "approved", "released")
