"""Benchmarks: how well (:mod:`.quality`: PSNR/SSIM per noise and method) and how fast
(:mod:`.speed`: MP/s and memory, against the authors' straightforward formulation)."""
