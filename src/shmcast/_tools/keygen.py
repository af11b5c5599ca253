"""Make a CURVE key pair for the remote path: NAME.key (public) and NAME.key_secret.

The writer loads its own pair as ``RemoteOptions(server_key="DIR/writer.key_secret")`` and
accepts the readers whose public files lie in the directory given as ``client_keys``; each
reader attaches with ``key="DIR/NAME.key_secret"``.  Keep the ``.key_secret`` files private
(they are created readable by their owner only).  See docs/remote.md.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="where to write the two files (created if missing)")
    parser.add_argument("name", help="the files' base name, e.g. writer or reader-2")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def run(args: argparse.Namespace) -> int:
    from .cli import UsageError

    try:
        import zmq.auth
    except ImportError:
        print("shmcast keygen: needs pyzmq: pip install 'shmcast[remote]'", file=sys.stderr)
        return 1
    name = args.name
    if not name or os.sep in name or name.startswith("."):
        raise UsageError(f"name {name!r} must be a plain file name")
    os.makedirs(args.directory, mode=0o700, exist_ok=True)
    public = os.path.join(args.directory, f"{name}.key")
    secret = public + "_secret"
    existing = [p for p in (public, secret) if os.path.exists(p)]
    if existing and not args.force:
        print(f"shmcast keygen: {', '.join(existing)} exists (--force overwrites)",
              file=sys.stderr)  # fmt: skip
        return 1
    old_umask = os.umask(0o077)
    try:
        for path in existing:
            os.unlink(path)
        public, secret = zmq.auth.create_certificates(args.directory, name)
    finally:
        os.umask(old_umask)
    os.chmod(secret, 0o600)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0
