"""Cost models: the paper's memory equations, a latency model and the ILP planner (paper s.6).

Pure arithmetic over dataclasses (ModelSpec, Target, Workload); never imports torch.fx.
Only ilp.py / solver.py import PuLP.
"""
