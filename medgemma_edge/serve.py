"""``medgemma-edge serve``: the bridge over loopback HTTP (default), stdio or a Unix socket.

Prints the URL and the web page's address, writes the endpoint file (host, port, pid, token;
mode 0600) and with ``--open`` opens the page in a browser. ``--lan [ADDR]`` is the clinic-server
mode (android_bridge.lan; docs/CLINIC_SERVER.md): HTTPS with a pinned self-signed certificate,
paired devices, a fair queue for generations, rate limits and an audit log. The server stack (starlette,
uvicorn: the ``serve`` extra) is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from android_bridge.settings import LOOPBACK
from edge.errors import UsageError, require
from medgemma_edge.common import port_arg
from medgemma_edge.options import add_model_options, medgemma_settings

log = logging.getLogger(__name__)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve the runtime to apps: loopback HTTP (/v1/rpc, OpenAI routes), stdio, Unix socket"
    )
    add_model_options(p)
    p.add_argument("--medsiglip-bundle", type=Path, help="MedSigLIP from another bundle (default: -b)")
    p.add_argument("--index", type=Path, help="the similar-case index directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this device only)")
    p.add_argument("--port", type=port_arg, default=0, help="port (default 0: a free one)")
    p.add_argument("--endpoint-file", type=Path, help="where to write url/port/pid/token (0600)")
    p.add_argument("--max-body", default="64M", help="largest request body (default 64M)")
    p.add_argument("--no-paths", action="store_true", help="refuse image file paths in requests")
    p.add_argument("--open", action="store_true", help="open the web page in a browser")
    _add_limit_flags(p)
    _add_clinic_flags(p)
    _add_lan_flags(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stdio", action="store_true", help="speak JSON lines on stdin/stdout instead of HTTP")
    mode.add_argument("--unix-socket", type=Path, help="speak JSON lines on this Unix socket instead of HTTP")
    p.set_defaults(func=run_serve)


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    """One flag per resource guard (android_bridge.settings.Limits: flag, help, default)."""
    from android_bridge.settings import Limits
    from edge.settings import fields, value_type

    for f in fields(Limits):
        base, _ = value_type(Limits, f)
        p.add_argument(
            f.metadata["flag"],
            dest=f"limit_{f.name}",
            type=base,
            metavar="SECONDS" if base is float else "N",
            help=f"{f.metadata['help']} (default {f.default})",
        )


def _add_clinic_flags(p: argparse.ArgumentParser) -> None:
    """The DICOM node (``--dicom-port`` ...), the data directory, the ingest rules for received
    images and where signed reports are delivered (android_bridge.delivery.DeliverySettings)."""
    from medgemma_edge.dicom import add_dicom_flags

    add_dicom_flags(p)
    g = p.add_argument_group("received studies and reports")
    g.add_argument(
        "--no-data",
        action="store_true",
        help="keep no received studies or reports (no DICOM node, no report ops)",
    )
    g.add_argument(
        "--index-received",
        action="store_true",
        help="add each received image to the similar-case index (--index), with modality and body part",
    )
    g.add_argument(
        "--prepare-received",
        action="store_true",
        help="encode the newest received study for MedGemma while the device is idle",
    )
    _add_settings_flags(g, "android_bridge.delivery", "DeliverySettings", "send_")


def _add_lan_flags(p: argparse.ArgumentParser) -> None:
    """``--lan [ADDR]`` and one flag per field of android_bridge.settings.LanSettings."""
    g = p.add_argument_group("clinic server (serve --lan; docs/CLINIC_SERVER.md)")
    g.add_argument(
        "--lan",
        nargs="?",
        const="0.0.0.0",
        metavar="ADDR",
        help="serve the clinic's tablets on this LAN address (default with no ADDR: every interface) "
        "over HTTPS with a self-signed certificate devices pin; only paired devices get in",
    )
    _add_settings_flags(g, "android_bridge.settings", "LanSettings", "lan_")


def _lan(args: argparse.Namespace) -> dict:
    """ServeSettings' ``host`` and ``lan`` from ``--lan`` and its flags (UsageError when they clash)."""
    from android_bridge.settings import LanSettings
    from edge.settings import fields

    extra = [
        f.metadata["flag"] for f in fields(LanSettings) if getattr(args, f"lan_{f.name}", None) is not None
    ]
    if args.lan is None:
        if extra:
            raise UsageError(f"{extra[0]} is for the clinic-server mode: add --lan [ADDR]")
        return {}
    if args.stdio or args.unix_socket:
        raise UsageError("--lan serves HTTPS: drop --stdio / --unix-socket")
    if args.no_data:
        raise UsageError(
            "--lan keeps its certificate and paired devices in the data directory: drop --no-data"
        )
    if args.host != "127.0.0.1":
        raise UsageError("give the address once: --lan ADDR (not --host with --lan)")
    return {
        "host": args.lan,
        "lan": _settings_from_flags(args, "android_bridge.settings", "LanSettings", "lan_"),
    }


