"""unionfs: a union filesystem in userspace with Linux kernel overlayfs semantics.

Knows directories, never images or digests. `stack` resolves names through the layers
(pure, synchronous), `operations` adapts that model to pyfuse3, `daemon` is the
`layerfs` command line (a drop-in for fuse-overlayfs's).
"""
