"""analysis: the paper's figures and tables from a study tracked in MLflow, and the measurements it missed.

    python -m analysis --experiment NAME [--tracking-uri URI] [--out DIR]

``run`` (``analysis.runner``) reads the study's runs (docs/tracking.md), loads the model the prompts were trained on,
computes every analysis (``analysis.pipeline.compute``), writes the report folder and logs it as the experiment's
``analysis`` run. It is re-exported here because the entry script hands ``analysis.run`` to the study driver.
"""

from analysis.runner import DEFAULT_OUT, run

__all__ = ["DEFAULT_OUT", "run"]
