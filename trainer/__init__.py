"""Training side of bsgal: real data, copy-paste of candidates, detectors, the BSGAL step, the loop.

Read in this order (each module has one job; nothing here imports Ray):

=========================  =====================================================================
`trainer.datasets`          LVIS-format splits (local or s3://) and the built-in long-tailed set
`trainer.sampling`          repeat-factor sampling (LVIS, t = 0.001), class-aware "test" sampler
`trainer.candidates`        incoming candidate batches, their checks (``invalid_*``), decision rows
`trainer.copy_paste`        pasting candidates onto real images (size statistics, occlusion)
`trainer.backends`          detector contract, `SplitLosses`; torchvision (default) and
                            detectron2 Mask R-CNN with real/generated loss split
`trainer.step`              the step interface: PastedBatch → StepResult, the stock backward
`trainer.bsgal_step`        one step: cache update, score, decision, gradients (batch level)
`trainer.instance_step`     one step deciding per candidate: score → decide → train
`trainer.instance_signals`  per-candidate scores by name (contribution, loss)
`trainer.instance_scores`   per-instance losses, exact and directional contribution estimates
`trainer.head_factors`      per-box rank-one gradient factors of the box classifier
`trainer.real_data`         decoded real samples and model inputs
`trainer.rescore`           judging stored candidates at a fixed state (``bsgal rescore``)
`trainer.optim`             AdamW/SGD, warmup + cosine, weight EMA
`trainer.loop`              `DetectorTrainer`: steps, evaluation, state dict for checkpoints
`trainer.defaults`          the run config's training/selection defaults, as trainer/ applies them
`trainer.factory`           `build_trainer` from config-named settings
`trainer.evaluation`        official LVIS evaluation (AP, APr/APc/APf; bbox and segm)
=========================  =====================================================================

Submodules are imported explicitly (``from trainer.loop import DetectorTrainer``) so that
``import trainer.datasets`` stays light (no torchvision).
"""
