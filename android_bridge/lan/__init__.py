"""Clinic-server mode (``serve --lan``): one workstation serving the clinic's tablets over its LAN.

Never the default; the loopback server is unchanged without it. What it adds, one module each:

* :mod:`.tls` — the self-signed certificate (ECDSA P-256) made on first start and kept in
  ``<data_dir>/lan/tls``; devices pin its SHA-256 fingerprint.
* :mod:`.pairing` — short-lived single-use pairing codes, exchanged once (``POST /v1/pair``) for
  a device's own token, stored hashed in ``<data_dir>/lan/devices.json``; listed and revoked.
* :mod:`.queue` — a fair FIFO queue for MedGemma with ``queued`` events, cancel while queued.
* :mod:`.limits` — per-device token-bucket rate limits and the audit log (no content).
* :mod:`.mode` — :class:`~.mode.LanMode`, the above together, hung on the bridge as ``bridge.lan``.
* :mod:`.ops` — the admin ops ``lan_pair_code``, ``lan_devices``, ``lan_revoke``.
* :mod:`.http` — the pairing route and the audit middleware.
* :mod:`.client` — a Python client pinned to the fingerprint (the ``medgemma-edge lan`` CLI).

docs/CLINIC_SERVER.md tells an administrator how to run it; docs/THREAT_MODEL.md what it guards.
"""
