"""The bundled CPU backend: a portable llama-cpp-python build and the check that it runs."""
