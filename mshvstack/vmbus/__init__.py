"""VMBus host: SynIC ports, channel management, GPADLs, ring buffers, providers."""
