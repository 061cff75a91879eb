"""Everything that serves the edge runtime to an app: the v1 protocol and its transports.

``protocol`` (message shapes), ``bridge`` (``Bridge.handle(request, emit)``, the one core),
``runtime`` (model slots and states), ``transports`` (stdio, Unix socket), ``http`` /
``server`` (loopback HTTP: ``/v1/rpc`` and the OpenAI-compatible routes; needs the ``serve``
extra), and the Java/Kotlin clients under ``java/`` and ``kotlin/``. Importing this package
imports no server stack, no torch and no transformers. PROTOCOL.md is the reference.
"""

from android_bridge.protocol import VERSION as PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
