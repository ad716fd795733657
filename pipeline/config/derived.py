"""Values the config implies: batch sizes the stream works in, and the rows it holds at once."""

from __future__ import annotations

from pipeline.config.sections import RunConfig


def candidate_batch_size(cfg: RunConfig) -> int:
    """Candidates per `train_on_candidates` call (about one or two steps' worth)."""
    t = cfg.training
    return t.candidate_batch_size or t.batch_size * t.max_pastes_per_image


def rows_in_flight(cfg: RunConfig) -> int:
    """The candidates the stream can hold between generation and the trainers at once: every
    stage's batch (a batch waits until it is full) and each trainer's batch in hand and
    prefetched. A read-ahead bound below the stages' batches together stalls the stream."""
    g, a, t = cfg.generation, cfg.annotation, cfg.training
    return (g.batch_size + a.batch_size + a.check_batch_size
            + t.num_workers * candidate_batch_size(cfg) * (t.prefetch_batches + 2))


def min_read_ahead(cfg: RunConfig) -> int:
    """The smallest ``feedback.max_ahead`` that cannot starve a stage: each stage can fill its
    batch and the trainer its candidate batch while the others hold theirs."""
    g, a = cfg.generation, cfg.annotation
    return g.batch_size + a.batch_size + a.check_batch_size + candidate_batch_size(cfg)
