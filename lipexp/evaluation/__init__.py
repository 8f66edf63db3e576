"""Evaluation of trained models (docs/method.md, "Evaluation protocol").

- curves.py: error curves ``C(eps)``, median adversarial distance and error at given sizes,
  from per-image adversarial distances.
- stability.py: per-example stability statistics (input-gradient norms of the loss and
  induced norms of the Jacobian of the logits), model in eval mode.
- intervals.py: 95% bootstrap intervals of those numbers over the evaluated images, paired
  ratios of two models' medians, intervals over seeds, and an attack's optimality.
- ensemble.py: the best known distance of each image (the minimum over a norm's attacks),
  the headline, with each attack's gap to it.
- pictures.py: a few images, their adversarial examples and perturbations, as figures,
  an npz and a W&B table.
- cost.py: network passes and seconds of each attack; certification.py: certified radii.
- checks.py: the gradient-masking self-checks, one function per check.
- evaluate.py: the whole evaluation of a network (also split over data-parallel ranks) and
  its files in the run folder.
- plots.py: figure and CSV of error curves; the one drawing of an error curve.
- summary.py: an evaluation's numbers to any Lightning logger (the attacks come from
  lipexp.attacks.distance).
- runner.py: ``Evaluator``, the evaluation as one callable (test set in, files and results
  out).
- callback.py: the Lightning callback that runs it at the end of every training run.
"""
