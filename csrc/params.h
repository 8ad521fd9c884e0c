// Binding of the per-op parameter structs: each struct is bound once as a Python class (omni2sound._C.<Name>) whose
// fields are plain attributes; pointer fields read and take integers (a tensor's data_ptr(), 0 for none). The CPU
// and the CUDA entry points of an op take the same struct, so its layout is written down once (in the op's header)
// and the Python side fills it by name.
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>

#include <pybind11/pybind11.h>

namespace o2s {

template <class P>
class ParamsClass {
 public:
  ParamsClass(pybind11::module_& m, const char* name, const char* doc) : c_(m, name, doc) {
    c_.def(pybind11::init<>());
  }
  template <class T>
  ParamsClass& field(const char* name, T P::*f) {
    if constexpr (std::is_pointer_v<T>) {
      c_.def_property(
          name, [f](const P& p) { return reinterpret_cast<std::uintptr_t>(p.*f); },
          [f](P& p, std::uintptr_t v) { p.*f = reinterpret_cast<T>(v); });
    } else {
      c_.def_readwrite(name, f);
    }
    return *this;
  }

 private:
  pybind11::class_<P> c_;
};

inline std::string num(int64_t v) { return std::to_string(v); }

}  // namespace o2s
