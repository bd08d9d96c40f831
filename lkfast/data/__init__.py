"""File input/output and datasets: image and video IO, readers for the robustness benchmarks'
on-disk layouts, and the synthetic default benchmark.

``lkfast.data`` may use ``lkfast.corrupt``; ``lkfast.corrupt`` never imports ``lkfast.data``.
Each submodule re-exports its public names below (one import line per submodule).
"""
