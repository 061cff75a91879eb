"""The device: memory estimate, device profiles, accelerators (GPU offload, CPU variants)."""
