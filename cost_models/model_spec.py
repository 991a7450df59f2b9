"""ModelSpec for the cost models: defined in runtime/model_spec.py, since bind reads it back from
plan.json and the runtime imports nothing from the compiler side."""
from specontext_compiler.runtime.model_spec import ATTENTION_KINDS, ModelSpec  # noqa: F401
