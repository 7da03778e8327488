"""Tables and figures over many runs: ``attrbench report`` and ``attrbench figures``.

The modules here import pandas, matplotlib, PyYAML and safetensors' numpy backend, never torch, so
both commands start in about a second. :mod:`attrbench.reporting.sweep` contains the Hydra pieces that
record a failed sweep job and set the sweep's exit status.
"""
