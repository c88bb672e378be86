"""The suite: CLI, presets, datasets, training, the results store and the stage runner.

It is the only layer that does I/O and wires models/, export/ and reports/ together.
"""
