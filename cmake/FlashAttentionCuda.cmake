# Resolves which CUDA archs to build (FA_CUDA_ARCHS) and where CUTLASS lives (FA_CUTLASS_INCLUDE),
# and defines fa_add_cuda_kernels(target).
#
# FLASH_ATTENTION_CUDA_ARCHS:
#   auto  -> the local GPU's arch when nvcc and a GPU are present ("80;90a" on Hopper), else none
#   none  -> CPU only
#   list  -> e.g. "80;90a": sm80-path kernels are built for every listed arch (they run on sm90 too);
#            sm90-path kernels (wgmma/TMA) only for 90a.

include(CheckLanguage)
set(FA_CUDA_ARCHS "")
string(TOLOWER "${FLASH_ATTENTION_CUDA_ARCHS}" _fa_archs)

if(_fa_archs STREQUAL "auto")
  check_language(CUDA)
  find_program(_fa_nvidia_smi nvidia-smi)
  if(CMAKE_CUDA_COMPILER AND _fa_nvidia_smi)
    execute_process(COMMAND ${_fa_nvidia_smi} --query-gpu=compute_cap --format=csv,noheader
                    OUTPUT_VARIABLE _fa_caps RESULT_VARIABLE _fa_smi_rc ERROR_QUIET)
    if(_fa_smi_rc EQUAL 0 AND _fa_caps)
      string(REGEX MATCH "[0-9]+\\.[0-9]+" _fa_cap "${_fa_caps}")
      string(REPLACE "." "" _fa_cap "${_fa_cap}")
      if(_fa_cap STREQUAL "90")
        set(FA_CUDA_ARCHS "90a")
      elseif(_fa_cap GREATER_EQUAL 80)
        set(FA_CUDA_ARCHS "${_fa_cap}")
      endif()
    endif()
  endif()
elseif(NOT _fa_archs STREQUAL "none" AND NOT _fa_archs STREQUAL "" AND NOT _fa_archs STREQUAL "off")
  set(FA_CUDA_ARCHS ${FLASH_ATTENTION_CUDA_ARCHS})
endif()

if(FA_CUDA_ARCHS)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  if(CUTLASS_PATH)
    if(EXISTS "${CUTLASS_PATH}/include/cute")
      set(FA_CUTLASS_INCLUDE "${CUTLASS_PATH}/include")
    else()
      set(FA_CUTLASS_INCLUDE "${CUTLASS_PATH}")
    endif()
  else()
    find_package(Python COMPONENTS Interpreter REQUIRED)
    execute_process(
      COMMAND ${Python_EXECUTABLE} -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
      OUTPUT_VARIABLE FA_CUTLASS_INCLUDE OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _fa_rc ERROR_QUIET)
  endif()
  if(NOT EXISTS "${FA_CUTLASS_INCLUDE}/cute/tensor.hpp")
    message(FATAL_ERROR "CUTLASS headers not found (looked in '${FA_CUTLASS_INCLUDE}'). "
                        "pip install nvidia-cutlass, or set CUTLASS_PATH to a CUTLASS 4.x checkout.")
  endif()
  message(STATUS "flash_attention: CUTLASS include ${FA_CUTLASS_INCLUDE}")
endif()

function(_fa_gencode_flags out archs)
  set(flags "")
  foreach(a IN LISTS archs)
    list(APPEND flags "-gencode=arch=compute_${a},code=sm_${a}")
  endforeach()
  set(${out} ${flags} PARENT_SCOPE)
endfunction()

