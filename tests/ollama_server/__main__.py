"""`python -m tests.ollama_server`: run one server (see the package docstring)."""

from .handler import main

main()
