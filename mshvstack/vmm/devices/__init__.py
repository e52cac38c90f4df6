"""Legacy and test devices of the machine."""
