"""The loopback HTTP face of the bridge: app, RPC and OpenAI routes, the clinician's page, the server."""
