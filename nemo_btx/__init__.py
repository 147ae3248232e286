"""nemo-btx: Branch-Train-MiX on megatron-core."""

__version__ = "0.1.0"
