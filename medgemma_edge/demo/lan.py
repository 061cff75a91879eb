"""Demo step: the clinic server (``serve --lan``) on loopback, with a tablet pairing over TLS."""

from __future__ import annotations

import shutil
import time
from pathlib import Path


def demo_lan(root: Path, bundle: Path) -> dict:
    """Start ``serve -b BUNDLE --lan`` on 127.0.0.1 (port 0), pair a device with a code, call
    ``health`` with its token over pinned TLS, show a wrong pin and a revoked token refused."""
    from android_bridge.http.server import RunningServer
    from android_bridge.lan import client
    from android_bridge.settings import LanSettings, ServeSettings
    from edge.errors import EdgeError

    base = root / "lan"
    shutil.rmtree(base, ignore_errors=True)
    settings = ServeSettings(
        bundle=bundle, host="127.0.0.1", data_dir=base / "data", lan=LanSettings(), preload=()
    )
    t0 = time.perf_counter()
    server = RunningServer(settings, log_level="warning").start()
    try:
        start_s = time.perf_counter() - t0
        url, fp = server.url, server.fingerprint
        code = client.result(url, fp, server.token, "lan_pair_code", {})["code"]
        paired = client.pair(url, fp, code, "demo tablet")
        health = client.result(url, fp, paired["token"], "health", {})
        try:
            client.result(url, "0" * 64, paired["token"], "health", {})
            wrong_pin = "accepted (unexpected)"
        except (EdgeError, OSError) as exc:  # the pinned client refuses before sending anything
            wrong_pin = f"refused ({type(exc).__name__})"
        try:
            client.pair(url, fp, code, "second tablet")
            replay = "accepted (unexpected)"
        except client.ServerError as exc:
            replay = f"refused (HTTP {exc.status} {exc.code})"
        revoked = client.result(url, fp, server.token, "lan_revoke", {"device_id": paired["device_id"]})
        try:
            client.result(url, fp, paired["token"], "health", {})
            after = "accepted (unexpected)"
        except client.ServerError as exc:
            after = f"refused (HTTP {exc.status} {exc.code})"
        return {
            "url": url,
            "fingerprint": fp,
            "start_s": start_s,
            "device_id": paired["device_id"],
            "health_ok": bool(health),
            "wrong_pin": wrong_pin,
            "replay": replay,
            "revoked": bool(revoked.get("revoked")),
            "after_revoke": after,
        }
    finally:
        server.stop()
        server.join(10)
