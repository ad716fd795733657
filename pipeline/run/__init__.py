"""One run of the streaming job, from the driver to the train workers.

``job`` is the entry (``run_job``/``resume_job``: checks, Ray, the graph into a Ray Train
trainer, the summary); ``graph`` builds the Ray Data stages (generate → annotate → check);
``train_data_config`` holds the Ray Train ``DataConfig`` that streams the candidates to the
workers; ``feed`` reads a worker's dataset shard into candidate batches; ``train_worker`` is
the per-worker loop (train, judge, write decision rows, checkpoint); ``window`` and
``progress`` count and show what the run did; ``rows`` builds a decision row (the one
builder, for the workers and for rescoring); ``costs`` gives each row its device-seconds;
``steering`` is the closed loop's demand actor; ``pool_source`` / ``pool_stage`` /
``pool_entries`` are a pool as the source; ``rescore`` / ``rescore_stage`` are
``bsgal rescore``; ``preflight`` the up-front checks; ``datasets`` opens the real data;
``demo`` builds ``bsgal demo``'s config.

Modules here import ``pipeline.config``, ``pipeline.paths``, ``pipeline.demand``,
``pipeline.errors`` and ``pipeline.storage``; only ``job`` (the entry) reaches the other rooms.
"""
