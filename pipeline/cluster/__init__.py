"""Reaching Ray and sending work to a cluster.

``connect`` reaches a local Ray or an existing cluster for ``bsgal run``; ``capacity`` reads
what a cluster offers (live nodes, a launcher YAML, an autoscaler's maximum) and checks the
job's demand (:mod:`pipeline.demand`) against it; ``job_client`` talks to the Ray Job server;
``submit`` packages a run as a Ray Job; ``commands`` holds ``bsgal submit`` and
``bsgal job status|logs|stop|list``.

Modules here import ``pipeline.config``, ``pipeline.paths``, ``pipeline.demand``,
``pipeline.errors``, ``pipeline.command_line`` and ``pipeline.storage``, not the other rooms.
"""
