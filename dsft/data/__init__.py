"""Data: file formats, chat-template rendering, assistant-only loss masks."""
