"""Log streams: lines parsed (``parse``), masked (``masking``) and mined into templates
(``mining``), counted per template (``table``), kept in the stream's logs hash (``head``) and
summarized as log notes (``notes``). See ``docs/logs.md``."""
