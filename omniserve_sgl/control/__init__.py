"""The SLO controller: latency models of a forward step and the per-step policy that spends the LS
SLOs' slack on BE work. Plain Python over plain dataclasses (torch-free, SGLang-free), so the
server's glue and a simulator run the same code."""

from omniserve_sgl.control.latency import (
    Accuracy,
    CPUJobSample,
    LatencyModel,
    StepSample,
    StepShape,
    fit,
    fit_and_check,
)
from omniserve_sgl.control.lengths import OutputLengths
from omniserve_sgl.control.online import STEP_KINDS, OnlineCorrection, step_kind
from omniserve_sgl.control.policy import Controller, ControllerConfig, largest_fitting
from omniserve_sgl.control.state import (
    CPU,
    GPU,
    SLO,
    WAITING,
    BERequest,
    LSDecode,
    LSWaiting,
    ServerView,
    StepPlan,
)

__all__ = [
    "CPU", "GPU", "SLO", "STEP_KINDS", "WAITING", "Accuracy", "BERequest", "CPUJobSample", "Controller", "ControllerConfig", "LSDecode",
    "LSWaiting", "LatencyModel", "OnlineCorrection", "OutputLengths", "ServerView", "StepPlan", "StepSample", "StepShape", "fit", "fit_and_check",
    "largest_fitting", "step_kind",
]
