"""difftest: differential testing of the spec CPU, refvmm, Unicorn and KVM (backends, cases, campaigns)."""
