"""Similar prior cases: the index (brute-force cosine in SQLite + numpy), ingest, export/import."""
