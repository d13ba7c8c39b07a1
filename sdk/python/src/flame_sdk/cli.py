"""``flame-py-worker``: run a Python trainer (and aggregator) as a worker."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import ssl
import sys
from typing import Any, Dict, List, Optional

from .worker import IdTaken, Worker


def load(spec: str) -> Any:
    """``module:Name`` (the module importable, or a file path before the colon)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SystemExit(f"flame-py-worker: '{spec}' should be module:Name (e.g. my_trainer:MyTrainer)")
    if module.endswith(".py") or os.sep in module:
        path = os.path.abspath(module)
        sys.path.insert(0, os.path.dirname(path))
        module = os.path.splitext(os.path.basename(path))[0]
    else:
        sys.path.insert(0, os.getcwd())
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"flame-py-worker: cannot load {spec}: {e}") from None
    return found


def nats_options(args: argparse.Namespace) -> Dict[str, Any]:
    """Credentials as the Rust worker takes them (one way at most)."""
    ways = [args.nats_creds, args.nats_nkey, args.nats_user, args.nats_token]
    if sum(1 for w in ways if w) > 1:
        raise SystemExit(
            "flame-py-worker: give one way to authenticate to NATS: --nats-creds, --nats-nkey, --nats-user/--nats-password or --nats-token"
        )
    opts: Dict[str, Any] = {}
    if args.nats_creds or args.nats_nkey:
        try:
            importlib.import_module("nkeys")
        except ImportError:
            raise SystemExit(
                "flame-py-worker: NKeys need the `nkeys` package: pip install 'flame-sdk[nkeys]' (or pip install nkeys)"
            ) from None
    if args.nats_creds:
        if not os.path.isfile(args.nats_creds):
            raise SystemExit(f"flame-py-worker: cannot read the NATS credentials file '{args.nats_creds}'")
        opts["user_credentials"] = args.nats_creds
    if args.nats_nkey:
        try:
            with open(args.nats_nkey) as f:
                seed = next((line.strip() for line in f if line.strip().startswith("SU")), None)
        except OSError as e:
            raise SystemExit(f"flame-py-worker: cannot read the NKey seed file '{args.nats_nkey}': {e}") from None
        if seed is None:
            raise SystemExit(f"flame-py-worker: '{args.nats_nkey}' holds no user NKey seed (a line starting with SU)")
        opts["nkeys_seed_str"] = seed
    if args.nats_user:
        if not args.nats_password:
            raise SystemExit("flame-py-worker: --nats-user needs --nats-password")
        opts["user"], opts["password"] = args.nats_user, args.nats_password
    if args.nats_token:
        opts["token"] = args.nats_token
    if args.nats_domain:
        opts["domain"] = args.nats_domain
    if args.nats_tls_ca:
        if not os.path.isfile(args.nats_tls_ca):
            raise SystemExit(f"flame-py-worker: the TLS CA file '{args.nats_tls_ca}' does not exist")
        opts["tls"] = ssl.create_default_context(cafile=args.nats_tls_ca)
    return opts


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="flame-py-worker",
        description="Runs FL tasks (training with your Python trainer; aggregation) that the engine sends over NATS.",
    )
    p.add_argument("--nats", default=env("FLAME_NATS"), required=env("FLAME_NATS") is None, help="NATS server URL [env FLAME_NATS]")
    p.add_argument("--id", required=True, help="this worker's id (letters, digits, '-', '_'), unique in the deployment")
    p.add_argument("--trainer", help="your trainer class, module:Class (a file path works as the module)")
    p.add_argument("--aggregator", help="your aggregator class, module:Class (default: FedAvg in numpy)")
    p.add_argument("--roles", help="comma-separated roles (default: trainer, plus aggregator with --aggregator)")
    p.add_argument("--realm", default="default", help="where this worker runs, e.g. default/us/west")
    p.add_argument("--device", default="cpu", help="the compute device it trains on")
    p.add_argument("--concurrency", type=int, default=1, help="commands run at once")
    p.add_argument(
        "--data-root",
        action="append",
        dest="data_roots",
        metavar="DIR",
        help="a folder whose datasets this worker may read (several allowed; FLAME_DATA_ROOTS with ':'); default: the folder it starts in",
    )
    p.add_argument("--nats-creds", default=env("FLAME_NATS_CREDS"), help="a NATS credentials file [env FLAME_NATS_CREDS]")
    p.add_argument("--nats-nkey", default=env("FLAME_NATS_NKEY"), help="a file holding an NKey seed [env FLAME_NATS_NKEY]")
    p.add_argument("--nats-user", default=env("FLAME_NATS_USER"), help="user name [env FLAME_NATS_USER]")
    p.add_argument("--nats-password", default=env("FLAME_NATS_PASSWORD"), help="password [env FLAME_NATS_PASSWORD]")
    p.add_argument("--nats-token", default=env("FLAME_NATS_TOKEN"), help="token [env FLAME_NATS_TOKEN]")
    p.add_argument(
        "--nats-domain",
        default=env("FLAME_NATS_DOMAIN"),
        help="the hub's JetStream domain, behind a leaf node without JetStream [env FLAME_NATS_DOMAIN]",
    )
    p.add_argument("--nats-tls-ca", default=env("FLAME_NATS_TLS_CA"), help="a CA certificate to trust; TLS is then required")
    return p


async def serve(worker: Worker, url: str, options: Optional[Dict[str, Any]] = None) -> None:
    """Connects and runs ``worker`` until SIGTERM or SIGINT; commands in
    flight report before it returns."""
    await worker.connect(url, **(options or {}))
    # From here a signal stops the worker gracefully (before, it ends the process).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await worker.run(stop)
    finally:
        await worker.close()


def main(argv: Optional[List[str]] = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("FLAME_SDK_LOG", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = load(args.trainer) if args.trainer else None
    aggregator = load(args.aggregator)() if args.aggregator else None
    roles = [r.strip() for r in args.roles.split(",") if r.strip()] if args.roles else None
    try:
        roots = args.data_roots or (os.environ["FLAME_DATA_ROOTS"].split(":") if os.environ.get("FLAME_DATA_ROOTS") else None)
        worker = Worker(
            args.id,
            trainer=trainer,
            aggregator=aggregator,
            roles=roles,
            realm=args.realm,
            device=args.device,
            concurrency=args.concurrency,
            data_roots=roots,
        )
    except ValueError as e:
        raise SystemExit(f"flame-py-worker: {e}") from None
    try:
        asyncio.run(serve(worker, args.nats, nats_options(args)))
    except (ConnectionError, IdTaken) as e:
        raise SystemExit(f"flame-py-worker: {e}") from None


if __name__ == "__main__":
    main()
