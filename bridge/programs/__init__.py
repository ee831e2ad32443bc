"""DSPy programs: signatures, modules, streaming, ReAct, pipelines, expressions, evaluation and
optimizers, generic calls, and the runner every command shares."""
