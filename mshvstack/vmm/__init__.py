"""The machine: config, VP threads, buses, devices, loaders, lifecycle, control API."""
