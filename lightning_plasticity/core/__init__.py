"""The package's internal core: plumbing every measure, penalty and intervention shares.

No Lightning import here. One home for each piece:

* :mod:`.batch` — generic batches (tensors, tuples, dicts, nested): size, slicing, concatenation,
  sharding across ranks.
* :mod:`.isolation` — run a measurement without side effects (parameters, buffers, gradients,
  optimizer state, RNG streams, modes and plain attributes are restored) and forked, seeded RNG.
* :mod:`.layers` — layer discovery: parameterised layers, name patterns, activation kinds.
* :mod:`.record` — one pass of any loss closure with forward hooks that records each layer's
  input and output, and :class:`~.record.HeadOutput`, a module whose output is the head output
  recorded while the user's own loss runs.
* :mod:`.initialization` — fresh, seeded re-initialisation of a copy.
* :mod:`.json_file` — JSON state files read tolerantly and written atomically.
* :mod:`.process_group` — the default process group destroyed before the interpreter exits.
"""
