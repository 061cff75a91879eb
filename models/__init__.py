"""The model registry's data, installed inside the wheel as the package ``edge.models``
(see pyproject.toml) and read by :mod:`edge.bundle.registry` through importlib.resources."""
