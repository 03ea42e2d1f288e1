"""Recipes behind the ``deft`` command: train one run, compare PEFT vs DEFT over seeds, measure a model,
price its energy, skip silent blocks, prune, sweep, tune, report.

Each is a plain function over a typed dataclass of arguments (the CLI builds it from flags and config
files: :mod:`deft.cli`) and writes everything it produces under ``output``: ``results.json``, plots, the
trained adapter. Results are written atomically, and a run folder with checkpoints resumes with
``resume=True``. One module per command (:mod:`~deft.recipes.train`, :mod:`~deft.recipes.compare`,
:mod:`~deft.recipes.measure` (measure and energy), :mod:`~deft.recipes.skip`, :mod:`~deft.recipes.compress`
(prune), :mod:`~deft.recipes.sweep`, :mod:`~deft.recipes.tune`, :mod:`~deft.recipes.report`), plus what they
share (:mod:`~deft.recipes.common`, :mod:`~deft.recipes.evaluate`).

The library (everything outside ``deft.recipes`` and ``deft.cli``) never imports a recipe.
"""
