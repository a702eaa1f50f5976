"""modeld: serve several llama.cpp models from one process."""
