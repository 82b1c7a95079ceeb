"""The manifest: its schema (frozen pydantic, unknown keys refused), loading with ${VAR} interpolation,
llama.cpp's quant-type names and Ollama's Modelfile syntax, which validation needs to refuse what a
Modelfile cannot hold."""
