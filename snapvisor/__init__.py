"""snapvisor: a KVM micro-VM monitor built for disaster recovery."""

__version__ = "0.1.0"

__all__ = ["VM", "restore", "__version__"]


def __getattr__(name: str):
    # The VMM needs cffi and /dev/kvm only when used: `import snapvisor` stays light.
    if name in ("VM", "restore"):
        from snapvisor import machine

        return getattr(machine, name)
    raise AttributeError(f"module 'snapvisor' has no attribute {name!r}")
