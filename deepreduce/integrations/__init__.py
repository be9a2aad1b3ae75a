"""Integrations with training frameworks; each imports its framework only when imported.

- :mod:`deepreduce.integrations.lightning`: ``DeepReduceStrategy``, a PyTorch Lightning
  DDP strategy (``pip install 'deepreduce[lightning]'``).
- :mod:`deepreduce.integrations.transformers`: ``DeepReduceCallback``, a Hugging Face
  ``Trainer`` callback (``pip install 'deepreduce[transformers]'``).

Both register the DDP hook (:func:`deepreduce.deepreduce_hook`) or run the update mode
(:class:`deepreduce.UpdateSync`) on any device and backend, and keep every rank's
deepreduce state in the framework's checkpoints so that a resumed run continues exactly
as an uninterrupted one.
"""
