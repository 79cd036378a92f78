import re

from setuptools import find_packages, setup


def version() -> str:
    """The version of mmdet_hawq/version.py (its one source)."""
    with open('mmdet_hawq/version.py') as f:
        return re.search(r"__version__ = '([^']+)'", f.read()).group(1)


setup(
    name='mmdet_hawq',
    version=version(),
    description='Output-sensitivity-aware mixed-precision post-training '
    'weight quantization of DETR detectors, as an MMDetection 3.x plugin',
    packages=find_packages(include=['mmdet_hawq', 'mmdet_hawq.*']),
    python_requires='>=3.8',
    # torch is deliberately not listed: CPU and GPU users bring their own
    # build (the set-up in the Makefile pins the CPU one).
    # onnx/onnxruntime: mmdet_hawq.deploy and tools/*onnx*.py (INT4
    # DequantizeLinear needs opset 21); the versions the tests ran with.
    # The package's pins live here only; requirements.txt adds the
    # set-up's own (torch's CPU build, mmcv's exact version, pytest).
    install_requires=[
        'mmengine==0.10.7', 'mmcv>=2.0.0rc4,<2.2.0', 'mmdet==3.3.0',
        'pycocotools', 'scipy>=1.9', 'matplotlib', 'numpy', 'pillow',
        'onnx==1.17.0', 'onnxruntime==1.20.1'
    ],
    # the second runtime and its quantizer, the peer to beat
    # (mmdet_hawq.deploy.runtimes, benchmarks/benchmark_runtimes.py):
    # pip install -e .[openvino]; the tests that need them skip without
    extras_require={'openvino': ['openvino==2026.4.1', 'nncf==3.4.0']},
)
