"""Where a run's results live, local or s3:// (fsspec): the one room every other room may use.

``filesystem`` opens a URI (and says whether it is local, and how to fail fast on S3);
``shards`` writes and reads the decision shards (Parquet, one row per candidate); ``run_dir``
is the run folder (config, metrics, checkpoint files); ``checkpoints`` saves and loads the
trainer's state; ``run_config`` reads a stored run's config back for ``--resume``;
``redaction`` keeps credentials out of what is written or printed.

Modules here import ``pipeline.config`` and each other, nothing else of ``pipeline``.
"""
