"""Data selection by K-step look-ahead influence: online, offline and baselines.

See :mod:`attrbench.selection.lookahead` for the score and its sign convention,
:mod:`attrbench.selection.online` and :mod:`attrbench.selection.offline` for the two ways of
using it, :mod:`attrbench.selection.runner` for ``attrbench select`` and
:mod:`attrbench.selection.report` for the aggregated table and figures.
"""

from attrbench.selection.data import SelectionData, split_validation
from attrbench.selection.lookahead import LookaheadScorer, LookaheadScores
from attrbench.selection.offline import offline_scores, train_offline
from attrbench.selection.online import SelectionRun, train_online
from attrbench.selection.report import write_selection_report

__all__ = [
    "LookaheadScorer",
    "LookaheadScores",
    "SelectionData",
    "SelectionRun",
    "offline_scores",
    "split_validation",
    "train_offline",
    "train_online",
    "write_selection_report",
]
