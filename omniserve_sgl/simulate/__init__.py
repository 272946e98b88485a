"""Co-serving simulator: one serving instance (GPUs with tensor parallelism, the host's CPU attention
worker, optionally remote CPU servers) serving an LS stream and a BE stream step by step, with the
SLO controller's own code deciding every step of the omniserve systems.

``python -m omniserve_sgl.simulate --help`` runs experiments; :func:`run` and :class:`Simulation`
are the Python API."""

from omniserve_sgl.simulate.engine import SYSTEMS, SimConfig, SimStats, Simulation, simulate
from omniserve_sgl.simulate.experiment import Scenario, run, write
from omniserve_sgl.simulate.hardware import (
    CPUS,
    GPUS,
    LINKS,
    Assumptions,
    ModelSpec,
    ProfileTiming,
    RooflineTiming,
    shipped_model,
)

__all__ = ["CPUS", "GPUS", "LINKS", "SYSTEMS", "Assumptions", "ModelSpec", "ProfileTiming", "RooflineTiming",
           "Scenario", "SimConfig", "SimStats", "Simulation", "run", "shipped_model", "simulate", "write"]
