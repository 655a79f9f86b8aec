"""Speed benchmarks: dense vs compressed DeiT timed in the same run, and the Pareto plot.

``timing`` holds the measuring method (warm-up, medians, rotating random inputs, CUDA
events on the GPU), ``models`` the sweep over configs, ``pareto`` speed vs fidelity.
"""
