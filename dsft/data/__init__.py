"""Data: file formats, chat-template rendering, assistant-only loss masks."""

MAX_MIX_ROWS = 10**9  # rows a data mix may take in all (its index is 8 bytes a row): the schema and the mix check
