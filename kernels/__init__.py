"""Triton kernels of lkfast, installed as the subpackage ``lkfast.kernels``."""
