"""Progress bars for long work (hashing, export, quantization, indexing), on stderr.

Library functions take a plain ``progress(done, total)`` callback; the CLI turns it into a
tqdm bar here. Nothing in the library prints.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

Progress = Callable[[int, int], None]


@contextlib.contextmanager
def bar(desc: str, *, unit: str = "B", enabled: bool = True) -> Iterator[Progress]:
    """Yield a ``progress(done, total)`` callback drawing one tqdm bar (bytes by default).

    The bar is drawn only when stderr is a terminal, so logs and tests stay one line per error.
    """
    if not enabled:
        yield lambda done, total: None
        return
    from tqdm import tqdm

    scale = unit == "B"
    with tqdm(
        desc=desc,
        unit=unit,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        disable=None,
    ) as t:

        def update(done: int, total: int) -> None:
            if t.total != total:
                t.total = total
            t.update(done - t.n)

        yield update
