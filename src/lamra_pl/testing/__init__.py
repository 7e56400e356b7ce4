"""What tests, benchmarks and the CPU demo build instead of downloading: tiny random checkpoints (`tiny.py`)."""
