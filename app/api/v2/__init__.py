"""The Open Inference Protocol (v2, KServe/Triton) beside /classify."""
