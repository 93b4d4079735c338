"""The contracts every floor shares: the key schema (``keys``), the input entry (``entries``),
the output entry (``outputs``) and the shared vocabularies (``outcomes``). They import only
the ground floor (``sinkstream.ids``)."""
