"""refvmm: the Palacios-style VMM built on the spec's virtualization hardware, and the CLI."""
