"""Language models per session: building ``dspy.LM`` from frame options, the offline engines
(scripted, replayed) and the LM-recording hook.  Imports DSPy lazily."""
