"""``index import-archive DIR``: the shards of an archive run into a similar-case index.

The archive's manifest must name the same encoder fingerprint as the bundle the index is (or
will be) searched with; every shard is checked against its manifest size and sha256 first. Rows
go in through :meth:`edge.cases.index.CaseIndex.insert_batch` (one transaction per 4096 rows;
a content hash already in the index is skipped), so an import that is killed or run twice adds
each case once. Afterwards :func:`edge.cases.ann.ensure` builds the ANN graph when the index is
past the threshold (or folds the new cases into an existing one).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.cases import ann
from edge.cases.index import CaseIndex
from edge.errors import require
from export.archive.shards import Archive

log = logging.getLogger(__name__)

ROWS_PER_TRANSACTION = 4096


@dataclass
class ImportReport:
    """What one :func:`import_archive` did."""

    index: str
    archive: str
    shards: int = 0
    rows: int = 0  # rows in the archive
    added: int = 0
    already: int = 0  # their content hash was in the index
    total: int = 0  # cases in the index afterwards
    ann: dict | None = None  # the ANN graph in force afterwards (None: exact search)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(vars(self))


def import_archive(
    archive: str | os.PathLike,
    index: str | os.PathLike,
    *,
    encoder,
    ann_min_cases: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Add every row of the archive at ``archive`` to the index at ``index`` (created if absent).

    Args:
        encoder: the :class:`edge.medsiglip.model.MedSigLIP` the device searches with; the
            archive and the index must both be its.
        ann_min_cases: build the ANN from this many cases (default: the index's threshold).
        progress: ``progress(rows done, rows total)`` after each transaction.
    Raises:
        InputError: not an archive, a damaged shard, another encoder's archive or index.
    """
    pq = require("pyarrow.parquet", "archive")
    t0 = time.perf_counter()
    arch = Archive.open(archive)
    arch.check_encoding(encoder.fingerprint, what="this bundle")
    arch.verify()
    rep = ImportReport(
        str(index), str(archive), shards=len(arch.manifest["shards"]), rows=arch.manifest["cases"]
    )
    with CaseIndex.open(index, encoder=encoder, create=True) as idx:
        if ann_min_cases is not None:
            idx.ann_min_cases = ann_min_cases
        idx.check()
        done = 0
        for path in arch.shard_paths():
            for rb in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_TRANSACTION):
                cols = rb.to_pydict()
                emb = np.asarray(
                    rb.column("embedding").flatten().to_numpy(zero_copy_only=False), dtype=np.float32
                ).reshape(rb.num_rows, arch.dim)
                rows = [
                    {
                        "hash": cols["hash"][i],
                        "source": cols["source"][i],
                        "stored": None,
                        "format": cols["format"][i] or "unknown",
                        "size": (cols["width"][i] or 0, cols["height"][i] or 0),
                        "facts": dict(cols["metadata"][i] or []),
                    }
                    for i in range(rb.num_rows)
                ]
                added = idx.insert_batch(rows, emb, meta={})
                rep.added += added
                rep.already += rb.num_rows - added
                done += rb.num_rows
                if progress:
                    progress(done, rep.rows)
        st = ann.ensure(idx)
        rep.ann = st.to_json() if st else None
        rep.total = idx.count()
    rep.seconds = time.perf_counter() - t0
    log.info(
        "import-archive %s: %d of %d rows added (%d already there) in %.1fs; index has %d cases",
        *(Path(archive).name, rep.added, rep.rows, rep.already, rep.seconds, rep.total),
    )
    return rep
