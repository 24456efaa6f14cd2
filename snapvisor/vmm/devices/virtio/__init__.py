"""virtio 1.x devices on the virtio-mmio transport (version 2, split virtqueues)."""
