"""The batch-release record: a run exported as a signed BagIt bag that any auditor can check
offline (`pocd export`, `pocd verify`), signed by people (`pocd sign`) with their own keys."""
