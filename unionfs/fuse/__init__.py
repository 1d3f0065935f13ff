"""Our own FUSE transport: the protocol spoken over /dev/fuse, without libfuse or pyfuse3.

Layers, each testable without the one below (go-fuse / fuser):
  wire      structs and constants of include/uapi/linux/fuse.h, bounds-checked parsing;
  opcodes   the opcode table: decoder, bridge method and run mode per opcode;
  init      INIT negotiation, gated on the kernel's flags and minor;
  session   the trio loop over /dev/fuse: dispatch, tasks, INTERRUPT, FORGET, DESTROY;
  mount     mount(2) as root, fusermount3 otherwise; unmount;
  bridge    drives the shared handler class (operations.UnionOperations);
  run       the daemon's native `serve`.
This package imports nothing heavy at import time (no trio, no pyfuse3): the mount and the
INIT answer happen before those are loaded.
"""
