"""Adversarial training, one job per module (``core.train`` is the entry point and re-exports the public names):

* :mod:`.config`  -- :class:`TrainConfig`: every setting, its default, help text and check;
* :mod:`.data`    -- the training / held-out splits and the learning-rate schedule;
* :mod:`.step`    -- one optimisation step (attack, loss, backward, all-reduce, out-of-memory fallback);
* :mod:`.measure` -- the per-epoch evaluation and energy probe;
* :mod:`.loop`    -- ``train()``: setup, resume, epoch, evaluate, probe, record, checkpoint.
"""
