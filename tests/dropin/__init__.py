"""The differential harness of issue 10: models, hooks and comparisons that test ``impartial.backward``
against plain ``Tensor.backward`` (``test_dropin*.py``)."""
