"""Evaluation of trained models (docs/method.md, "Evaluation protocol").

- curves.py: error curves ``C(eps)``, median adversarial distance and error at given sizes,
  from per-image adversarial distances.
- stability.py: per-example stability statistics (input-gradient norms of the loss and
  induced norms of the Jacobian of the logits), model in eval mode.
- distance_attacks.py: the attacks of an evaluation (``DistanceAttack``: PGD with a size
  search, DeepFool, CW, Square, AutoAttack), each mapping images to per-image adversarial
  distances.
- checks.py: the gradient-masking self-checks, one function per check.
- evaluate.py: the whole evaluation of a network (also split over data-parallel ranks) and
  its files in the run folder.
- plots.py: figure and CSV of error curves; the one drawing of an error curve.
- loggers.py: an evaluation's numbers to any Lightning logger.
- runner.py: ``Evaluator``, the evaluation as one callable (test set in, files and results
  out).
- callback.py: the Lightning callback that runs it at the end of every training run.
"""
