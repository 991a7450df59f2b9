"""Accuracy evaluation of token-selection methods on a real model, offline (`specontext eval`).

runner.py      run_eval / run_eval_for_plan / render_table / to_json: the entry points
methods.py     the compared methods as keep-masks (SpeContext head/batch, StreamingLLM, Quest, random)
prefix_head.py "self-prefix:N": the LLM's first N layers + layer N's Q/K as a truncated-copy DLM
sparse_attention.py  the HF attention function that applies a method in each decode step
recall.py      attention recall task; passkey.py: passkey retrieval task; text.py: the texts
tables.py      rich and Markdown tables
"""
