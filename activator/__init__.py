"""activator: a scale-from-zero front door for self-hosted LLM servers."""

__version__ = "0.1.0"
