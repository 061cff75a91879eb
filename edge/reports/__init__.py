"""Clinician-signed reports: the store (drafts, signed versions, amendments, audit log), their
exports (DICOM SR, FHIR R4, PDF) and the outbox that delivers them on the clinic network."""
