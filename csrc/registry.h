// Each op's host file registers its Python bindings here from a static initialiser, so adding an op
// means adding files, never editing a shared list:
//
//   static o2s::Registrar reg_myop([](pybind11::module_& m) { m.def("myop_cpu", &myop_cpu, ...); });
//
// CUDA launchers live in <op>.cu and are declared in the host file; host code calls them only when
// OMNI2SOUND_WITH_CUDA is defined (the extension was built with nvcc).
#pragma once
#include <functional>
#include <vector>
#include <pybind11/pybind11.h>

#include "common.h"

namespace o2s {

using Binder = std::function<void(pybind11::module_&)>;

inline std::vector<Binder>& binders() {
  static std::vector<Binder> all;
  return all;
}

struct Registrar {
  explicit Registrar(Binder b) { binders().push_back(std::move(b)); }
};

}  // namespace o2s
