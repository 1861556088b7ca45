"""The GPU-server role: features -> memory banks -> UFF -> DLF -> export -> signed bundle."""
