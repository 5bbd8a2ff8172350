# Copyright (c) fairseq_dp contributors. MIT license.
"""Empirical privacy audit of one training run (``fairseq-dp-audit``).

- :mod:`.statistics`: the p-value of Steinke, Nasr and Jagielski (2023) and
  the ε lower bound it gives, with the guess sizes corrected for.
- :mod:`.canaries`: the audit's data directory, the user's with canaries added.
- :mod:`.scoring`: each canary's score under the trained model.
- :mod:`.run`: the command: canaries, training, scores, bound, report.
"""
