"""Lost nodes without a cluster: what waits for a node is said and bounded
(pipeline/cluster/placement.py), and which failures restart training by themselves
(pipeline/run/job.py). The real 3-node cluster is in tests/test_cluster_ray.py."""

from __future__ import annotations

import pytest

from pipeline.cluster.placement import PlacementWatch, Waiting, run_parts
from pipeline.config import load_config
from pipeline.run.job import is_node_loss
from tests.conftest import CONFIGS

PINNED = ["generation.resources={bsgal_generate: 0.01}",
          "training.resources_per_worker={bsgal_train: 0.01}", "ray.placement_timeout_s=60"]


class _Remote:
    def __init__(self, sink: list) -> None:
        self.sink = sink

    def remote(self, *args: object) -> None:
        self.sink.append(args)


class FakeBoard:
    def __init__(self) -> None:
        self.stops: list = []
        self.request_stop = _Remote(self.stops)


def test_the_run_s_parts_are_known_by_what_they_ask_for() -> None:
    cfg = load_config(CONFIGS / "demo.yaml", PINNED)
    parts = run_parts(cfg)
    assert parts[(("CPU", 0.25), ("bsgal_generate", 0.01))] == "generation"
    assert parts[(("CPU", 1.0), ("bsgal_train", 0.01))] == "training"
    assert parts[(("CPU", 0.25),)] == "annotation"  # the first part with that unit


def test_a_wait_is_said_after_the_grace_repeated_placed_again_and_timed_out() -> None:
    cfg = load_config(CONFIGS / "demo.yaml", PINNED)
    lines: list[str] = []
    gen = Waiting("generation", 1, 0, (("CPU", 0.25), ("bsgal_generate", 0.01)))
    now: list[list[Waiting]] = [[gen]]
    board = FakeBoard()
    watch = PlacementWatch(cfg, board, lines.append, grace_s=10, repeat_s=30,
                           waiting=lambda: now[0])
    watch.check(now=1000.0)
    watch.check(now=1005.0)
    assert lines == []  # placing takes seconds: nothing said within the grace
    watch.check(now=1010.0)
    assert len(lines) == 1
    assert lines[0].startswith("generation: 0 of 1 actors alive, waiting for a node with "
                               "{CPU: 0.25, bsgal_generate: 0.01} since ")
    assert "ray.placement_timeout_s=60" in lines[0]
    watch.check(now=1020.0)
    assert len(lines) == 1  # not again before repeat_s
    watch.check(now=1040.0)
    assert len(lines) == 2
    now[0] = []  # a node joined
    watch.check(now=1045.0)
    assert lines[-1] == "generation: placed again after 45 s"
    assert watch.timed_out is None and board.stops == []

    # Waiting again, past the timeout: the run is asked to checkpoint and stop, and asked
    # again on every later look (a restarted board forgets).
    now[0] = [gen]
    for t in (2000.0, 2030.0, 2061.0):
        watch.check(now=t)
    assert watch.timed_out is not None
    assert "bsgal_generate" in watch.timed_out and "ray.placement_timeout_s" in watch.timed_out
    assert board.stops == [("placement timeout",)]
    watch.check(now=2062.0)
    assert board.stops == [("placement timeout",)] * 2
    assert watch.history[-1] == {"part": "generation", "seconds": 61.0, "placed": False}


def test_an_unreadable_actor_table_is_said_once_and_never_stops_the_run() -> None:
    cfg = load_config(CONFIGS / "demo.yaml", PINNED)
    lines: list[str] = []

    def broken() -> list[Waiting]:
        raise RuntimeError("the GCS moved")

    watch = PlacementWatch(cfg, FakeBoard(), lines.append, waiting=broken)
    for t in range(5):
        watch.check(now=float(t))
    assert len(lines) == 1 and "cannot read which actors wait" in lines[0]
    assert watch.timed_out is None


def test_node_and_process_losses_restart_but_errors_of_the_code_do_not() -> None:
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    assert is_node_loss(ActorDiedError())
    assert is_node_loss(ActorUnavailableError("connection refused", None))
    assert not is_node_loss(ValueError("image_size must be >= 16 px"))

    class TrainingFailedError(RuntimeError):  # Ray Train's wrapper, as it carries failures
        def __init__(self, failures: dict) -> None:
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    assert is_node_loss(TrainingFailedError({0: ActorDiedError()}))
    assert not is_node_loss(TrainingFailedError({0: KeyError("boxes")}))
    assert is_node_loss(RuntimeError("The actor 05fa is unavailable: The actor is temporarily "
                                     "unavailable: RpcError: failed to connect"))
    wrapped = RuntimeError("worker failed")
    wrapped.__cause__ = ActorDiedError()
    assert is_node_loss(wrapped)


def test_placement_timeout_and_max_failures_are_checked_keys() -> None:
    from pipeline.config import ConfigError

    assert load_config(None).training.max_failures == 3
    assert load_config(None).ray.placement_timeout_s == 600
    with pytest.raises(ConfigError, match="training.max_failures"):
        load_config(None, ["training.max_failures=-2"])
