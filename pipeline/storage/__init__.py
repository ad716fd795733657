"""Where a run's results live, local or s3:// (fsspec): the one room every other room may use.

``filesystem`` opens a URI (and says whether it is local, and how to fail fast on S3);
``row_names`` holds the names a decision row shares between its writer and its readers
(stages, timing and cost columns); the decision shards (Parquet, one row per candidate) are
``shard_schema`` (schema, layout, row encoding), ``shard_writer`` (the background writer, the
write probe) and ``shards`` (listing, resume clean-up, reading); ``pool_index`` reads an
instance pool's index (its formats in one table); ``run_dir`` is the run folder (config,
metrics, checkpoint files, and its life cycle: a fresh output, a failed start removed);
``checkpoints`` saves and loads the trainer's state; ``run_config`` reads a stored run's config
back for ``--resume``; ``redaction`` keeps credentials out of what is written or printed.

Modules here import ``pipeline.config``, ``pipeline.errors`` and each other, nothing else of
``pipeline``.
"""
