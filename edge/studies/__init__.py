"""Received DICOM studies: a content-addressed store on this device and its SQLite catalogue."""
