"""Testing against a lab: outside checks and a pytest plugin (``pytest --lab FILE``)."""
