"""The ASA router: training-free statistics (stats) and the torch research path (research).

`stats` needs numpy only: block attention mass, threshold curves (density and attention-mass
recall per head over a tau grid) and per-head thresholds for the contract's `head_thresholds`
input. `research` (torch, imported lazily by its functions) runs a transformers model with
contract-v1 block-sparse attention for perplexity studies (tools/eval_router.py).
"""

from asa_export.router.stats import (DEFAULT_TAUS, ThresholdCurve, block_mass, curve_at,
                                     fit_head_thresholds, fit_head_thresholds_tradeoff,
                                     threshold_curve)

__all__ = ["DEFAULT_TAUS", "ThresholdCurve", "block_mass", "curve_at", "fit_head_thresholds",
           "fit_head_thresholds_tradeoff", "threshold_curve"]
