"""The contracts every floor shares: the key schema (``keys``), the input entry (``entries``),
the output entry (``outputs``), the shared vocabularies (``outcomes``) and what a
newer build's stored formats mean to this one (``formats``). They import only
the ground floor (``sinkstream.ids``)."""
