"""Meeting notes a person can trust: items found in the transcript's own lines, phrased by the
model, every name, number and date checked against the lines they cite.

``facts`` reads names, numbers, dates and times out of text, normalised ("sixty one percent"
and "61%" are the same fact); ``guard`` checks generated sentences against the facts of their
sources and repairs or drops what they do not support; ``cues`` finds decisions, action items
(owner, due) and open questions among the lines; ``items`` are the notes' records, kept in the
stream's memory and committed with each batch; ``render`` writes them as markdown that cites
its entries.
"""
