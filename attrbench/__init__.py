"""attrbench: faithfulness of trajectory-based data attribution, measured against leave-one-out retraining."""

__version__ = "0.1.0"
