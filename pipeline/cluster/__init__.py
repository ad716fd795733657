"""Reaching Ray and sending work to a cluster.

``connect`` reaches a local Ray or an existing cluster for ``bsgal run``; ``capacity`` reads
what a cluster offers (live nodes, a launcher YAML, an autoscaler's maximum) and checks the
job's demand (:mod:`pipeline.demand`) against it; ``job_client`` talks to the Ray Job server;
``submit`` packages a run as a Ray Job; ``commands`` holds ``bsgal submit`` and
``bsgal job status|logs|stop|list``. ``nodes`` knows the connected cluster's nodes: what they
offer, which can hold a train worker, whether they see the driver's ``output.dir``, and which
left; ``placement`` watches what of a running job waits for a node, says it and bounds it.

Modules here import ``pipeline.config``, ``pipeline.paths``, ``pipeline.demand``,
``pipeline.errors``, ``pipeline.command_line`` and ``pipeline.storage``, not the other rooms.
"""
