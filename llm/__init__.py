"""Models and the decode driver that run on the emulated wafer, and the ``wafer-llm`` command."""
