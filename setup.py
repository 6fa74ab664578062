"""Thin packaging: Python only. CMake (plugins/CMakeLists.txt) owns the native libraries."""
from setuptools import find_packages, setup

setup(
    name="asa-export",
    version="0.1.0",
    description="Compile ONNX transformer exports into AdaptiveSparseAttention models and engines",
    python_requires=">=3.10",
    packages=find_packages(include=["asa_export", "asa_export.*", "graphs", "graphs.*"]),
    package_data={"asa_export.contract": ["SPEC.md"]},
    install_requires=[
        "numpy",
        "onnx>=1.17",
        "onnx-ir>=0.1.10",
        # onnxruntime-gpu on GPU hosts instead (never both in one environment).
        "onnxruntime>=1.20",
        "onnx-graphsurgeon",
        "polygraphy",
    ],
    extras_require={
        # torch: the CPU build on this project's machines is `pip install torch==2.13.0`.
        "models": ["torch", "transformers", "onnxscript", "gguf", "accelerate"],
        # `asa-export calibrate`: tokenizers (folder / tokenizer.json / GGUF via transformers),
        # PNG plots (matplotlib), the learned gate (torch).
        "calibrate": ["tokenizers", "transformers", "gguf", "matplotlib", "torch"],
        "test": ["pytest", "torch", "transformers", "onnxscript", "gguf", "accelerate", "matplotlib",
                 # CPU-side TensorRT-family parse/build tests (no GPU needed).
                 "tensorrt-rtx-cu13-libs==1.7.1.116", "tensorrt-rtx-cu13-bindings==1.7.1.116",
                 # SASS checks of the CUDA core's sm_90a build (tests/plugins/test_cuda_compile.py).
                 "nvidia-cuda-cuobjdump==13.5.37", "nvidia-cuda-nvdisasm==13.5.37",
                 # torch.utils.cpp_extension builds the torch binding's compiled host path with it
                 # (tests/runtime/test_torch_native.py).
                 "ninja"],
        "tensorrt": ["tensorrt"],
    },
    entry_points={"console_scripts": ["asa-export=asa_export.cli.main:main"]},
)
