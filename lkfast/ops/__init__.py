"""The op layer: the only place that knows about backends.

    depthwise_conv2d(x, weight, bias=None, *, backend="auto")
    available_backends()                      which backends can run here, and why not
    plan_for(x, weight, explain=True)         which backend runs each pass of a call, and why
    frequency_noise(x, freq, ...)             band-limited sign noise (the frequency analysis)
    dtype_name(torch.float16) == "float16"
"""
from lkfast.ops.backends import PASSES, BackendInfo, Plan, available_backends, dtype_name
from lkfast.ops.depthwise import PlanExplanation, depthwise_conv2d, plan_for
from lkfast.ops.frequency import frequency_noise

__all__ = ["depthwise_conv2d", "available_backends", "BackendInfo", "plan_for", "Plan", "PlanExplanation",
           "PASSES", "frequency_noise", "dtype_name"]
