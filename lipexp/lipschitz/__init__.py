"""Lipschitz analysis: the data set's constant (data_constant.py), the model's bounds and
certified radii (model_bounds.py, certified.py)."""
