"""The public Python API: the verbs of the command line on your own nn.Modules, DataLoaders and tensors.

Everything here is re-exported at the package top (`refiner.atlas`, `refiner.fit`, ...);
the command line parses its arguments and calls these same functions.
"""
