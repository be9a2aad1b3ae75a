"""The applications built on the library: ``deepreduce train``, ``demo``, ``codecs`` and
``bench``, with the models, data, communication-hook factory and network emulation they use.

The library core (``deepreduce`` and its other subpackages) never imports this package.
"""
