"""Leave-one-out ground truth by exact counterfactual retraining."""
