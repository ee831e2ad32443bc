"""The scripted engine in-process, on DSPy's sync thread path (the worker itself uses ``acall``)."""

from __future__ import annotations

import dspy
import pytest

from bridge.lm.engines import build_lm


def test_threads_share_one_script_and_each_reply_is_served_once():
    lm = build_lm("scripted/threads", {"script": [{"answer": str(i)} for i in range(40)]})
    predict = dspy.Predict("question -> answer")
    examples = [dspy.Example(question=f"q{i}").with_inputs("question") for i in range(40)]
    with dspy.context(lm=lm):
        results = predict.batch(examples, num_threads=8, disable_progress_bar=True)
        assert sorted(int(r.answer) for r in results) == list(range(40))
        with pytest.raises(dspy.utils.exceptions.LMError, match="no replies left"):
            predict(question="one more")


def test_each_configured_lm_has_its_own_script():
    first, second = (build_lm("scripted/same", {"script": [{"answer": name}]}) for name in ("first", "second"))
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=second):
        assert predict(question="q").answer == "second"
    with dspy.context(lm=first):
        assert predict(question="q").answer == "first"
