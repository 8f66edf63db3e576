"""Evaluation of trained models (METHOD.md "Evaluation protocol").

- curves.py: error curves ``C(eps)``, median adversarial distance and error at given sizes,
  from per-image adversarial distances.
- stability.py: per-example stability statistics (input-gradient norms of the loss and
  induced norms of the Jacobian of the logits), model in eval mode.
- plots.py: figure and CSV of error curves.
- attacks.py: the attacks of an evaluation (PGD with a size search, DeepFool, CW, Square,
  AutoAttack), each mapping images to per-image adversarial distances.
- evaluate.py: the whole evaluation of a network (also split over data-parallel ranks).
- callback.py: the Lightning callback that runs it at the end of every training run.
"""
