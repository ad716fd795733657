"""The names a decision row shares between the run that writes it and the readers.

The stream's stages, the timing column each stage adds to a row, and the cost columns that
the shard schema holds and the inspection tables read: one home, imported by the writer side
(`pipeline.run.graph`, `pipeline.run.costs`, `pipeline.run.window`) and the reader side
(`pipeline.storage.shards`, `pipeline.inspection.costs`), so that neither imports the other.
"""

from __future__ import annotations

#: The Ray Data stages of the candidate stream, in stream order.
STAGES = ("generate", "annotate", "check")
#: A stage's busy seconds per row are in the column ``_seconds_<stage>`` (float32); the shard
#: writer leaves such columns out.
TIMING_PREFIX = "_seconds_"
#: Stages whose device-seconds every decision row records (``cost_<stage>``): the stream's,
#: then the trainer's scoring and training shares.
COST_STAGES = (*STAGES, "score", "train")
#: The trainer's shares of a row (`trainer.loop.CandidatePool.seconds`): (score, train).
TRAINER_SECONDS = {"score": 0, "train": 1}


def timing_column(stage: str) -> str:
    """``_seconds_<stage>``: the stage's busy seconds per row."""
    return f"{TIMING_PREFIX}{stage}"


def cost_column(stage: str) -> str:
    """``cost_<stage>``: the row's device-seconds in ``stage``."""
    return f"cost_{stage}"
