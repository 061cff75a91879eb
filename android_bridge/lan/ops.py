"""The clinic server's admin ops: ``lan_pair_code``, ``lan_devices``, ``lan_revoke``.

Only the launch token (the local admin: the endpoint file's token, which the local page and
``medgemma-edge lan`` use) may run them; the bridge refuses them to a paired device with
``forbidden`` before they run (android_bridge.bridge.ADMIN_OPS). Outside LAN mode they answer
``invalid_request``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from android_bridge.ops import Outcome
from android_bridge.protocol import ProtocolError

if TYPE_CHECKING:
    from android_bridge.bridge import Bridge, Context
    from android_bridge.lan.mode import LanMode


def _lan(bridge: Bridge) -> LanMode:
    lan = getattr(bridge, "lan", None)
    if lan is None:
        raise ProtocolError("invalid_request", "this server is not in LAN mode (serve --lan)")
    return lan


def op_lan_pair_code(bridge: Bridge, ctx: Context) -> Outcome:
    code, ttl = _lan(bridge).codes.new()
    return Outcome({"code": code, "expires_in_s": ttl})


def op_lan_devices(bridge: Bridge, ctx: Context) -> Outcome:
    return Outcome({"devices": _lan(bridge).devices.list()})


def op_lan_revoke(bridge: Bridge, ctx: Context) -> Outcome:
    device_id = ctx.req.params["device_id"]  # a string: android_bridge.params
    return Outcome({"device_id": device_id, "revoked": _lan(bridge).revoke(device_id)})


HANDLERS = {
    "lan_pair_code": op_lan_pair_code,
    "lan_devices": op_lan_devices,
    "lan_revoke": op_lan_revoke,
}
