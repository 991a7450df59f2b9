"""Accuracy evaluation of token selection methods (specontext eval)."""
