"""Loaders: ELF (with the PVH note), Linux bzImage, and the x86 boot state they need."""

from mshvstack.errors import MshvError


class LoaderError(MshvError):
    """A kernel or initrd file cannot be loaded (one clear line for the user)."""