def _add_settings_flags(p, module: str, name: str, prefix: str) -> None:
    """One flag per field of a settings dataclass (its ``flag``, ``help`` and default)."""
    import importlib

    from edge.settings import fields, value_type

    cls = getattr(importlib.import_module(module), name)
    for f in fields(cls):
        base, _ = value_type(cls, f)
        p.add_argument(
            f.metadata["flag"],
            dest=f"{prefix}{f.name}",
            type=base,
            metavar="SECONDS" if base is float else "N" if base is int else "VALUE",
            help=f"{f.metadata['help']} (default {f.default})",
        )


def _settings_from_flags(args: argparse.Namespace, module: str, name: str, prefix: str):
    import importlib

    from edge.settings import fields, from_mapping

    cls = getattr(importlib.import_module(module), name)
    given = {f.name: getattr(args, f"{prefix}{f.name}", None) for f in fields(cls)}
    return from_mapping(cls, {k: v for k, v in given.items() if v is not None}, where="serve ")


def _clinic(args: argparse.Namespace) -> dict:
    """ServeSettings' clinic fields from the flags."""
    from android_bridge.settings import DicomSettings
    from medgemma_edge.dicom import data_root

    if args.no_data:
        if args.dicom_port is not None or args.index_received or args.prepare_received:
            raise UsageError(
                "--no-data keeps no studies: drop --dicom-port, --index-received, --prepare-received"
            )
        return {}
    if args.index_received and not args.index:
        raise UsageError("--index-received adds received images to the similar-case index: give --index DIR")
    dicom = None
    if args.dicom_port is not None:
        dicom = DicomSettings(
            port=args.dicom_port,
            host=args.dicom_host,
            ae_title=args.ae_title,
            allowed_aes=tuple(args.allow_ae),
            allowed_peers=tuple(args.allow_peer),
        )
    return {
        "data_dir": data_root(args),
        "dicom": dicom,
        "index_received": args.index_received,
        "prepare_received": args.prepare_received,
        "delivery": _settings_from_flags(args, "android_bridge.delivery", "DeliverySettings", "send_"),
    }


def _limits(args: argparse.Namespace):
    """The guards with the flags given applied, each checked (a bad value: UsageError, exit 2)."""
    from android_bridge.settings import Limits
    from edge.settings import fields, from_mapping

    given = {f.name: getattr(args, f"limit_{f.name}", None) for f in fields(Limits)}
    return from_mapping(Limits, {k: v for k, v in given.items() if v is not None}, where="serve ")


