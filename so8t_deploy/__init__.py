"""so8t-deploy: bake adapters exactly, build a GGUF quant ladder, roll it out to Ollama."""

__version__ = "0.1.0"
