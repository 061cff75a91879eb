"""The catalogue's queries, as the study store's read methods (list, get, paths, newest, counts).

:class:`CatalogueReads` is the read half of :class:`edge.studies.store.StudyStore` (the write
half, with the files and their order of writing, is there); it relies on the store's
``_db()`` (the connection under its lock), ``object_path()`` and ``root``.
"""

from __future__ import annotations

from pathlib import Path

from edge.errors import InputError, NotFoundError, UsageError
from edge.studies import catalogue as cat
from edge.studies.instance import uid_hash

MAX_PAGE = 200


class CatalogueReads:
    """Read methods of the study store (see :class:`edge.studies.store.StudyStore`)."""

    def list_studies(
        self,
        *,
        offset: int = 0,
        limit: int = 50,
        modality: str | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
    ) -> dict:
        """Studies, newest received first, paged; filtered by a series' modality and the study date.

        Args:
            date_from, date_to: ``YYYY-MM-DD`` (or ``YYYYMMDD``), inclusive; studies without a
                date are left out when either is given.
        Returns:
            ``{"studies": [STUDY...], "total": N, "offset": offset, "limit": limit}``.
        Raises:
            UsageError: offset < 0, limit outside 1..200, a date that is not a date.
        """
        from edge.studies.instance import iso_date

        _whole("offset", offset, 0)
        _whole("limit", limit, 1, MAX_PAGE)
        where, params = [], []
        if modality:
            where.append(
                "EXISTS (SELECT 1 FROM series s WHERE s.study_uid = studies.study_uid AND s.modality = ?)"
            )
            params.append(str(modality).strip().upper())
        for name, value, op in (("date_from", date_from, ">="), ("date_to", date_to, "<=")):
            if value:
                iso = iso_date(str(value))
                if iso is None:
                    raise UsageError(f"{name} must be a date YYYY-MM-DD (got {value!r})")
                where.append(f"study_date {op} ?")
                params.append(iso)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        with self._db() as c:
            total = c.execute(f"SELECT COUNT(*) FROM studies{clause}", params).fetchone()[0]
            rows = c.execute(
                f"SELECT {cat.STUDY_COLUMNS} FROM studies{clause} ORDER BY last_seq DESC LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
            stats = cat.study_stats(c, [r[0] for r in rows])
        return {
            "studies": [cat.study_json(r, stats[r[0]]) for r in rows],
            "total": total,
            "offset": offset,
            "limit": limit,
        }

    def get_study(self, study_uid: str) -> dict:
        """STUDY with ``"series": [SERIES + "instances": [INSTANCE...]]`` (by number, then arrival).

        Raises:
            NotFoundError: no such study.
        """
        with self._db() as c:
            row = c.execute(
                f"SELECT {cat.STUDY_COLUMNS} FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            if row is None:
                raise _no_study(study_uid)
            stats = cat.study_stats(c, [study_uid])[study_uid]
            series = c.execute(
                "SELECT series_uid, modality, body_part, number, description FROM series WHERE study_uid = ? "
                "ORDER BY number IS NULL, number, series_uid",
                (study_uid,),
            ).fetchall()
            inst = c.execute(
                f"SELECT {cat.INSTANCE_COLUMNS} FROM instances WHERE study_uid = ? "
                "ORDER BY number IS NULL, number, seq",
                (study_uid,),
            ).fetchall()
        by_series: dict[str, list] = {}
        for r in inst:
            by_series.setdefault(r[-1], []).append(cat.instance_json(r))
        out = cat.study_json(row, stats)
        out["series"] = [
            {
                "series_uid": s[0],
                "modality": s[1],
                "body_part": s[2],
                "number": s[3],
                "description": s[4],
                "instances": by_series.get(s[0], []),
            }
            for s in series
            if s[0] in by_series
        ]
        return out

    def instance_info(self, study_uid: str, instance_uid: str) -> dict:
        """INSTANCE of one catalogued instance. Raises NotFoundError when the study lacks it."""
        with self._db() as c:
            row = c.execute(
                f"SELECT {cat.INSTANCE_COLUMNS} FROM instances WHERE study_uid = ? AND sop_instance_uid = ?",
                (study_uid, instance_uid),
            ).fetchone()
        if row is None:
            raise _no_instance(study_uid, instance_uid)
        return cat.instance_json(row)

    def instance_path(self, study_uid: str, instance_uid: str) -> Path:
        """The file of one catalogued instance.

        Raises:
            NotFoundError: the study has no such instance.
            InputError: it is catalogued but its file is gone (``medgemma-edge dicom check``).
        """
        path = self.object_path(self.instance_info(study_uid, instance_uid)["sha256"])
        if not path.is_file():
            raise InputError(
                f"the file of instance {uid_hash(instance_uid)} is missing from {self.root}; "
                f"run `medgemma-edge dicom check --data {self.root.parent}` and send the study again"
            )
        return path

    def first_displayable(self, study_uid: str) -> str | None:
        """The SOP Instance UID a study opens on (its first displayable instance); None when it
        has none. Raises NotFoundError when there is no such study."""
        with self._db() as c:
            if c.execute("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)).fetchone() is None:
                raise _no_study(study_uid)
            row = c.execute(
                "SELECT i.sop_instance_uid FROM instances i LEFT JOIN series s ON s.series_uid = i.series_uid "
                "WHERE i.study_uid = ? AND i.displayable = 1 "
                "ORDER BY s.number IS NULL, s.number, i.number IS NULL, i.number, i.seq LIMIT 1",
                (study_uid,),
            ).fetchone()
        return row[0] if row else None

    def newest(self) -> tuple[str, str] | None:
        """``(study_uid, sop_instance_uid)`` of the newest displayable instance; None if none."""
        with self._db() as c:
            row = c.execute(
                "SELECT study_uid, sop_instance_uid FROM instances WHERE displayable = 1 ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        return (row[0], row[1]) if row else None

    def counts(self) -> dict:
        """``{"studies", "series", "instances", "bytes"}`` in the catalogue."""
        with self._db() as c:
            n_st = c.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
            n_se = c.execute("SELECT COUNT(*) FROM series").fetchone()[0]
            n, size = c.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM instances").fetchone()
        return {"studies": n_st, "series": n_se, "instances": n, "bytes": size}


def _whole(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        within = f"at least {lo}" if hi is None else f"from {lo} to {hi}"
        raise UsageError(f"{name} must be a whole number {within} (got {value!r})")


def _no_study(uid: str) -> NotFoundError:
    return NotFoundError(
        f"no such study in the store (study UID hash {uid_hash(uid)}); see `medgemma-edge dicom list` "
        "or the list_studies op"
    )


def _no_instance(study_uid: str, uid: str) -> NotFoundError:
    return NotFoundError(
        f"the study (UID hash {uid_hash(study_uid)}) has no instance with UID hash {uid_hash(uid)}; "
        "see get_study for its instances"
    )
