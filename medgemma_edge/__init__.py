"""The ``medgemma-edge`` command line: one module per verb over the library packages.

The only package that imports ``edge``, ``export`` and ``android_bridge`` together, each verb's
module lazily, so a device without torch runs ``ask`` while ``export`` there says which extra
to install.
"""
