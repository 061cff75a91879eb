"""Index a hospital archive on Ray Data into Parquet shards tied to one MedSigLIP encoder.

```
inputs.py     what to index: folders, a CSV manifest with metadata columns, a study store
pipeline.py   the Ray Data job: read + preprocess in tasks, embed in an actor pool, write shards
shards.py     the archive directory: Parquet shards, manifest.json, resume, fingerprint check
load.py       ``index import-archive``: shards -> a device's case index (+ its ANN graph)
```

Workstation side only (the ``archive`` extra: ray[data], pyarrow); the device reads what
:func:`export.archive.load.import_archive` wrote into an ordinary :class:`edge.cases.CaseIndex`.
"""
