"""``engine keys create/list/revoke``: manage API keys in the store of ``--store``."""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from engine.api.auth import create_key
from engine.config import Config
from engine.errors import NotFound
from engine.serving.store.keys import open_key_store


def run_keys_command(args: argparse.Namespace, cfg: Config) -> int:
    store = open_key_store(cfg.store_url)
    try:
        if args.keys_command == "create":
            key = create_key(store, args.name)
            print(f"created key {args.name!r}; it is shown only once, store it now:", file=sys.stderr)
            # Alone on the last line of stdout, so scripts can take it with `tail -n1`.
            print(key)
            return 0
        if args.keys_command == "list":
            keys = store.list()
            if not keys:
                print("no keys; create one with `engine keys create --name NAME`")
                return 0
            width = max(len(k.name) for k in keys)
            print(f"{'NAME':<{width}}  {'ID':<12}  CREATED (UTC)")
            for k in keys:
                created = dt.datetime.fromtimestamp(k.created_at, dt.timezone.utc)
                print(f"{k.name:<{width}}  {k.key_id:<12}  {created:%Y-%m-%d %H:%M:%S}")
            return 0
        if args.keys_command == "revoke":
            if not store.remove(args.name):
                raise NotFound(f"no key named {args.name!r}; `engine keys list` shows the names")
            print(f"revoked key {args.name!r}")
            return 0
        raise ValueError(f"unknown keys command {args.keys_command!r}")
    finally:
        store.close()
