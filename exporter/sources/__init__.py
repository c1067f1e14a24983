"""What the node itself says: NVML (whole-GPU memory, GPU process lists), /proc (process identity,
ancestry, PID namespaces, containers) and the kernel's OOM evidence (the kernel log, memory
cgroups). Sources read and report what failed to the error counter; they know nothing of engines,
snapshots or Prometheus. They may import only exporter.errors, exporter.supervisor and
gpu_residency_common."""
