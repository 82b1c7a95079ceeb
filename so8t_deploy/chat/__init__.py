"""Chat templates: Go's text/template and Ollama's chat-prompt rendering, in Python."""
