# Locates the installed PyTorch through its Python package and defines the imported target
# fa_torch::torch (headers + libc10/libtorch[_cuda]). The op library uses only the dispatcher API
# (TORCH_LIBRARY), never Python's C API, so it does not link libtorch_python or libpython.
find_package(Python COMPONENTS Interpreter REQUIRED)
execute_process(
  COMMAND ${Python_EXECUTABLE} -c "
import os, torch
from torch.utils import cpp_extension as ce
print(','.join(ce.include_paths()))
print(os.path.join(os.path.dirname(torch.__file__), 'lib'))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.__version__)"
  OUTPUT_VARIABLE _fa_torch_out RESULT_VARIABLE _fa_torch_rc ERROR_VARIABLE _fa_torch_err
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _fa_torch_rc EQUAL 0)
  message(FATAL_ERROR "PyTorch not importable by ${Python_EXECUTABLE}: ${_fa_torch_err}\n"
                      "Install torch first, then build with: pip install --no-build-isolation .")
endif()
string(REPLACE "\n" ";" _fa_torch_lines "${_fa_torch_out}")
list(GET _fa_torch_lines 0 _fa_torch_inc)
list(GET _fa_torch_lines 1 FA_TORCH_LIBDIR)
list(GET _fa_torch_lines 2 _fa_torch_abi)
list(GET _fa_torch_lines 3 FA_TORCH_VERSION)
string(REPLACE "," ";" _fa_torch_inc "${_fa_torch_inc}")
message(STATUS "flash_attention: torch ${FA_TORCH_VERSION} in ${FA_TORCH_LIBDIR}")

add_library(fa_torch::torch INTERFACE IMPORTED)
set(_fa_torch_libs ${FA_TORCH_LIBDIR}/libc10.so ${FA_TORCH_LIBDIR}/libtorch_cpu.so ${FA_TORCH_LIBDIR}/libtorch.so)
set(_fa_torch_defs _GLIBCXX_USE_CXX11_ABI=${_fa_torch_abi} TORCH_EXTENSION_NAME=_C)
if(FA_CUDA_ARCHS)
  list(APPEND _fa_torch_libs ${FA_TORCH_LIBDIR}/libc10_cuda.so ${FA_TORCH_LIBDIR}/libtorch_cuda.so CUDA::cudart)
  list(APPEND _fa_torch_defs USE_CUDA=1)
endif()
set_target_properties(fa_torch::torch PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${_fa_torch_inc}"
  INTERFACE_LINK_LIBRARIES "${_fa_torch_libs}"
  INTERFACE_COMPILE_DEFINITIONS "${_fa_torch_defs}")

# The op library must use the C++ runtime that the Python process loads. A compiler with its own
# libstdc++ (e.g. a GCC under /opt) builds code that crashes in iostreams and error formatting when
# loaded next to the system one (seen on the GPU machine: every TORCH_CHECK message segfaulted).
execute_process(COMMAND ${CMAKE_CXX_COMPILER} -print-file-name=libstdc++.so.6
                OUTPUT_VARIABLE _fa_cxx_rt OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
execute_process(
  COMMAND ${Python_EXECUTABLE} -c "
import torch
print(next((l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++.so' in l), ''))"
  OUTPUT_VARIABLE _fa_py_rt OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(_fa_cxx_rt AND _fa_py_rt AND EXISTS "${_fa_cxx_rt}")
  get_filename_component(_fa_cxx_rt "${_fa_cxx_rt}" REALPATH)
  get_filename_component(_fa_py_rt "${_fa_py_rt}" REALPATH)
  if(NOT _fa_cxx_rt STREQUAL _fa_py_rt)
    message(WARNING "flash_attention: ${CMAKE_CXX_COMPILER} links ${_fa_cxx_rt}, but Python with torch "
                    "loads ${_fa_py_rt}. The op library may crash when it formats errors. Configure with "
                    "the system compiler instead, e.g. CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++.")
  endif()
endif()
