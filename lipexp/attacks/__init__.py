"""Evaluation attacks: threat models (threat.py), the PGD attack loop with its one-step
configs FGSM and the gradient attack (pgd.py), and the per-image adversarial distance
search that turns a fixed-size attack into error curves (search.py)."""
