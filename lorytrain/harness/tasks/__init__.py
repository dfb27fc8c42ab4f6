"""The paper's downstream suite as lm-eval task YAMLs (`lory_<task>`) and the functions they name
(`lory_tasks.py`); usable as a plain `lm_eval --include_path`."""
