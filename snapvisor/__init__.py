"""snapvisor: a KVM micro-VM monitor built for disaster recovery."""

__version__ = "0.1.0"
