"""Defences as plain functions: perturbations ``(model, x, y) -> x_adv`` (adversarial.py)
and training objectives ``(model, x, y) -> (loss, logs)`` (lipschitz.py)."""
