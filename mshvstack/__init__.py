"""mshvstack: a Python userspace virtualization stack for Linux's /dev/mshv."""

__version__ = "0.1.0"
