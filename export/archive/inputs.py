"""What an archive run indexes: image files and folders, CSV manifests, a study store.

Each source given to :func:`list_inputs` is one of

* a folder: every regular file under it (recursive, sorted, hidden names left out);
* a ``.csv`` file: a manifest with a header row; the column ``path`` (or ``file``, ``source``,
  ``image``) names each image (relative paths are taken from the CSV's folder), every other
  column with a value becomes that image's metadata (``modality=CR``, ``finding=...``);
* a study store (a folder holding ``catalogue.sqlite``, :mod:`edge.studies.store`): every
  displayable instance, with its modality, body part, study date and UIDs as metadata;
* any other file: that image.

The same file named twice is listed once (the first naming wins, with its metadata). Paths are
made absolute: on a Ray cluster every worker must see them at the same path (a shared mount).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from edge.errors import InputError
from edge.files import check_regular, read_text, walk_files

log = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "file", "source", "image")
MAX_CSV_BYTES = 1 << 30
_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
CATALOGUE = "catalogue.sqlite"


@dataclass(frozen=True)
class Item:
    """One image to index: its absolute path and the metadata stored with its case."""

    source: str
    meta: dict[str, str] = field(default_factory=dict)


def list_inputs(sources, *, skipped: list[tuple[str, str]] | None = None) -> list[Item]:
    """The images named by ``sources`` (folders, files, CSV manifests, study stores), in order.

    Raises:
        InputError: a source does not exist, a CSV without a path column or with a bad column name.
    """
    items: dict[str, Item] = {}

    def add(item: Item) -> None:
        if item.source not in items:
            items[item.source] = item

    for src in sources:
        p = Path(src)
        if p.is_dir() and (p / CATALOGUE).is_file():
            for it in _study_store(p, skipped):
                add(it)
        elif p.is_dir():
            for f in walk_files(p, skipped=skipped):
                add(Item(str(f.resolve())))
        elif not os.path.lexists(p):
            raise InputError(
                f"{p} does not exist (give image folders, files, a CSV manifest or a study store)"
            )
        elif p.suffix.lower() == ".csv":
            for it in _csv(p, skipped):
                add(it)
        else:
            check_regular(p, "image")
            add(Item(str(p.resolve())))
    log.info("archive: %d inputs listed", len(items))
    return list(items.values())


def _csv(path: Path, skipped: list | None) -> list[Item]:
    text = read_text(path, limit=MAX_CSV_BYTES, what="CSV manifest")
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in reader.fieldnames or []]
    pick = next((c for c in PATH_COLUMNS if c in cols), None)
    if pick is None:
        raise InputError(
            f"{path}: a CSV manifest needs a column named one of {', '.join(PATH_COLUMNS)} (it has: "
            f"{', '.join(cols) or 'no header'})"
        )
    bad = [c for c in cols if c != pick and not _KEY.match(c)]
    if bad:
        raise InputError(f"{path}: column names must be letters, digits or _.:- (up to 64): {', '.join(bad)}")
    reader.fieldnames = cols
    out = []
    for n, row in enumerate(reader, start=2):
        name = (row.get(pick) or "").strip()
        if not name:
            if skipped is not None:
                skipped.append((f"{path}:{n}", "no path in this row"))
            continue
        f = Path(name) if Path(name).is_absolute() else path.parent / name
        meta = {
            k: str(v).strip() for k, v in row.items() if k != pick and k and v is not None and str(v).strip()
        }
        out.append(Item(str(f.resolve()), meta))
    return out


def _study_store(root: Path, skipped: list | None) -> list[Item]:
    """Every displayable instance of the study store at ``root`` (edge.studies.store)."""
    try:
        from edge.studies.store import StudyStore
    except ImportError:
        raise InputError(f"{root} looks like a study store, but this build has no edge.studies") from None
    store = StudyStore(root)
    out = []
    try:
        offset = 0
        while True:
            page = store.list_studies(offset=offset, limit=200)
            for st in page["studies"]:
                study = store.get_study(st["study_uid"])
                for series in study.get("series", []):
                    for inst in series.get("instances", []):
                        if not inst.get("displayable"):
                            if skipped is not None:
                                skipped.append(
                                    ("study store instance", inst.get("why_not") or "not displayable")
                                )
                            continue
                        path = store.instance_path(st["study_uid"], inst["sop_instance_uid"])
                        meta = {
                            "modality": series.get("modality"),
                            "body_part": series.get("body_part"),
                            "study_date": st.get("study_date"),
                            "study_uid": st["study_uid"],
                            "series_uid": series.get("series_uid"),
                            "instance_uid": inst["sop_instance_uid"],
                        }
                        out.append(Item(str(Path(path).resolve()), {k: str(v) for k, v in meta.items() if v}))
            offset += len(page["studies"])
            if not page["studies"] or offset >= page["total"]:
                break
    finally:
        store.close()
    return out
