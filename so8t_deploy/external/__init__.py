"""Adapters to the systems outside this package: llama.cpp (converter and quantizer), the Docker engine,
Ollama (the host client and what /api/show prints) and the Hugging Face Hub.

Stages talk in artifacts (directories and files); only these modules talk to the world.
"""
