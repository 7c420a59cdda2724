"""Scenarios: scripted end-to-end stories run on a lab through its :class:`~labctl.lab.face.Lab` face."""
