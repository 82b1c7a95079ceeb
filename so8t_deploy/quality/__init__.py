"""The quant quality gate: KL divergence, top-1 agreement and perplexity of each quant level against its
variant's float GGUF, and the report (Markdown, JSON, plot)."""
