"""``medgemma-edge lan``: manage a running clinic server (``serve --lan``) from its workstation.

``lan pair-code`` makes a pairing code for a new tablet, ``lan devices`` lists the paired
devices, ``lan revoke ID`` unpairs one (its token gets 401 from then on). Each reads the running
server's endpoint file (its URL, the certificate's fingerprint and the launch token, the admin's)
and sends one request over HTTPS pinned to that fingerprint (android_bridge.lan.client).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge.errors import InputError
from medgemma_edge.common import emit_json

MAX_ENDPOINT_BYTES = 64 << 10


def add_lan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lan", help="manage a running clinic server (serve --lan): pairing codes, devices")
    p.add_argument("--endpoint-file", type=Path, help="the server's endpoint file (default: serve's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    what = p.add_subparsers(dest="lan_command", metavar="ACTION", required=True)
    what.add_parser("pair-code", help="a single-use code to pair a new device (valid a few minutes)")
    what.add_parser("devices", help="the paired devices")
    revoke = what.add_parser("revoke", help="unpair a device: its token is refused from now on")
    revoke.add_argument("device_id", help="the device's id (see `lan devices`)")
    p.set_defaults(func=run_lan)


def _endpoint(path: Path | None) -> dict:
    """The running clinic server's endpoint file (bounded read: a FIFO or /dev/zero is refused)."""
    from android_bridge.settings import default_endpoint_file
    from edge.files import FileMissing, read_json

    path = path or default_endpoint_file()
    try:
        info = read_json(path, limit=MAX_ENDPOINT_BYTES, what="endpoint file")
    except FileMissing:
        raise InputError(
            f"no running server's endpoint file at {path}: start `medgemma-edge serve --lan`"
        ) from None
    keys = ("url", "token", "fingerprint")
    if (
        not isinstance(info, dict)
        or not info.get("lan")
        or not all(isinstance(info.get(k), str) for k in keys)
    ):
        raise InputError(f"the server of {path} is not a clinic server: start it with `serve --lan`")
    return info


def run_lan(args: argparse.Namespace) -> int:
    from android_bridge.lan import client

    info = _endpoint(args.endpoint_file)
    op, params = {
        "pair-code": ("lan_pair_code", {}),
        "devices": ("lan_devices", {}),
        "revoke": ("lan_revoke", {"device_id": getattr(args, "device_id", None)}),
    }[args.lan_command]
    try:
        out = client.result(info["url"], info["fingerprint"], info["token"], op, params)
    except OSError as exc:
        raise InputError(
            f"the server at {info['url']} does not answer ({type(exc).__name__}); is it running?"
        ) from None
    if args.json:
        emit_json({"ok": True, **out})
    elif op == "lan_pair_code":
        print(f"pairing code {out['code']} (single use, valid {out['expires_in_s'] / 60:g} min)")
        print(f"server {info['url']}  fingerprint {info['fingerprint']}")
    elif op == "lan_devices":
        for d in out["devices"]:
            print(
                f"{d['device_id']}  {d['name']}  paired {_when(d['created'])}  last seen {_when(d['last_seen'])}"
            )
        if not out["devices"]:
            print("no paired devices")
    else:
        print(f"{out['device_id']}: {'revoked' if out['revoked'] else 'no such device'}")
    return 0 if out.get("revoked", True) else 1


def _when(t: float | None) -> str:
    import time

    return "never" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))
