"""The release commands of the CLI: `pocd export`, `pocd verify`, `pocd sign` and `pocd keys`.

`verify` and `sign` need no config, daemon or store: a remote QP runs them on the bundle's
zip with their own key and the site's keyring. Export and verify show progress on a terminal.
"""

from __future__ import annotations

import argparse
import getpass
import platform
import sys
import time
from pathlib import Path
from typing import Any

from pocd.cli import CommandError, _accounts, _admin, _print, _secret, _site, with_config
from pocd.model import AuditEntry, now_ns
from pocd.release import MEANINGS

__all__ = ["add_commands"]


class _Progress:
    """Progress on stderr: a line rewritten in place on a terminal, each stage once elsewhere."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.stage = ""
        self.shown = 0.0

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if stage != self.stage:
            if self.tty and self.stage:
                sys.stderr.write("\n")
            self.stage, self.shown = stage, 0.0
            if not self.tty:
                print(f"{stage}...", file=sys.stderr)
        if self.tty and now - self.shown >= 0.2:
            self.shown = now
            of = f" / {total:,} ({100 * done / total:.0f}%)" if total else ""
            sys.stderr.write(f"\r{stage}: {done:,}{of}   " if done else f"\r{stage}...")
            sys.stderr.flush()

    def done(self) -> None:
        if self.tty and self.stage:
            sys.stderr.write("\n")

    def say(self, text: str) -> None:
        self.done()
        self.stage = ""
        print(text, file=sys.stderr)


def _export(args: argparse.Namespace) -> int:
    from pocd.release.bundle import export

    site = _site(args)
    progress = _Progress()
    actor = f"local:{getpass.getuser()}@{platform.node()}"
    result = export(site, args.run, Path(args.out), actor=actor, progress=progress)
    progress.done()
    print(
        f"exported {result.samples:,} samples to {result.bag} and {result.zip}\n"
        f"attestation sha256 {result.attestation_sha256}; "
        f"{result.exceptions} exception records (see page 1 of data/report.pdf)"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pocd.release.verify import verify

    progress = _Progress()
    keyring = Path(args.keyring) if args.keyring else None
    verdict = verify(Path(args.bundle), keyring, progress.say)
    lines = [f"ok: {h}" for h in verdict.held]
    lines += [
        f"ok: signature {s['file']}: {s['meaning']} by {s['name']} ({s['t']})"
        + ("" if s["identity_checked"] else ", identity NOT checked (no --keyring)")
        for s in verdict.signatures
        if s["holds"]
    ]
    lines += [f"FAIL: {p}" for p in verdict.problems]
    lines.append(f"{args.bundle}: verified" if verdict.holds else f"{args.bundle}: does NOT verify")
    data = {
        "holds": verdict.holds,
        "held": verdict.held,
        "problems": verdict.problems,
        "signatures": verdict.signatures,
        "predicate": verdict.predicate,
    }
    _print(data, args.json, "\n".join(lines))
    return 0 if verdict.holds else 1


def _sign(args: argparse.Namespace) -> int:
    from pocd.release.keys import load_private, read_public
    from pocd.release.verify import sign

    key_path = Path(args.key)
    public_path = key_path.with_suffix(".pub.json")
    name, public = read_public(public_path)
    private = load_private(key_path, _secret(f"passphrase of {key_path.name}"))
    if private.public_key().public_bytes_raw() != public:
        raise CommandError(f"{public_path}: not the public half of {key_path}")
    progress = _Progress()
    keyring = Path(args.keyring) if args.keyring else None
    made = sign(Path(args.bundle), private, name, args.meaning, keyring, progress.say)
    print(f"signed {args.bundle} as {args.meaning} by {name}: {made}")
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from pocd.release.keys import create_key

    passphrase = _secret(f"new passphrase of the key of {args.name}", new=True)
    key, public = create_key(Path(args.out), args.name, passphrase)
    print(
        f"key made: {key} (yours alone, encrypted with your passphrase)\n"
        f"public key: {public} (give it to the site's admin: `pocd keys add`)"
    )
    return 0


def _keys_add(args: argparse.Namespace) -> int:
    from pocd.release.keys import Holder, keyring_file, read_keyring, read_public, write_keyring
    from pocd.sitekey import SiteKey, key_id
    from pocd.users import admin_actor

    site = _site(args)
    name, public = read_public(Path(args.public))
    admin = _admin(args)
    path = keyring_file(site.data_dir)
    with _accounts(site) as store:
        user = store.user(args.user)
        if user is None or user.disabled:
            raise CommandError(f"no enabled user {args.user!r}: add them first (`pocd user add`)")
        t = now_ns()
        actor = admin_actor(store, admin, user.login, t)
        key = SiteKey.open(site.data_dir)
        holders = dict(read_keyring(path, key.public).holders) if path.exists() else {}
        holder = Holder(key_id(public), public, user.name, user.login, tuple(user.roles))
        holders[holder.keyid] = holder
        write_keyring(path, site.id, key, holders.values())
        store.write(
            [
                AuditEntry(
                    t,
                    actor,
                    "keyring.add",
                    user.login,
                    new=holder.keyid,
                    details={"name": user.name, "roles": ", ".join(user.roles), "key_name": name},
                )
            ]
        )
    print(
        f"key {holder.keyid} of {user.name} ({', '.join(user.roles)}) is in the keyring {path}: "
        "give that file to whoever verifies the bundles"
    )
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from pocd.release.keys import keyring_file, read_keyring
    from pocd.sitekey import key_id

    keyring = read_keyring(
        Path(args.keyring) if args.keyring else keyring_file(_site(args).data_dir)
    )
    holders = [h.json() for h in keyring.holders.values()]
    text = "\n".join(
        [f"keyring of site {keyring.site_id}, site key {key_id(keyring.site_key)}, {keyring.t}"]
        + [f"  {h['keyid']}  {h['name']} ({h['login']}: {', '.join(h['roles'])})" for h in holders]
    )
    _print({"site": keyring.site_id, "holders": holders}, args.json, text)
    return 0


def _release(args: argparse.Namespace) -> int:
    """Record in the store that a bundle this site exported was released by a QP: what lets
    its samples be pruned."""
    from pocd.release.keys import keyring_file
    from pocd.release.verify import verify

    site = _site(args)
    keyring = keyring_file(site.data_dir)
    if not keyring.exists():
        raise CommandError(f"{keyring}: no keyring yet (`pocd keys add`)")
    verdict = verify(Path(args.bundle), keyring, _Progress().say)
    if not verdict.holds:
        raise CommandError(
            f"{args.bundle} does not verify:\n" + "\n".join(f"  {p}" for p in verdict.problems)
        )
    releases = [s for s in verdict.signatures if s["meaning"] == "released" and s["holds"]]
    if not releases:
        raise CommandError(f"{args.bundle}: no valid `released` signature (`pocd sign`)")
    run_id = str(verdict.predicate.get("run_id"))
    with _accounts(site) as store:
        exports = [a.new for a in store.audit_of("run.export", run_id)]
        if verdict.attestation_sha256 not in exports:
            raise CommandError(f"{args.bundle}: not a bundle of run {run_id} this site exported")
        release = releases[-1]
        store.write(
            [
                AuditEntry(
                    now_ns(),
                    f"local:{getpass.getuser()}@{platform.node()}",
                    "run.released",
                    run_id,
                    new=verdict.attestation_sha256,
                    details={
                        "batch_id": str(verdict.predicate.get("batch_id")),
                        "released_by": f"{release['name']} ({release['login']})",
                        "released_at": str(release["t"]),
                        "keyid": str(release["keyid"]),
                    },
                )
            ]
        )
    print(f"run {run_id} recorded as released by {release['name']} at {release['t']}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from pocd.model import NS

    site = _site(args)
    try:
        cutoff = datetime.fromisoformat(args.before)
    except ValueError:
        raise CommandError(f"--before {args.before!r}: not a date (2026-01-31)") from None
    if cutoff.tzinfo is None:
        cutoff = cutoff.replace(tzinfo=UTC)
    before = int(cutoff.timestamp() * NS)
    with _accounts(site) as store:
        last, held = store.prunable(before)
        first = store.pruned_upto() + 1
        for reason in held:
            print(f"kept: {reason}")
        if last < first:
            print("nothing to prune")
            return 0
        if args.dry_run:
            print(f"would prune samples {first}..{last}")
            return 0
        actor = f"local:{getpass.getuser()}@{platform.node()}"
        entry = AuditEntry(now_ns(), actor, "store.prune", "samples", f"before {args.before}")
        gone = store.prune_samples(last, entry)
    print(f"pruned {gone:,} samples ({first}..{last}); their chain entries stay")
    return 0


def add_commands(sub: Any) -> None:
    export = with_config(
        sub.add_parser("export", help="a finished run as its signed release bundle")
    )
    export.add_argument("run", help="run id, unique prefix, or batch id")
    export.add_argument("-o", "--out", required=True, help="the bag folder to make (and .zip)")
    export.set_defaults(func=_export)

    verify = sub.add_parser(
        "verify", help="check a release bundle (folder or zip): no config or store needed"
    )
    verify.add_argument("bundle")
    verify.add_argument("--keyring", help="the site's keyring: who may sign, and the site key")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=_verify)

    sign = sub.add_parser(
        "sign",
        help="sign a verified release bundle with your own key (no config or store needed)",
        epilog="The key's passphrase is asked on the terminal, else read as a line of stdin.",
    )
    sign.add_argument("bundle")
    sign.add_argument("--meaning", required=True, choices=MEANINGS)
    sign.add_argument("--key", required=True, help="your key file (`pocd keys create`)")
    sign.add_argument("--keyring", help="the site's keyring, to check the bundle and your role")
    sign.set_defaults(func=_sign)

    release = with_config(
        sub.add_parser("release", help="record a bundle released by a QP (allows pruning)")
    )
    release.add_argument("bundle")
    release.set_defaults(func=_release)

    prune = with_config(
        sub.add_parser(
            "prune",
            help="delete old samples of released runs (their chain hashes stay; audited)",
        )
    )
    prune.add_argument("--before", required=True, help="a date: samples older may go")
    prune.add_argument("--dry-run", action="store_true", help="say what would go, do nothing")
    prune.set_defaults(func=_prune)

    keys = sub.add_parser("keys", help="people's signing keys and the site's keyring")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make your own signing key (passphrase asked)")
    create.add_argument("--name", required=True, help="your printed name")
    create.add_argument("-o", "--out", default=".", help="folder for the key (default: here)")
    create.set_defaults(func=_keys_create)
    add = with_config(keys_sub.add_parser("add", help="put a person's public key in the keyring"))
    add.add_argument("public", help="their .pub.json file")
    add.add_argument("--user", required=True, help="their login: name and roles come from it")
    add.add_argument("--as", dest="as_admin", metavar="ADMIN", help="the admin adding it")
    add.set_defaults(func=_keys_add)
    lst = keys_sub.add_parser("list", help="who is in a keyring")
    lst.add_argument("-c", "--config", help="the site config (its data dir holds the keyring)")
    lst.add_argument("--keyring", help="a keyring file instead")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_keys_list)
