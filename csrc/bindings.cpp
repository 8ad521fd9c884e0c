// The one pybind11 module of omni2sound: omni2sound._C. Ops add themselves through o2s::Registrar.
#include <pybind11/pybind11.h>
#include "registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "omni2sound native kernels (C++ always, CUDA when built with nvcc); no libtorch link";
  m.def("built_with_cuda", []() {
#ifdef OMNI2SOUND_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_archs", []() {
#ifdef OMNI2SOUND_CUDA_ARCHS
    return std::string(OMNI2SOUND_CUDA_ARCHS);
#else
    return std::string();
#endif
  });
  for (auto& bind : o2s::binders()) bind(m);
}
