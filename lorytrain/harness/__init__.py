"""lm-evaluation-harness backend (`lm.py`, model `lory`) and the paper's downstream suite (`suite.py`).

Needs the `eval` extra (`pip install -e '.[eval]'`).
"""
