"""The op layer: the only place that knows about backends.

    depthwise_conv2d(x, weight, bias=None, *, backend="auto")
    available_backends()
"""
from lkfast.ops.backends import BackendInfo, available_backends
from lkfast.ops.depthwise import depthwise_conv2d, plan_for
from lkfast.ops.frequency import frequency_noise

__all__ = ["depthwise_conv2d", "available_backends", "BackendInfo", "plan_for", "frequency_noise"]