# Adds the CUDA sources to `target` as two object libraries: the sm80 path (every arch) and the sm90
# path (90a only). Generated instantiations are filtered by FLASH_ATTENTION_HEADDIMS / _DTYPES.
function(fa_add_cuda_kernels target)
  set(common_opts
      $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math
      -std=c++17 -lineinfo -Xcompiler=-fPIC>)
  file(GLOB api_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/cuda/*.cu ${PROJECT_SOURCE_DIR}/src/cuda/*.cpp)
  file(GLOB inst_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/cuda/instantiations/*.cu)

  # Keep only instantiations whose file name matches a requested head dim and dtype:
  # <path>_<kind>_hdim<D>_<dtype>[_<feature>].cu
  set(sm80_sources "")
  set(sm90_sources "")
  foreach(f IN LISTS inst_sources)
    get_filename_component(name ${f} NAME_WE)
    string(REGEX MATCH "hdim([0-9]+)" _m "${name}")
    set(hd ${CMAKE_MATCH_1})
    string(REGEX MATCH "_(fp16|bf16|e4m3)" _m "${name}")
    set(dt ${CMAKE_MATCH_1})
    if(hd AND NOT hd IN_LIST FLASH_ATTENTION_HEADDIMS)
      continue()
    endif()
    if(dt AND NOT dt STREQUAL "e4m3" AND NOT dt IN_LIST FLASH_ATTENTION_DTYPES)
      continue()
    endif()
    if(name MATCHES "^sm90")
      list(APPEND sm90_sources ${f})
    else()
      list(APPEND sm80_sources ${f})
    endif()
  endforeach()

  string(REPLACE ";" "," hd_csv "${FLASH_ATTENTION_HEADDIMS}")
  set(defs FLASH_ATTENTION_WITH_CUDA=1 "FA_HEADDIMS_BUILT=${hd_csv}")
  # nvcc splits -D values at commas, so the CUDA objects get them escaped.
  string(REPLACE ";" "\\," hd_csv_cuda "${FLASH_ATTENTION_HEADDIMS}")
  string(REPLACE ";" "\\," dt_csv_cuda "${FLASH_ATTENTION_DTYPES}")
  set(cuda_defs FLASH_ATTENTION_WITH_CUDA=1 "FA_HEADDIMS_BUILT=${hd_csv_cuda}" "FA_DTYPES_BUILT=${dt_csv_cuda}")  # src/common/dispatch.h
  set(sm80_archs ${FA_CUDA_ARCHS})
  _fa_gencode_flags(sm80_flags "${sm80_archs}")

  add_library(fa_cuda_sm80 OBJECT ${api_sources} ${sm80_sources})
  target_include_directories(fa_cuda_sm80 PRIVATE ${PROJECT_SOURCE_DIR}/include ${PROJECT_SOURCE_DIR}/src ${FA_CUTLASS_INCLUDE})
  target_compile_options(fa_cuda_sm80 PRIVATE ${common_opts} $<$<COMPILE_LANGUAGE:CUDA>:${sm80_flags}>)
  target_compile_definitions(fa_cuda_sm80 PRIVATE ${cuda_defs})
  set_target_properties(fa_cuda_sm80 PROPERTIES CUDA_ARCHITECTURES OFF POSITION_INDEPENDENT_CODE ON)
  target_link_libraries(fa_cuda_sm80 PRIVATE CUDA::cudart)
  target_sources(${target} PRIVATE $<TARGET_OBJECTS:fa_cuda_sm80>)

  if("90a" IN_LIST FA_CUDA_ARCHS AND sm90_sources)
    _fa_gencode_flags(sm90_flags "90a")
    add_library(fa_cuda_sm90 OBJECT ${sm90_sources})
    target_include_directories(fa_cuda_sm90 PRIVATE ${PROJECT_SOURCE_DIR}/include ${PROJECT_SOURCE_DIR}/src ${FA_CUTLASS_INCLUDE})
    target_compile_options(fa_cuda_sm90 PRIVATE ${common_opts} $<$<COMPILE_LANGUAGE:CUDA>:${sm90_flags}>)
    # Before any CuTe header (see src/cuda/sm90/fwd_traits.h): wgmma N = 80 / 112 / 176 tiles.
    target_compile_definitions(fa_cuda_sm90 PRIVATE ${cuda_defs} CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED)
    set_target_properties(fa_cuda_sm90 PROPERTIES CUDA_ARCHITECTURES OFF POSITION_INDEPENDENT_CODE ON)
    target_sources(${target} PRIVATE $<TARGET_OBJECTS:fa_cuda_sm90>)
    target_compile_definitions(${target} PRIVATE FLASH_ATTENTION_WITH_SM90=1)
    target_compile_definitions(fa_cuda_sm80 PRIVATE FLASH_ATTENTION_WITH_SM90=1)
  endif()
  target_link_libraries(${target} PUBLIC CUDA::cudart)
  target_compile_definitions(${target} PRIVATE ${defs})
endfunction()
