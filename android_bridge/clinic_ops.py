"""The clinic's ops: received DICOM studies, and the reports clinicians sign.

``list_studies`` / ``get_study`` read the runtime's study store (edge.studies), which the DICOM
node fills; ``preview_image`` shows any image source (a received instance too) as the models see
it. The report ops keep every step of a report in the report store (edge.reports): the AI draft
exactly as generated, the clinician's text, the signature, amendments, exports (DICOM SR, FHIR
R4, PDF) and the outbox that delivers them. Each op's params were checked against
:mod:`android_bridge.params`; unknown studies/reports are ``not_found``, changing a signed
report is ``conflict`` (edge.errors.NotFoundError / ConflictError).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import TYPE_CHECKING, Any

from android_bridge import media
from android_bridge.ops import Outcome
from android_bridge.pictures import preview
from android_bridge.protocol import ProtocolError
from edge import __version__

if TYPE_CHECKING:
    from android_bridge.bridge import Bridge, Context

log = logging.getLogger(__name__)


def _studies(bridge: Bridge) -> Any:
    store = bridge.runtime.studies
    if store is None:
        raise ProtocolError(
            "not_loaded", "this runtime keeps no received studies (start serve with --dicom-port or --data)"
        )
    return store


def _reports(bridge: Bridge) -> Any:
    store = bridge.runtime.reports
    if store is None:
        raise ProtocolError("not_loaded", "this runtime keeps no reports (start serve with --data DIR)")
    return store


def _page(p: dict) -> tuple[int, int]:
    return (p.get("offset") or 0), (50 if p.get("limit") is None else p["limit"])


# -- studies ------------------------------------------------------------------------------------


def op_list_studies(bridge: Bridge, ctx: Context) -> Outcome:
    p = ctx.req.params
    offset, limit = _page(p)
    return Outcome(
        _studies(bridge).list_studies(
            offset=offset,
            limit=limit,
            modality=p.get("modality"),
            date_from=p.get("date_from"),
            date_to=p.get("date_to"),
        )
    )


def op_get_study(bridge: Bridge, ctx: Context) -> Outcome:
    return Outcome(_studies(bridge).get_study(ctx.req.params["study"]))


def op_preview_image(bridge: Bridge, ctx: Context) -> Outcome:
    image = ctx.budget.load(media.one_image(ctx.req.params), allow_paths=bridge.allow_paths)
    return Outcome(preview(image))


# -- reports ------------------------------------------------------------------------------------


def provenance(bridge: Bridge) -> dict:
    """Which model drafted a report: the loaded MedGemma, else the bundle's manifest."""
    info = getattr(bridge.runtime.slots["medgemma"].model, "info", None)
    if not isinstance(info, dict):
        info = {}
        try:
            bundle = bridge.runtime._bundle("medgemma")
            comp = bundle.component("medgemma") if bundle is not None else {}
            source = comp.get("source", {})
            info = {
                "bundle": str(bundle.root) if bundle else None,
                "source": source.get("description") or source.get("model_id"),
                "synthetic": bool(source.get("synthetic")),
            }
        except Exception:  # no bundle, or a broken one: the report still records the runtime
            info = {}
    return {
        "model": info.get("source") or "none (this runtime has no MedGemma bundle)",
        "bundle": info.get("bundle"),
        "text_file": info.get("text"),
        "quantization": info.get("quant"),
        "image_encoder": info.get("image_encoder"),
        "synthetic": bool(info.get("synthetic")),
        "runtime_version": __version__,
    }


def _source(bridge: Bridge, p: dict) -> dict:
    """The report's source: ``{"study", "instance"?}`` (a received instance, which must exist)
    or ``{"image_sha256"}`` (an uploaded image, identified by its hash only)."""
    src = p.get("source") or {}
    study = src.get("study_uid") or src.get("study")
    if study is not None:
        instance = src.get("instance_uid") or src.get("instance")
        store = _studies(bridge)
        found = store.get_study(study)
        if instance is None:
            instance = media.first_displayable(found)
        series = next(
            (
                s["series_uid"]
                for s in found.get("series", [])
                if any(i["sop_instance_uid"] == instance for i in s.get("instances", []))
            ),
            None,
        )
        if series is None:
            store.instance_path(study, instance)  # NotFoundError naming the instance
        out = {"study_uid": study, "series_uid": series, "instance_uid": instance}
        if isinstance(src.get("frame"), int) and not isinstance(src.get("frame"), bool):
            out["frame"] = src["frame"]
        return out
    sha = src.get("image_sha256")
    if isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha):
        return {"image_sha256": sha}
    raise ProtocolError(
        "invalid_request",
        "source must name a received study ({'study_uid', 'instance_uid'}) or an image ({'image_sha256': 64 hex})",
    )