def settings_from_args(args: argparse.Namespace):
    from android_bridge.settings import ServeSettings, default_endpoint_file
    from edge.bundle.manifest import open_bundle
    from edge.device import profiles
    from edge.device.resources import parse_bytes

    bundle, medgemma, image_cache = medgemma_settings(args)
    siglip_bundle = open_bundle(args.medsiglip_bundle) if args.medsiglip_bundle else bundle
    lan = _lan(args)
    clinic = _clinic(args)
    if lan and not clinic.get("data_dir"):
        raise UsageError(
            "--lan keeps its certificate and paired devices in the data directory: give --data DIR"
        )
    return ServeSettings(
        bundle=bundle.root,
        medsiglip_bundle=args.medsiglip_bundle,
        index=args.index,
        host=lan.get("host", args.host),
        port=args.port,
        max_body_bytes=parse_bytes(args.max_body),
        endpoint_file=args.endpoint_file or default_endpoint_file(),
        unix_socket=args.unix_socket,
        medgemma=medgemma,
        medsiglip=profiles.medsiglip_settings(siglip_bundle, args.profile),
        image_cache=image_cache,
        allow_paths=not args.no_paths,
        limits=_limits(args),
        lan=lan.get("lan"),
        **clinic,
    )


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.lan is not None:
        log.warning("serve: clinic-server mode on %s: HTTPS, paired devices only", settings.host)
    elif not settings.loopback:
        log.warning("serve: binding %s exposes the runtime beyond this device", settings.host)
    if settings.dicom is not None and settings.dicom.host not in LOOPBACK:
        log.warning(
            "serve: the DICOM node binds %s (a LAN address): modalities on the network can send to it%s",
            settings.dicom.host,
            ""
            if settings.dicom.allowed_aes or settings.dicom.allowed_peers
            else ", from any AE title and address",
        )
    if args.stdio or args.unix_socket:
        return _serve_lines(settings, args)
    require("uvicorn", "serve")
    require("starlette", "serve")
    from android_bridge.http.server import RunningServer

    # uvicorn re-raises the signal it caught once it has stopped; a handler of ours makes that
    # a no-op, so the cleanup below runs and the exit status is 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = RunningServer(settings, log_level="info" if args.verbose else "warning")
    path = server.write_endpoint(settings.endpoint_file)
    print(f"medgemma-edge serve: {server.url} (token and pid in {path})", flush=True)
    print(f"medgemma-edge serve: web page: {_page_line(server, path)}", flush=True)
    if server.lan is not None:
        _print_lan(server, path)
    if server.bridge.dicom:
        d = server.bridge.dicom
        print(f"medgemma-edge serve: DICOM node {d['ae_title']} on {d['host']}:{d['port']}", flush=True)
    if args.open:
        _open_page(server.page_url)
    try:
        server.run()
    finally:
        server.bridge.shutdown(grace_s=settings.grace_s)
    print("medgemma-edge serve: stopped", flush=True)
    return 0


def _page_line(server, endpoint_file: Path) -> str:
    """The page's address for a person at a terminal, token included. When stdout is not a
    terminal (a service manager, a pipe into a log file) the token is left out: the endpoint
    file, readable by this user only, has the full address under "page"."""
    if sys.stdout.isatty():
        return server.page_url
    return f'{server.url}/ (the address with its access token is "page" in {endpoint_file})'


def _print_lan(server, endpoint_file: Path) -> None:
    """The certificate's fingerprint (devices pin it) and, at a terminal, a first pairing code
    (a pairing code is a credential for a few minutes: not written into a service's log)."""
    lan = server.lan
    print(f"medgemma-edge serve: certificate fingerprint (SHA-256) {lan.fingerprint}", flush=True)
    if sys.stdout.isatty():
        code, ttl = lan.codes.new()
        print(f"medgemma-edge serve: pairing code {code} (single use, {ttl / 60:g} min)", flush=True)
    print(
        f"medgemma-edge serve: pair a device: `medgemma-edge lan pair-code --endpoint-file {endpoint_file}`",
        flush=True,
    )


def _open_page(url: str) -> None:
    import webbrowser

    try:
        opened = webbrowser.open(url)
    except webbrowser.Error:
        opened = False
    if not opened:
        print("medgemma-edge serve: no web browser found; open the web page address yourself", flush=True)


def _serve_lines(settings, args: argparse.Namespace) -> int:
    from android_bridge.bridge import bridge_for
    from android_bridge.transports import UnixSocketServer, serve_stdio

    if args.unix_socket and not hasattr(__import__("socket"), "AF_UNIX"):
        raise UsageError("Unix sockets are not available on this system; use HTTP or --stdio")
    bridge = bridge_for(settings)
    try:
        if args.stdio:
            serve_stdio(bridge)
        else:
            server = UnixSocketServer(
                settings.unix_socket, bridge, max_connections=settings.limits.max_connections
            )
            print(f"medgemma-edge serve: unix socket {settings.unix_socket}", file=sys.stderr, flush=True)
            signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
            try:
                server.serve_forever()
            finally:
                server.server_close()
    finally:
        bridge.shutdown(grace_s=settings.grace_s)
    return 0
