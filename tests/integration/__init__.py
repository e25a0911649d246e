"""Integration tests against real LLM servers whose environment is built on first use."""