def op_save_report(bridge: Bridge, ctx: Context) -> Outcome:
    p = ctx.req.params
    store = _reports(bridge)
    source = _source(bridge, p) if p.get("report_id") is None or p.get("source") else None
    report = store.save(
        report_id=p.get("report_id"),
        draft=p.get("draft"),
        final=p["final"],
        source=source,
        provenance=provenance(bridge),
    )
    return Outcome(report)


def op_sign_report(bridge: Bridge, ctx: Context) -> Outcome:
    p = ctx.req.params
    return Outcome(
        _reports(bridge).sign(p["report_id"], version=p["version"], signer=p["signer"], role=p["role"])
    )


def op_amend_report(bridge: Bridge, ctx: Context) -> Outcome:
    p = ctx.req.params
    return Outcome(_reports(bridge).amend(p["report_id"], final=p["final"], reason=p["reason"]))


def op_list_reports(bridge: Bridge, ctx: Context) -> Outcome:
    p = ctx.req.params
    offset, limit = _page(p)
    return Outcome(
        _reports(bridge).list(
            study_uid=p.get("study"),
            image_sha256=p.get("image_sha256"),
            status=p.get("status"),
            offset=offset,
            limit=limit,
        )
    )


def op_get_report(bridge: Bridge, ctx: Context) -> Outcome:
    p = ctx.req.params
    store = _reports(bridge)
    report = store.get(p["report_id"], p.get("version"))
    return Outcome({**report, "audit": store.audit(p["report_id"])})


def op_export_report(bridge: Bridge, ctx: Context) -> Outcome:
    from edge.reports.exports import export_report

    p = ctx.req.params
    store = _reports(bridge)
    image = None
    if p.get("image") is not None:  # the uploaded image, for the PDF's thumbnail: it must be the report's
        sha = store.get(p["report_id"], p.get("version"))["source"].get("image_sha256")
        if hashlib.sha256(media.source_bytes(p["image"])).hexdigest() != sha:
            raise ProtocolError("invalid_request", "image is not the one this report was written about")
        image = ctx.budget.load(p["image"], allow_paths=False)
    delivery = bridge.runtime.delivery
    out = export_report(
        store,
        p["report_id"],
        p["format"],
        version=p.get("version"),
        studies=bridge.runtime.studies,
        image=image,
        organization=getattr(delivery, "organization", "—"),
        institution=getattr(delivery, "institution", None),
    )
    return Outcome(
        {
            "format": out.format,
            "mime": out.mime,
            "filename": out.filename,
            "bytes": len(out.data),
            "base64": base64.b64encode(out.data).decode("ascii"),
        }
    )


def _outbox(bridge: Bridge) -> Any:
    from edge.reports.outbox import Outbox

    return Outbox(_reports(bridge))


def op_send_report(bridge: Bridge, ctx: Context) -> Outcome:
    p = ctx.req.params
    destination = p.get("destination")
    if destination is None:
        from android_bridge.delivery import DeliverySettings

        destination = (bridge.runtime.delivery or DeliverySettings()).destination()  # UsageError: none set
    report = _reports(bridge).get(p["report_id"], p.get("version"))
    item = _outbox(bridge).queue(report["report_id"], report["version"], destination)
    wake = getattr(bridge, "deliverer", None)
    if wake is not None:
        wake.wake()
    return Outcome(item)


def op_outbox(bridge: Bridge, ctx: Context) -> Outcome:
    return Outcome({"items": _outbox(bridge).list()})


HANDLERS = {
    "list_studies": op_list_studies,
    "get_study": op_get_study,
    "preview_image": op_preview_image,
    "save_report": op_save_report,
    "sign_report": op_sign_report,
    "amend_report": op_amend_report,
    "list_reports": op_list_reports,
    "get_report": op_get_report,
    "export_report": op_export_report,
    "send_report": op_send_report,
    "outbox": op_outbox,
}
