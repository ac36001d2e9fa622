"""The VAE zoo behind ``examples/demo.py``: embedded data, multimodal and tabular VAEs, metrics, training.

Reference code, not part of the ``impartial`` package (it needs the ``examples`` extra: scikit-learn,
matplotlib, numpy).  See ``examples/RESULTS.md`` for what it shows.
"""
