"""Numbers quoted from the paper the study reproduces, each with where it comes from.

Dayton, O'Rahilly, Werner, "Interpreting Prompt-Tuning Across SuperGLUE Tasks", section 6.2, Table 1 ("Average
Norm and Variance of Learned Prompts Per Class"): per task, the mean Frobenius norm ||P||_F of its learned prompts
over 4 seeds and their variance across seeds (the paper does not say which variance convention; Table 1 here uses
the population variance, ddof=0, numpy's default).
"""

from __future__ import annotations

TABLE1_MEAN_FROBENIUS = {"cb": 119.2, "rte": 107.7, "copa": 111.2, "wsc": 135.3}


def wsc_cb_norm_ratio() -> float:
    """The paper's WSC / CB ratio of mean Frobenius norms (Table 1): 135.3 / 119.2 = 1.135 (unitless)."""
    return TABLE1_MEAN_FROBENIUS["wsc"] / TABLE1_MEAN_FROBENIUS["cb"]
