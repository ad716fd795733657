"""One run of the streaming job, from the driver to the train workers.

``job`` is the entry (``run_job``/``resume_job``: checks, Ray, the graph into a Ray Train
trainer, the summary); ``graph`` builds the Ray Data stages (generate → annotate → check);
``train_data_config`` holds the Ray Train ``DataConfig`` that streams the candidates to the
workers; ``feed`` reads a worker's dataset shard into candidate batches; ``train_worker`` is
the per-worker loop (train, judge, write decision rows, checkpoint); ``window`` and
``progress`` count and show what the run did; ``datasets`` opens the real data; ``demo``
builds ``bsgal demo``'s config.

Modules here import ``pipeline.config``, ``pipeline.paths``, ``pipeline.demand``,
``pipeline.errors`` and ``pipeline.storage``; only ``job`` (the entry) reaches the other rooms.
"""
