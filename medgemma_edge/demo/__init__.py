"""``medgemma-edge demo``: the whole product once, offline, on tiny twins and the real Gemma 3 270M."""
