"""On-device builds: TensorRT engines for a bundle (``edgelvm build``). TensorRT is imported lazily, only to build."""

from edgelvm.build.tensorrt_builder import (
    BuildConfig,
    BuildReport,
    EngineBuildError,
    OptimizationProfile,
    TensorRTUnavailableError,
    build_engines,
    decoder_profiles,
    engine_dir,
    read_engines_manifest,
    vision_profiles,
)

__all__ = [
    "BuildConfig",
    "BuildReport",
    "EngineBuildError",
    "OptimizationProfile",
    "TensorRTUnavailableError",
    "build_engines",
    "decoder_profiles",
    "engine_dir",
    "read_engines_manifest",
    "vision_profiles",
]
