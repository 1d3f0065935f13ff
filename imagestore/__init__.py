"""imagestore: a content-addressed image store laid out as an OCI image layout.

Knows blobs, manifests, layers and registries, never FUSE.  `store` owns the on-disk layout
(atomic, verified blob writes); `unpack` turns layer blobs into overlay-format directories;
`reference`, `registry` and `sources` bring images in; `pull` ties them together.
"""

__version__ = "0.1.0"  # the project's version (pyproject reads it from here)
