"""Start-up fix for SGLang on a CPU-only torch (installed by ``scripts/setup.sh`` through a
``.pth`` file, so every interpreter of the venv runs it, spawned SGLang children included).

The torchvision wheel that matches the CPU torch on PyPI is a CUDA build whose ``_C`` does not
load, so importing it fails with ``operator torchvision::nms does not exist`` when its fake
kernels are registered. Defining the two schemas that those registrations need (see
``torchvision/_meta_registrations.py``) before torchvision's first import is enough: SGLang imports
torchvision through transformers' image utilities but never runs its ops on text models.
A meta-path finder does it lazily so that interpreters that never import torchvision pay nothing.
"""

import sys

_LIBRARIES = []  # keeps the torch.library fragment alive for the life of the process


class _TorchvisionSchemaFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "torchvision":
            return
        sys.meta_path.remove(cls)
        import glob
        import importlib.util
        import os

        import torch

        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            return
        libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
        try:
            torch.ops.load_library(libs[0])  # a torchvision built for this torch: nothing to fix
        except (IndexError, OSError, RuntimeError):
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARIES.append(lib)
        return  # the normal finders import torchvision itself


if _TorchvisionSchemaFinder not in sys.meta_path:
    sys.meta_path.insert(0, _TorchvisionSchemaFinder)
