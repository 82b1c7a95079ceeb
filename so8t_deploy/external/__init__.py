"""Adapters to the systems outside this package: llama.cpp, the Docker engine, Ollama.

Stages talk in artifacts (directories and files); only these modules talk to the world.
"""
