"""Raw ``Llama`` references in benchmarks run the kernels modeld's own models run."""

from modeld.engine.cpu_quirks import apply_cpu_quirks

apply_cpu_quirks()
